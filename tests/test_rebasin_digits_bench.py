"""Smoke test of the Git Re-Basin quality benchmark (bench/quality/rebasin_digits.py): its
wiring, not its figures. Needs scikit-learn (the `quality` extra); skipped without it."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality" / "rebasin_digits.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("rebasin_digits", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.digits.EPOCHS = {"mlp": 1, "resnet": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add contention
    yield module
    torch.set_num_threads(threads)


def test_quick_pairs_run_end_to_end(bench, tmp_path):
    full = bench.digits.load_data()
    data = {s: (full[s][0][:200], full[s][1][:200]) for s in ("train", "val", "test")}
    results = {arch: [bench.run_pair(arch, 0, data, alphas=3)] for arch in bench.ARCHS}
    for recs in results.values():
        rec = recs[0]
        assert set(bench.PATHS) <= set(rec)
        for path in bench.PATHS:
            assert rec[path]["loss_barrier"] >= 0
            assert rec[path]["curve"]["alphas"] == [0.0, 0.5, 1.0]
        # Every path starts at model a and ends at (a permutation of) model b.
        ends = {p: rec[p]["curve"]["metrics"]["loss"] for p in bench.PATHS}
        for p in ("weights", "activations"):
            assert ends[p][0] == pytest.approx(ends["raw"][0], rel=1e-5)
            assert ends[p][-1] == pytest.approx(ends["raw"][-1], rel=1e-4)
        assert rec["weights"]["sweeps"] >= 1
    summary = bench.summarize(results)
    assert "weight matching / raw barrier" in bench.table(summary, 1)
    bench.plot(results, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_wider_resnets(bench):
    assert [bench.width(a) for a in ("mlp", "resnet", "resnet-x4")] == [0, 1, 4]
    with pytest.raises(ValueError, match="unknown arch"):
        bench.width("resnet-xx")
    full = bench.digits.load_data()
    data = {s: (full[s][0][:100], full[s][1][:100]) for s in ("train", "val", "test")}
    a, b = bench.train_pair("resnet-x2", 0, data)
    assert a.conv1.out_channels == 64 and a.fc.in_features == 128
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
    assert bench.digits.build("resnet").conv1.out_channels == 32  # restored
