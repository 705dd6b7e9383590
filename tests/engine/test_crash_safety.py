"""Crash safety of ``fastmerge merge``: the command runs in a subprocess that stops at a
chosen point (a wrapper script patches a hook there to print a marker and wait) and is
killed there with SIGKILL, SIGTERM or SIGINT. Afterwards ``--out`` holds exactly what it
held before or the complete new output (tensor by tensor the uninterrupted run's, every
shard in the index); TERM and INT exit with 128 + the signal and one line, leaving no run
files; after SIGKILL the next run removes (or puts back) what was left, with a note. The
next run always succeeds and leaves nothing beside ``--out``. The distributed variant
kills one of two gloo ranks mid-merge.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from fastmerge.cli import main
from fastmerge.io import open_checkpoint, publish

SHARD_SIZE = "300KB"
WAIT_S = 60  # for a marker, or for a killed process to exit
TORCH_LOG = re.compile(r"\[rank\d+\]:\[[EWI]\d{4} ")

# Runs the CLI with one pause point (CRASH_POINT) patched in: prints a marker line, then
# waits until a signal arrives (the wakeup fd wakes the select; a handler that raises
# ends the wait there, one that only notes the signal lets the run go on).
WRAPPER = r"""
import os, select, signal, sys
from pathlib import Path

from fastmerge.cli import main
from fastmerge.io import publish, writer

POINT, OUT = os.environ.get("CRASH_POINT", "none"), os.path.abspath(os.environ["CRASH_OUT"])


def pause(marker):
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w)
    print(marker, flush=True)
    try:
        select.select([r], [], [], 60)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(r)
        os.close(w)


def wrap(owner, name, before=None, after=None):
    real = getattr(owner, name)

    def hooked(*args, **kwargs):
        if before is not None:
            before(*args)
        result = real(*args, **kwargs)
        if after is not None:
            after(result, *args)
        return result

    setattr(owner, name, hooked)


kind, _, arg = POINT.partition(":")
if kind == "started":  # the run's lock and staging directory exist, nothing merged yet
    wrap(writer.ShardedWriter, "__init__", after=lambda *a: pause("STARTED"))
elif kind == "write":  # after the arg-th tensor is handed to the writer
    count = [0]

    def counted(*args):
        count[0] += 1
        if count[0] == int(arg):
            pause(f"WRITING {arg}")

    wrap(writer.ShardedWriter, "write", after=counted)
elif kind == "publish":  # every shard and the index written, nothing renamed yet
    wrap(publish.Staging, "publish", before=lambda *a: pause("PUBLISHING"))
elif kind == "renamed":  # the output renamed into place, its parent not yet fsynced
    parent = Path(OUT).parent.resolve()
    wrap(publish, "fsync_path", before=lambda p: Path(p) == parent and pause("RENAMED"))
elif kind == "exchanged":  # the old output swapped into the staging directory
    wrap(publish, "exchange", after=lambda done, a, b: done and pause("EXCHANGED"))
elif kind == "moved-aside":  # no RENAME_EXCHANGE: the old output renamed to .old
    publish.exchange = lambda a, b: False
    wrap(os, "replace", after=lambda r, src, dst: os.path.abspath(src) == OUT
         and pause("MOVED-ASIDE"))
sys.exit(main(sys.argv[1:]))
"""


# ---- inputs and the reference outputs --------------------------------------------------


def _save_model(path, tensors) -> None:
    """A Hugging Face directory with two safetensors shards and their index."""
    path.mkdir()
    names = sorted(tensors)
    files = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    for f in sorted(set(files.values())):
        safetensors.torch.save_file({n: tensors[n] for n in names if files[n] == f}, path / f)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))


def _config(root, method: str) -> str:
    text = f"merge_method: {method}\n"
    if method == "ties":
        text += f"base_model: {root / 'base'}\n"
    text += "models:\n"
    extra = ", density: 0.5" if method == "ties" else ""
    for name, weight in [("a", 0.6), ("b", 0.4)]:
        text += f"  - model: {root / name}\n    parameters: {{weight: {weight}{extra}}}\n"
    if method == "linear":
        text += f"  - model: {root / 'base'}\n    parameters: {{weight: 0.2}}\n"
    path = root / f"{method}.yaml"
    path.write_text(text)
    return str(path)


class Output:
    """A reference output: its tensors and its file names."""

    def __init__(self, path) -> None:
        self.tensors = dict(open_checkpoint(path).items())
        self.files = sorted(os.listdir(path))

    def matches(self, path) -> bool:
        if sorted(os.listdir(path)) != self.files:
            return False
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shards = {f for f in self.files if f.endswith(".safetensors")}
        assert set(index["weight_map"].values()) == shards  # every shard, nothing else
        got = dict(open_checkpoint(path).items())
        return got.keys() == self.tensors.keys() and all(
            got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in self.tensors.items()
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three models (10 tensors of 128 KB, two shards each: 4 MB in all), the config of
    the new output (TIES) and of an old, different one (linear), and their outputs."""
    root = tmp_path_factory.mktemp("crash")
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(128, 256, generator=g) for i in range(10)}
    _save_model(root / "base", base)
    for name in ("a", "b"):
        _save_model(root / name, {k: v + 0.1 * torch.randn(v.shape, generator=g)
                                  for k, v in base.items()})  # fmt: skip
    new, old = _config(root, "ties"), _config(root, "linear")
    for config, out in [(new, root / "new"), (old, root / "old")]:
        args = ["merge", config, "--out", str(out), "--quiet", "--shard-size", SHARD_SIZE]
        assert main(args) == 0
    new_output, old_output = Output(root / "new"), Output(root / "old")
    assert len([f for f in new_output.files if f.endswith(".safetensors")]) >= 4
    name = "layers.0.weight"
    assert not torch.equal(new_output.tensors[name], old_output.tensors[name])
    wrapper = root / "crash_wrapper.py"
    wrapper.write_text(WRAPPER)
    return {"root": root, "new": new, "old": old, "new_output": new_output,
            "old_output": old_output, "wrapper": wrapper}  # fmt: skip


