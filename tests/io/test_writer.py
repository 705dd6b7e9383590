"""Sharded, atomic safetensors writing; the shard plan and the rank assignment."""

from __future__ import annotations

import json
import os
import threading

import pytest
import safetensors.torch
import torch

from fastmerge import io


def specs_and_values(sizes=(10, 3, 7, 1, 12, 5), dtype=torch.float32):
    values = {
        f"w{i}": torch.arange(n, dtype=torch.float64).to(dtype) + i for i, n in enumerate(sizes)
    }
    values["count"] = torch.tensor(7, dtype=torch.int64)
    values["half"] = torch.randn(3, 2).to(torch.bfloat16)
    specs = [io.TensorSpec(n, v.dtype, tuple(v.shape)) for n, v in values.items()]
    return specs, values


def leftovers(parent) -> list[str]:
    return sorted(p for p in os.listdir(parent) if p.startswith("."))


def test_shards_index_and_roundtrip_with_the_safetensors_library(tmp_path):
    specs, values = specs_and_values()
    out = tmp_path / "out"
    with io.ShardedWriter(out, specs, max_shard_bytes=48) as writer:
        for name in writer.order:
            writer.write(name, values[name])
        writer.add_file("config.json", b'{"a": 1}')
    index = json.loads((out / io.INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    loaded = {}
    for f in files:
        part = safetensors.torch.load_file(out / f)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 48 or len(part) == 1
        assert all(index["weight_map"][k] == f for k in part)
        loaded.update(part)
    assert sorted(loaded) == sorted(values)
    for name, v in values.items():
        assert torch.equal(loaded[name], v), name
    assert (out / "config.json").read_bytes() == b'{"a": 1}'
    assert leftovers(tmp_path) == []
    assert io.open_checkpoint(out)["w4"].tolist() == values["w4"].tolist()


def test_plan_keeps_order_and_gives_big_tensors_their_own_shard():
    specs = [
        io.TensorSpec(n, torch.float32, (s,)) for n, s in [("a", 2), ("b", 100), ("c", 3), ("d", 3)]
    ]
    shards = io.plan_shards(specs, max_shard_bytes=32)
    assert [[s.name for s in sh.specs] for sh in shards] == [["a"], ["b"], ["c", "d"]]


def test_partition_is_balanced_and_deterministic():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 1000, (200,), generator=gen).tolist()
    specs = [io.TensorSpec(f"t{i}", torch.float32, (s,)) for i, s in enumerate(sizes)]
    ranks = io.partition_names(specs, 4)
    assert ranks == io.partition_names(specs, 4)
    loads = [sum(s.nbytes for s, r in zip(specs, ranks) if r == k) for k in range(4)]
    assert max(loads) - min(loads) <= 4 * max(sizes)
    assert sorted(set(ranks)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="world_size"):
        io.partition_names(specs, 0)


def test_exception_mid_write_leaves_nothing(tmp_path):
    specs, values = specs_and_values()
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        with io.ShardedWriter(out, specs, max_shard_bytes=40) as writer:
            for i, name in enumerate(writer.order):
                if i == 3:
                    raise RuntimeError("interrupted")
                writer.write(name, values[name])
    assert not out.exists() and leftovers(tmp_path) == []


def test_unfinished_wrong_order_and_wrong_dtype(tmp_path):
    specs, values = specs_and_values()
    writer = io.ShardedWriter(tmp_path / "out", specs)
    with pytest.raises(ValueError, match="expected 'w0' next"):
        writer.write("w1", values["w1"])
    with pytest.raises(ValueError, match="planned torch.float32"):
        writer.write("w0", values["w0"].double())
    writer.write("w0", values["w0"])
    with pytest.raises(ValueError, match="was never written"):
        writer.commit()
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path):
    specs, values = specs_and_values()
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(io.CheckpointError, match="exists .*--overwrite"):
        io.ShardedWriter(out, specs)
    with io.ShardedWriter(out, specs, overwrite=True) as writer:
        for name in writer.order:
            writer.write(name, values[name])
    assert not (out / "old.txt").exists() and (out / io.INDEX_NAME).exists()
    assert leftovers(tmp_path) == []


