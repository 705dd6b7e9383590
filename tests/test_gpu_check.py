"""bench/gpu_check.sh without a GPU: the dry run lists every stage with its command and
timeout, reports the wheel directory, writes the report and exits 0; the report of a
real run (from a synthetic stage table and results) says what was skipped and why."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = [
    "peers:wheels", "peers:lapjv", "peers:torch_linear_assignment", "wheel", "wheel:contents",
    "wheel:install", "info", "tests-gpu", "tests-build", "tests-cpu", "device",
    "bench:scope_stats", "bench:linear_assignment", "bench:feature_stats",
    "bench:least_squares", "bench:lowrank_mixture", "merge",
]  # fmt: skip

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _dry_run(tmp_path: Path, *args: str, wheels: Path) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(wheels)}
    env.pop("OUT", None)
    out = tmp_path / "report"
    result = subprocess.run(
        ["bash", str(SCRIPT), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    reports = list(out.glob("gpu_check-*.md"))
    assert len(reports) == 1, (result.stdout, result.stderr)
    return result, reports[0].read_text()


def test_dry_run_lists_every_stage_and_its_command(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name in ("lap-0.5.13-cp312-cp312-manylinux_2_28_x86_64.whl", "lapjv-1.3.29.tar.gz"):
        (wheels / name).write_bytes(b"")
    result, report = _dry_run(tmp_path, "--dry-run", wheels=wheels)
    assert result.returncode == 0, result.stderr
    assert "**Dry run** (--dry-run)" in report
    for stage in STAGES:
        assert f"| {stage} |" in report, stage
    assert report.count("| would run |") == len(STAGES) - 2  # tests-cpu off; no tla sdist
    assert "no torch_linear_assignment sdist in .whl/" in report
    assert "holds 2 file(s): lap-0.5.13" in report
    assert "pip wheel --no-build-isolation --no-deps" in report
    assert "TRITON_INTERPRET=0" in report and "-m pytest tests -q -m cuda" in report
    for suite in ("scope_stats", "linear_assignment", "feature_stats", "least_squares"):
        assert f"-m fastmerge bench {suite} --device cuda --quick" in report
    assert "gpu_check_stages.py' merge" in report
    # The commands are listed on stdout too, each with its timeout.
    assert "[dry-run] wheel (timeout 240s):" in result.stdout


def test_dry_run_reports_a_missing_wheel_directory(tmp_path):
    result, report = _dry_run(tmp_path, "--dry-run", wheels=tmp_path / "absent")
    assert result.returncode == 0, result.stderr
    assert "is absent: the lap, lapjv and torch-linear-assignment rows will be skipped" in report
    assert "| peers:wheels | skipped |" in report


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may be here")
def test_without_a_gpu_the_script_runs_dry_by_itself(tmp_path):
    result, report = _dry_run(tmp_path, wheels=tmp_path / "absent")
    assert result.returncode == 0, result.stderr
    assert "**Dry run** (no GPU:" in report
    assert "| wheel | would run |" in report


def test_unknown_arguments_are_refused():
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr


def _stages_module():
    spec = importlib.util.spec_from_file_location(
        "gpu_check_stages", SCRIPT.parent / "gpu_check_stages.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_of_a_run_says_what_was_skipped_and_shows_the_results(tmp_path):
    stages = tmp_path / "stages.tsv"
    stages.write_text(
        "wheel\tok\t71\t\n"
        "tests-gpu\tfailed\t90\texit 1; see the log\n"
        "merge\tskipped\t\t20s of the 480s budget left, it needs 60s\n"
    )
    (tmp_path / "device.json").write_text(json.dumps({
        "name": "NVIDIA H200", "multiprocessors": 132, "memory_gib": 139.8, "capability": "9.0",
        "torch": "2.11.0", "torch_cuda": "13.0", "nvidia_smi": "NVIDIA H200, 580",
        "copy_gb_per_s": 4300.0, "copy_bytes": 1 << 30,
    }))  # fmt: skip
    (tmp_path / "bench-scope_stats.json").write_text(json.dumps({"rows": [
        {"case": "resnet50", "provider": "fastmerge-cuda", "median": 0.001, "unit": "s",
         "ratio": 1.0},
        {"case": "resnet50", "provider": "torch.std_mean-loop", "median": 0.02, "unit": "s",
         "ratio": 20.0},
    ]}))  # fmt: skip
    (tmp_path / "tests-gpu.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.ops.test_x" name="test_a"><failure/></testcase>'
        '<testcase classname="tests.ops.test_x" name="test_b"/></testsuite></testsuites>'
    )
    out = tmp_path / "gpu_check.md"
    module = _stages_module()
    assert module.report_stage(stages, tmp_path, out, ["Date: today"]) == 0
    text = out.read_text()
    assert "| tests-gpu | failed | 90 | exit 1; see the log |" in text
    assert "- **merge** skipped: 20s of the 480s budget left, it needs 60s" in text
    assert "**4300.0 GB/s**" in text
    assert "| resnet50 | torch.std_mean-loop | 0.02 | s | 20.00 |" in text
    assert "3 tests: 1 passed, 1 failed, 0 errors, 1 skipped" in text
    assert "`tests.ops.test_x::test_a`" in text
