"""``fastmerge bench``: runs from the installed package, writes the JSON schema, rejects bad
input with exit code 2, and notes a missing peer. Nothing here asserts on time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmerge import bench
from fastmerge.bench import _harness, _peers, _report
from fastmerge.bench._suite import Case
from fastmerge.cli import main

TINY = _harness.Budget(seconds=0.0, min_rounds=1, max_rounds=1)


@pytest.fixture
def tiny_budget(monkeypatch):
    """One round per case: these tests check the output, not the figures."""
    monkeypatch.setattr(_harness, "QUICK", TINY)


def test_quick_suite_runs_outside_the_source_tree_and_writes_the_schema(tmp_path):
    out = tmp_path / "rows.json"
    args = ["bench", "call_overhead", "--quick", "--no-progress", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "fastmerge", *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "machine: " in proc.stdout and "load average" in proc.stdout
    assert "### call_overhead" in proc.stdout
    assert "| linear_assignment | fastmerge |" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["columns"] == list(_report.COLUMNS)
    assert payload["machine"]["cores"] >= 1 and "torch" in payload["machine"]
    rows = payload["rows"]
    assert rows and all(list(r) == list(_report.COLUMNS) for r in rows)
    la = next(r for r in rows if r["case"] == "linear_assignment" and r["provider"] == "fastmerge")
    assert la["suite"] == "call_overhead" and la["unit"] == "s" and la["ratio"] == 1.0
    assert la["target"] == pytest.approx(5e-6) and la["median"] > 0


def test_unknown_op_exits_2_listing_the_valid_ones(capsys):
    assert main(["bench", "no_such_op"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown op 'no_such_op'" in err
    assert all(name in err for name in bench.SUITES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_exits_2(capsys):
    assert main(["bench", "call_overhead", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err


def test_list_shows_every_suite(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == list(bench.SUITES)


def test_a_missing_peer_is_one_note_not_an_error(monkeypatch, capsys, tiny_budget):
    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy` now raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    assert main(["bench", "call_overhead", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note:") and "scipy" in line]
    assert notes == [
        'note: scipy is not installed: its rows are skipped (pip install "fastmerge[bench]")'
    ]


def test_a_failing_peer_is_noted_and_the_run_goes_on(monkeypatch, tiny_budget):
    def broken() -> None:
        raise RuntimeError("peer broke")

    cases = [
        Case("g", "fastmerge", lambda: lambda: None, ours=True),
        Case("g", "peer", broken),
    ]
    monkeypatch.setattr(bench.call_overhead, "cases", lambda device, quick: cases)
    result = bench.run(["call_overhead"], quick=True, progress=False)
    assert [r["provider"] for r in result.rows] == ["fastmerge"] and not result.failures
    assert any("g peer failed: RuntimeError: peer broke" in n for n in _peers.take_notes())


@pytest.mark.parametrize("name", bench.SUITES)
def test_every_suite_lists_distinct_cases_with_a_fastmerge_row(name):
    module = __import__(f"fastmerge.bench.{name}", fromlist=["cases"])
    for quick in (True, False):
        cases = module.cases("cpu", quick)
        keys = [(c.case, c.provider) for c in cases]
        assert keys and len(set(keys)) == len(keys)
        assert all(any(c.ours for c in cases if c.case == g) for g, _ in keys if g != "yardstick")


def test_the_installed_package_holds_every_suite():
    """The suites ship in the wheel (pyproject's wheel.packages maps python/fastmerge)."""
    folder = Path(bench.__file__).parent
    assert all((folder / f"{name}.py").is_file() for name in bench.SUITES)