# ---- running and killing -------------------------------------------------------------------


def start(setup, out, point, args=(), env=None) -> subprocess.Popen:
    env = dict(os.environ, CRASH_POINT=point, CRASH_OUT=str(out), OMP_NUM_THREADS="1",
               **(env or {}))  # fmt: skip
    command = [sys.executable, str(setup["wrapper"]), "merge", setup["new"], "--out", str(out),
               "--quiet", "--shard-size", SHARD_SIZE, *args]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # fmt: skip


def wait_for_marker(process: subprocess.Popen, marker: str) -> None:
    deadline = time.monotonic() + WAIT_S
    line = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = process.stdout.readline()
        if line.startswith(marker) or not line:
            break
    if not line.startswith(marker):
        process.kill()
        _, err = process.communicate(timeout=WAIT_S)
        pytest.fail(f"no {marker!r} from the run (got {line!r}); stderr:\n{err}")


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"the run did not exit within {WAIT_S} s after the signal; stderr:\n{err}")
    return process.returncode, err


def run_files(parent) -> list[str]:
    return sorted(p for p in os.listdir(parent) if ".fastmerge-" in p)


def state(setup, out) -> str:
    """absent, old or new: what --out holds (anything else fails the test)."""
    if not os.path.lexists(out):
        return "absent"
    for name in ("new", "old"):
        if setup[f"{name}_output"].matches(out):
            return name
    pytest.fail(f"{out} holds neither the old nor the new output: {sorted(os.listdir(out))}")


def check_signal_exit(sig, code: int, err: str, published: bool) -> None:
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        return
    name = signal.Signals(sig).name
    assert code == 128 + sig, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    done = "the output was complete and is published" if published else "nothing was written"
    assert err == f"fastmerge merge: interrupted by {name}; {done}\n"


def staging_left(parent, sig) -> list:
    """The staging directories beside the output after the kill (none after TERM, INT, and
    no lock file either)."""
    left = run_files(parent)
    if sig != signal.SIGKILL:
        assert left == []
    return [parent / p for p in left if p.endswith(".tmp")]


def assert_noted(staged, notes) -> None:
    """Each staging directory of a killed run is gone, and a note names it."""
    for tmp in staged:
        assert not tmp.exists()
        assert any(n.endswith(f"MB left by an interrupted run: {tmp}") for n in notes), notes


def rerun(setup, out, capsys) -> list[str]:
    """The next, uninterrupted run (in this process); its notes."""
    capsys.readouterr()
    args = ["merge", setup["new"], "--out", str(out), "--shard-size", SHARD_SIZE]
    assert main(args + (["--overwrite"] if os.path.lexists(out) else [])) == 0
    err = capsys.readouterr().err
    assert setup["new_output"].matches(out)
    assert run_files(out.parent) == []
    return [line for line in err.splitlines() if line.startswith("fastmerge merge: note: ")]


