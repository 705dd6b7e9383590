"""fastmerge.io.publish: staging names and modes, the leftovers of dead and live runs,
replacing an output (atomic exchange and the fallback), fsync, write errors, and signals
while the output is moved into place."""

from __future__ import annotations

import errno
import fcntl
import os
import signal

import pytest
import safetensors.torch
import torch

from fastmerge import io
from fastmerge.io import publish


def specs_and_values(n=6, size=1000):
    values = {f"w{i}": torch.arange(size, dtype=torch.float32) + i for i in range(n)}
    specs = [io.TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in values.items()]
    return specs, values


def write_output(out, values=None, **options) -> io.ShardedWriter:
    """A complete output at `out` (several shards); the writer, for its notes."""
    specs, default = specs_and_values()
    values = default if values is None else values
    writer = io.ShardedWriter(out, specs, max_shard_bytes=8000, **options)
    with writer:
        for name in writer.order:
            writer.write(name, values[name])
    return writer


def assert_output(out, values) -> None:
    ckpt = io.open_checkpoint(out)
    assert sorted(ckpt) == sorted(values)
    for name, value in values.items():
        assert torch.equal(ckpt[name], value), name


def entries(parent) -> list[str]:
    """The run files (locks, staging and old directories) beside the outputs."""
    return sorted(p for p in os.listdir(parent) if ".fastmerge-" in p)


def dead_run(out, run_id="0123456789ab", size=2_000_000):
    """What a run killed with -9 leaves: an unlocked lock file and a staging directory."""
    base = out.parent / f".{out.name}.fastmerge-{run_id}"
    lock, tmp = base.with_name(base.name + ".lock"), base.with_name(base.name + ".tmp")
    lock.write_text("")
    tmp.mkdir()
    (tmp / "model-00001-of-00002.safetensors").write_bytes(b"\0" * size)
    return lock, tmp


def test_two_runs_get_their_own_staging_directories(tmp_path):
    out = tmp_path / "out"
    a = publish.Staging(out, publish.new_run_id())
    b = publish.Staging(out, publish.new_run_id())
    assert a.run_id != b.run_id and a.tmp_dir != b.tmp_dir
    assert a.tmp_dir.is_dir() and b.tmp_dir.is_dir()
    for stage in (a, b):
        assert stage.tmp_dir.name == f".out.fastmerge-{stage.run_id}.tmp"
        assert stage.tmp_dir == publish.staging_dir(out, stage.run_id)
        assert publish._try_lock(stage.lock_path) is None  # each run holds its own lock
    assert a.notes == b.notes == []  # b left a (alive) alone
    a.remove()
    b.remove()
    assert entries(tmp_path) == []
    with pytest.raises(ValueError, match="12 hex digits"):
        publish.Staging(out, "../../etc")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700)])
def test_the_output_directory_and_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_output(tmp_path / "out")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode
    for f in (tmp_path / "out").iterdir():
        assert f.stat().st_mode & 0o777 == mode & 0o666, f.name


def test_a_dead_runs_leftovers_are_removed_with_a_note(tmp_path):
    out = tmp_path / "out"
    lock, tmp = dead_run(out)
    writer = write_output(out)
    assert writer.notes == [f"removed 2 MB left by an interrupted run: {tmp}"]
    assert not lock.exists() and not tmp.exists() and entries(tmp_path) == []
    assert_output(out, specs_and_values()[1])


