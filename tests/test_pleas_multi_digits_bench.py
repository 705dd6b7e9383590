"""Smoke test of the three-model PLeaS quality benchmark (bench/quality/pleas_multi_digits.py):
its wiring, not its figures. Needs scikit-learn (the `quality` extra); skipped without it."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality" / "pleas_multi_digits.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pleas_multi_digits", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add contention
    yield module
    torch.set_num_threads(threads)


def test_run_reports_every_method_and_budget(bench):
    data = bench.two.load_data()
    data["train"] = tuple(t[:200] for t in data["train"])  # a slice keeps it to seconds
    results = bench.run(
        (0,), ("disjoint",), ("mlp",), (1.0, 1.5), {"mlp": 1}, lambda s: None, data=data
    )
    cell = results["disjoint"]["mlp"]
    assert len(cell["models"]) == 1 and len(cell["models"][0]) == bench.N_MODELS
    assert set(bench.ROWS) <= set(cell)
    assert set(cell["pleas"]) == {"1.0", "1.5"} and set(cell["ensemble"]) == {"3.0"}
    assert all(0.0 <= a <= 100.0 for v in cell["pleas"].values() for a in v)
    checks = bench.targets(results)
    assert len(checks) == 1 and "pleas_minus_permute_at_1.0" in checks[0]
    table = bench.table(results, (1.0, 1.5))
    assert "| disjoint | mlp | pleas-iter |" in table and "| 3.0x |" in table
