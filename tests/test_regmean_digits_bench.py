"""Smoke test of the RegMean quality benchmark (bench/quality/regmean_digits.py): its wiring,
not its figures. Needs scikit-learn (the `quality` extra); skipped without it."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
# One-epoch experts have dead ReLU units: singular Grams, solved with the fallback ridge.
pytestmark = pytest.mark.filterwarnings("ignore:.*Gram matrix of layer:RuntimeWarning")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality" / "regmean_digits.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("regmean_digits", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.td.TA_SCALES = (0.3, 1.0)  # small grids: the test checks the plumbing
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def experiment(bench):
    digits = {s: (x[:150], y[:150]) for s, (x, y) in bench.td.load_digits_split().items()}
    return bench.td.Experiment("conflict", digits, seed=0, epochs={"pretrain": 1, "finetune": 1})


def test_regmean_of_one_expert_with_itself_reproduces_it(bench, experiment):
    # Two copies of one expert on its own data: RegMean (any alpha) returns that expert, so
    # its accuracies are the expert's up to one test sample flipped by rounding (the ridge
    # of a dead ReLU unit's singular Gram); a wrong layer, input or head costs far more.
    expert, data = experiment.experts[0], bench.task_batches(experiment)[0]
    merged = bench.merge.regmean([expert, expert], [data, data], alpha=0.5).state_dict()
    got = experiment.static_accuracies(merged, "test")[0]
    assert abs(got - experiment.expert_acc["test"][0]) <= 100.0 / 150 + 1e-9


def test_run_reports_every_method_with_its_knobs(bench, experiment):
    result = bench.run_seed(experiment, alphas=(0.5, 0.9), biases=("average",), labels=("model",))
    assert set(result["normalized"]) == set(bench.METHODS)
    assert result["knobs"]["regmean"]["alpha"] in (0.5, 0.9)
    summary = bench.summarize([result])
    text = bench.markdown(summary, {"quick": True, "machine": "m", "torch": "t", "seeds": [0],
                                    "epochs": {}, "load_before": [], "load_after": [],
                                    "seconds": 1.0})  # fmt: skip
    assert "| regmean++ |" in text and "target >= +3" in text