@contextlib.contextmanager
def after(sig):
    """Failures name the signal (several runs are checked in one test)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"after {signal.Signals(sig).name}: {exc}") from None


def crash_each(setup, tmp_path, point, marker, signals, overwrite=False) -> list:
    """One run per signal, each in its own parent directory (over a copy of the old
    output with `overwrite`), started together; once all are at `point`, each gets its
    signal. (signal, out, exit status, stderr) for each."""
    runs = []
    try:
        for sig in signals:
            out = tmp_path / signal.Signals(sig).name / "merged"
            out.parent.mkdir()
            if overwrite:
                shutil.copytree(setup["root"] / "old", out)
            args = ["--overwrite"] if overwrite else []
            runs.append((sig, out, start(setup, out, point, args)))
        for _, _, process in runs:
            wait_for_marker(process, marker)
        for sig, _, process in runs:
            process.send_signal(sig)
        return [(sig, out, *finish(process)) for sig, out, process in runs]
    finally:
        for _, _, process in runs:
            if process.poll() is None:
                process.kill()
                process.communicate()


ALL = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
#: (pause point, marker, what --out holds after the kill) for a new output.
FRESH = [("started", "STARTED", "absent"), ("write:4", "WRITING 4", "absent"),
         ("publish", "PUBLISHING", "absent"), ("renamed", "RENAMED", "new")]  # fmt: skip


@pytest.mark.parametrize("point, marker, expected", FRESH, ids=[p[0] for p in FRESH])
def test_killed_run_leaves_nothing_or_the_whole_output(
    setup, tmp_path, capsys, point, marker, expected
):
    for sig, out, code, err in crash_each(setup, tmp_path, point, marker, ALL):
        with after(sig):
            assert state(setup, out) == expected
            check_signal_exit(sig, code, err, published=expected == "new")
            staged = staging_left(out.parent, sig)
            assert_noted(staged, rerun(setup, out, capsys))


#: (pause point, marker, what --out holds after SIGKILL, after TERM and INT, the signals)
#: when an old output is replaced with --overwrite; "moved-aside" is the fallback without
#: RENAME_EXCHANGE, where only the next run puts the old output back after SIGKILL.
#: SIGINT before the renames is handled as SIGTERM is (the fresh-output test has both).
OVERWRITE = [("write:4", "WRITING 4", "old", "old", ALL[:2]),
             ("publish", "PUBLISHING", "old", "old", ALL[:2]),
             ("exchanged", "EXCHANGED", "new", "new", ALL),
             ("moved-aside", "MOVED-ASIDE", "absent", "new", ALL)]  # fmt: skip


@pytest.mark.parametrize("point, marker, killed, stopped, signals", OVERWRITE,
                         ids=[p[0] for p in OVERWRITE])  # fmt: skip
def test_killed_overwrite_leaves_the_old_or_the_new_output(
    setup, tmp_path, capsys, point, marker, killed, stopped, signals
):
    if point == "exchanged":
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        if not publish.exchange(a, b):
            pytest.skip("this file system has no renameat2(RENAME_EXCHANGE)")
        a.rmdir()
        b.rmdir()
    for sig, out, code, err in crash_each(setup, tmp_path, point, marker, signals, True):
        with after(sig):
            expected = killed if sig == signal.SIGKILL else stopped
            assert state(setup, out) == expected
            check_signal_exit(sig, code, err, published=expected == "new")
            staged = staging_left(out.parent, sig)
            if expected == "absent":  # killed between the renames: the old one goes back
                notes = publish.clean_leftovers(out)  # (the next run's first step)
                assert f"restored {out}, which an interrupted run was replacing" in notes
                assert state(setup, out) == "old" and run_files(out.parent) == []
                assert_noted(staged, notes)
                staged = []
            assert_noted(staged, rerun(setup, out, capsys))


# ---- two ranks -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.parametrize("other", ["waits", "SIGTERM"])
def test_killing_one_of_two_ranks_leaves_nothing(setup, tmp_path, capsys, other):
    """Rank 1 is killed with -9 mid-merge; rank 0 either finds out by itself (at the vote
    before publishing: exit 2, one line) or is sent SIGTERM as torchrun does (143)."""
    out = tmp_path / "merged"
    port = str(_free_port())
    ranks = []
    for rank in (0, 1):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}  # fmt: skip
        point = "write:2" if rank == 1 or other == "SIGTERM" else "none"
        ranks.append(start(setup, out, point, ["--timeout", "10"], env))
    if other == "SIGTERM":
        wait_for_marker(ranks[0], "WRITING 2")
    wait_for_marker(ranks[1], "WRITING 2")
    ranks[1].send_signal(signal.SIGKILL)
    if other == "SIGTERM":
        ranks[0].send_signal(signal.SIGTERM)
    code, err = finish(ranks[0])
    assert finish(ranks[1])[0] == -signal.SIGKILL
    assert "Traceback" not in err, err
    # torch's own C++ log ("[rank0]:[E1204 04:13:54.03 ProcessGroupGloo.cpp:2901] ...")
    # may come first; fastmerge's part is its one line
    err = "".join(line for line in err.splitlines(True) if not TORCH_LOG.match(line))
    assert len(err.splitlines()) == 1, err
    if other == "SIGTERM":
        assert code == 143
        assert err == "fastmerge merge: interrupted by SIGTERM; nothing was written\n"
    else:
        assert code == 2 and err.startswith("fastmerge merge: error (rank 0 of 2): "), err
        assert "rank 0 of 2: rank(s) 1 did not answer" in err, err
    assert not out.exists() and run_files(tmp_path) == []
    rerun(setup, out, capsys)