def test_the_cli_prints_the_notes(tmp_path, capsys):
    from fastmerge.cli import main

    for name, value in [("a", 1.0), ("b", 3.0)]:
        model = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file({"w": torch.full((4,), value)}, model)
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "merge_method: linear\nmodels:\n"
        f"  - model: {tmp_path / 'a.safetensors'}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tmp_path / 'b.safetensors'}\n    parameters: {{weight: 0.5}}\n"
    )
    out = tmp_path / "out"
    _, tmp = dead_run(out, size=3_000_000)
    assert main(["merge", str(config), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"fastmerge merge: note: removed 3 MB left by an interrupted run: {tmp}\n" in err
    assert entries(tmp_path) == []


def test_a_live_runs_files_are_left_alone(tmp_path):
    out = tmp_path / "out"
    lock, tmp = dead_run(out)
    held = os.open(lock, os.O_RDWR)  # another open file description holds the lock
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        writer = write_output(out)
        assert writer.notes == []
        assert lock.exists() and (tmp / "model-00001-of-00002.safetensors").exists()
    finally:
        os.close(held)
    assert_output(out, specs_and_values()[1])
    assert publish.clean_leftovers(out)[0].startswith("removed 2 MB")  # dead now


def test_an_old_output_is_put_back_when_there_is_no_output(tmp_path):
    out = tmp_path / "out"
    old_values = {k: -v for k, v in specs_and_values()[1].items()}
    write_output(tmp_path / "old", old_values)
    # killed between renaming the output aside and renaming the staging directory
    lock, tmp = dead_run(out)
    os.rename(tmp_path / "old", tmp_path / ".out.fastmerge-0123456789ab.old")
    notes = publish.clean_leftovers(out)
    assert notes == [
        f"removed 2 MB left by an interrupted run: {tmp}",
        f"restored {out}, which an interrupted run was replacing",
    ]
    assert_output(out, old_values)
    assert entries(tmp_path) == []


def test_a_restored_output_is_refused_at_once_without_overwrite(tmp_path):
    out = tmp_path / "out"
    write_output(tmp_path / "old")
    dead_run(out)
    os.rename(tmp_path / "old", tmp_path / ".out.fastmerge-0123456789ab.old")
    specs, _ = specs_and_values()
    with pytest.raises(io.CheckpointError, match=r"output directory exists .*; restored .*out"):
        io.ShardedWriter(out, specs)  # not after the whole merge
    assert_output(out, specs_and_values()[1])
    assert entries(tmp_path) == []


def _spy_exchange(monkeypatch, works: bool) -> list:
    real = publish.exchange
    calls = []

    def spy(a, b):
        result = real(a, b) if works else False
        calls.append(result)
        return result

    monkeypatch.setattr(publish, "exchange", spy)
    return calls


@pytest.mark.parametrize("works", [True, False], ids=["exchange", "fallback"])
def test_overwrite_replaces_the_output(tmp_path, monkeypatch, works):
    out = tmp_path / "out"
    old_values = {k: -v for k, v in specs_and_values()[1].items()}
    write_output(out, old_values)
    (out / "stale.txt").write_text("from the old output")
    calls = _spy_exchange(monkeypatch, works)
    specs, values = specs_and_values()
    with pytest.raises(io.CheckpointError, match="exists"):
        io.ShardedWriter(out, specs)
    write_output(out, overwrite=True)
    if works and calls != [True]:
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE)")
    assert calls == [works]
    assert_output(out, values)
    assert not (out / "stale.txt").exists()
    assert entries(tmp_path) == []


def test_a_failed_second_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old_values = {k: -v for k, v in specs_and_values()[1].items()}
    write_output(out, old_values)
    _spy_exchange(monkeypatch, works=False)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(out) and ".tmp" in str(src):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(publish.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output"):
        write_output(out, overwrite=True)
    monkeypatch.setattr(publish.os, "replace", real_replace)
    assert_output(out, old_values)
    assert entries(tmp_path) == []


def test_overwrite_replaces_a_symbolic_link_not_its_target(tmp_path):
    target = tmp_path / "target"
    write_output(target)
    (tmp_path / "out").symlink_to(target)
    values = {k: 2 * v for k, v in specs_and_values()[1].items()}
    write_output(tmp_path / "out", values, overwrite=True)
    assert not (tmp_path / "out").is_symlink()
    assert_output(tmp_path / "out", values)
    assert_output(target, specs_and_values()[1])
    assert entries(tmp_path) == []


def _count_fsyncs(monkeypatch) -> list[str]:
    real = os.fsync
    synced = []

    def counting(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return synced


@pytest.mark.parametrize("overwrite", [False, True])
def test_fsync_covers_every_shard_and_directory(tmp_path, monkeypatch, overwrite):
    out = tmp_path / "out"
    if overwrite:
        write_output(out, fsync=False)
    synced = _count_fsyncs(monkeypatch)
    writer = write_output(out, overwrite=overwrite)
    tmp = str(writer.tmp_dir)
    shards = {s.filename for s in writer.shards}
    assert len(shards) > 2
    for name in [*shards, io.INDEX_NAME]:
        assert f"{tmp}/{name}" in synced, name
    assert tmp in synced  # the staging directory's entries, before publishing
    assert synced[-1] == str(tmp_path)  # the parent, after the rename
    assert_output(out, specs_and_values()[1])


def test_no_fsync_at_all_with_fsync_false(tmp_path, monkeypatch):
    synced = _count_fsyncs(monkeypatch)
    write_output(tmp_path / "out", fsync=False)
    write_output(tmp_path / "out", fsync=False, overwrite=True)
    assert synced == []
    assert_output(tmp_path / "out", specs_and_values()[1])


@pytest.mark.parametrize("write_behind_bytes", [0, io.writer.DEFAULT_WRITE_BEHIND_BYTES])
def test_a_full_disk_names_the_shard_and_leaves_nothing(tmp_path, monkeypatch, write_behind_bytes):
    real_write = os.write
    calls = []

    def write(fd, data):
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    out = tmp_path / "out"
    with pytest.raises(io.CheckpointError) as failure:
        write_output(out, write_behind_bytes=write_behind_bytes)
    message = str(failure.value)
    assert "No space left on device" in message
    assert ".tmp/model-0000" in message and "-of-0000" in message and ".safetensors:" in message
    assert not out.exists() and entries(tmp_path) == []


def test_a_lock_file_deleted_before_it_is_locked_is_made_again(tmp_path, monkeypatch):
    """A cleaning run may take and delete a new lock file before its run locks it."""
    real_flock = fcntl.flock
    deleted = []

    def flock(fd, operation):
        if not deleted:
            path = os.readlink(f"/proc/self/fd/{fd}")
            os.unlink(path)  # what clean_leftovers does to an unlocked lock file
            deleted.append(path)
        return real_flock(fd, operation)

    monkeypatch.setattr(publish.fcntl, "flock", flock)
    stage = publish.Staging(tmp_path / "out", publish.new_run_id())
    monkeypatch.setattr(publish.fcntl, "flock", real_flock)
    assert deleted == [str(stage.lock_path)]
    assert stage.lock_path.exists() and publish._try_lock(stage.lock_path) is None
    stage.remove()
    assert entries(tmp_path) == []


class _Stop(BaseException):
    pass


@pytest.mark.parametrize("works", [True, False], ids=["exchange", "fallback"])
def test_a_signal_while_the_output_moves_acts_once_it_is_in_place(tmp_path, monkeypatch, works):
    out = tmp_path / "out"
    old_values = {k: -v for k, v in specs_and_values()[1].items()}
    write_output(out, old_values)
    real_exchange, real_replace = publish.exchange, os.replace
    seen = []

    def exchange(a, b):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the first rename
        return real_exchange(a, b) if works else False

    def replace(src, dst):
        result = real_replace(src, dst)
        seen.append(os.path.isdir(out))  # no signal handler ran in between
        return result

    def stop(signum, frame):
        seen.append("handler")
        raise _Stop

    monkeypatch.setattr(publish, "exchange", exchange)
    monkeypatch.setattr(publish.os, "replace", replace)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(_Stop):
            write_output(out, overwrite=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen[-1] == "handler"
    assert signal.getsignal(signal.SIGTERM) is previous
    assert_output(out, specs_and_values()[1])  # the new output, complete
    assert entries(tmp_path) == []