def test_two_ranks_write_one_output(tmp_path):
    specs, values = specs_and_values(sizes=tuple(range(1, 30)))
    out = tmp_path / "out"
    barrier = threading.Barrier(2)
    errors = []
    run_id = io.new_run_id()  # the ranks of one run agree on it

    def rank(r):
        try:
            writer = io.ShardedWriter(
                out, specs, max_shard_bytes=64, rank=r, world_size=2, run_id=run_id
            )
            for name in writer.order:
                writer.write(name, values[name])
            writer.commit(barrier.wait)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ckpt = io.open_checkpoint(out)
    assert sorted(ckpt) == sorted(values)
    for name, v in values.items():
        assert torch.equal(ckpt[name], v)
    assert leftovers(tmp_path) == []


def _write_all(writer, values):
    for name in writer.order:
        writer.write(name, values[name])


@pytest.mark.parametrize("write_behind_bytes", [0, 1, 64, io.writer.DEFAULT_WRITE_BEHIND_BYTES])
def test_write_behind_budgets_give_the_same_files(tmp_path, write_behind_bytes):
    """Synchronous (0), a budget smaller than one tensor (every write waits for the
    previous one) and the default: byte-identical shards."""
    specs, values = specs_and_values(sizes=tuple(range(1, 40)))
    out = tmp_path / f"out{write_behind_bytes}"
    with io.ShardedWriter(
        out, specs, max_shard_bytes=100, write_behind_bytes=write_behind_bytes
    ) as writer:
        _write_all(writer, values)
    ckpt = io.open_checkpoint(out)
    for name, v in values.items():
        assert torch.equal(ckpt[name], v), name
    reference = tmp_path / "reference"
    with io.ShardedWriter(reference, specs, max_shard_bytes=100, write_behind_bytes=0) as w:
        _write_all(w, values)
    for f in sorted(os.listdir(reference)):
        assert (out / f).read_bytes() == (reference / f).read_bytes(), f


def test_flush_puts_the_bytes_in_the_file(tmp_path):
    specs = [io.TensorSpec("a", torch.float32, (1000,)), io.TensorSpec("b", torch.float32, (4,))]
    writer = io.ShardedWriter(tmp_path / "out", specs)
    writer.write("a", torch.ones(1000))
    writer.flush()
    (shard,) = [p for p in os.listdir(writer.tmp_dir) if p.endswith(".safetensors")]
    assert os.path.getsize(writer.tmp_dir / shard) >= 4000
    writer.abort()
    assert leftovers(tmp_path) == []


def test_a_failed_background_write_is_raised_and_leaves_nothing(tmp_path, monkeypatch):
    specs, values = specs_and_values(sizes=(1000, 1000, 1000, 1000))
    real_write = os.write
    calls = []

    def failing_write(fd, data):
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(io.writer.os, "write", failing_write)
    out = tmp_path / "out"
    with pytest.raises((OSError, io.CheckpointError), match="No space left"):
        with io.ShardedWriter(out, specs) as writer:
            _write_all(writer, values)  # the error comes at a later write or at commit
    assert not out.exists() and leftovers(tmp_path) == []
    assert not any(t.name == "fastmerge-writer" for t in threading.enumerate())


def test_a_tensor_changed_before_it_was_written_is_an_error(tmp_path, monkeypatch):
    specs = [io.TensorSpec("a", torch.float32, (1000,)), io.TensorSpec("b", torch.float32, (4,))]
    started, release = threading.Event(), threading.Event()
    real_write = os.write

    def slow_write(fd, data):
        if len(data) == 4000:
            started.set()
            release.wait(10)
        return real_write(fd, data)

    monkeypatch.setattr(io.writer.os, "write", slow_write)
    writer = io.ShardedWriter(tmp_path / "out", specs)
    a = torch.ones(1000)
    writer.write("a", a)
    assert started.wait(10)
    a.add_(1)  # while its bytes are being written
    release.set()
    with pytest.raises(RuntimeError, match="modified in place"):
        writer.write("b", torch.ones(4))
        writer.commit()
    writer.abort()
    assert leftovers(tmp_path) == []


def test_a_dropped_writer_stops_its_thread(tmp_path):
    import gc

    specs, values = specs_and_values()
    writer = io.ShardedWriter(tmp_path / "out", specs)
    writer.write(writer.order[0], values[writer.order[0]])
    assert any(t.name == "fastmerge-writer" for t in threading.enumerate())
    del writer
    gc.collect()
    assert not any(t.name == "fastmerge-writer" for t in threading.enumerate())
