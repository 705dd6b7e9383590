"""Smoke test of the Twin-Merging quality benchmark (bench/quality/twin_digits.py): its
wiring, not its figures. Needs scikit-learn (the `quality` extra); skipped without it."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality" / "twin_digits.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("twin_digits", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up by name
    spec.loader.exec_module(module)
    # Small grids: the test checks the plumbing, not the tuning.
    module.TA_SCALES = (0.3, 1.0)
    module.TIES_GRID = ((0.2, 1.0),)
    module.DARE_GRID = ((0.5, 0.3),)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add contention
    yield module
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(bench):
    # A slice of every split keeps the test to seconds.
    return {s: (x[:150], y[:150]) for s, (x, y) in bench.load_digits_split().items()}


@pytest.mark.parametrize("set_name", ["conflict", "easy"])
def test_full_rank_oracle_twin_reproduces_every_expert(bench, digits, set_name):
    exp = bench.Experiment(set_name, digits, seed=0, epochs={"pretrain": 1, "finetune": 1})
    merger = bench.TwinMerger(exp.base_state, exp.expert_states, rank=1.0, progress=False)
    twin = exp.twin_model(merger)
    # One-hot gates at full rank rebuild each expert (its own output layer in `easy`), so
    # the oracle accuracies must be the experts' own (up to one test sample flipped by
    # rounding: a wrong layer or head costs far more).
    one_sample = 100.0 / len(digits["test"][1])
    got, want = exp.twin_accuracies(twin, oracle=True), exp.expert_acc["test"]
    assert len(got) == len(want) == 4
    assert all(abs(g - w) <= one_sample for g, w in zip(got, want)), (got, want)


def test_run_reports_every_method_and_the_sizes(bench, digits):
    exp = bench.Experiment("conflict", digits, seed=0, epochs={"pretrain": 1, "finetune": 1})
    result = exp.run()
    assert set(result["normalized"]) == set(bench.METHODS)
    assert len(result["router_accuracy"]) == 4
    ratios = [result["size"][f"{r:g}"]["ratio"] for r in bench.RANKS]
    assert ratios == sorted(ratios) and 0 < ratios[0] < ratios[-1] < 1
    summary = bench.summarize({"conflict": [result]})
    assert "Twin 10% (oracle routing)" in bench.tables(summary)
