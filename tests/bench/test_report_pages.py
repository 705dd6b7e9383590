"""``bench/report.py pages``: writes a page per results file, the index and the three plots
from a temp copy of a few results files; the old ``report.py RAW.json`` usage still works."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "bench" / "report.py"
FILES = ("linear_assignment-cpu", "merge_methods-cpu", "merge_della-cpu", "twin-cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, str(REPORT), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_pages_mode_writes_pages_index_and_plots(tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs" / "benchmarks"
    results.mkdir()
    for stem in FILES + ("rebasin_digits",):
        shutil.copy(ROOT / "bench" / "results" / f"{stem}.json", results)
    shutil.copy(ROOT / "bench" / "results" / "rebasin_digits.md", results)
    done = _run("pages", "--results", str(results), "--out", str(out))
    assert done.returncode == 0, done.stderr
    for png in ("lap_time_vs_n.png", "merge_time_per_method.png", "twin_latency_vs_tokens.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
    index = (out / "results.md").read_text()
    for stem in FILES + ("rebasin_digits",):
        assert f"[{stem}]({stem}.md)" in index
        assert (out / f"{stem}.md").read_text().startswith(f"# {stem}\n\nMachine: ")
    methods = json.loads((results / "merge_methods-cpu.json").read_text())
    page = (out / "merge_methods-cpu.md").read_text()
    assert methods["machine"]["cpu"] in page and "[merge_della-cpu](merge_della-cpu.md)" in page
    assert "| `ties` |" in page and "merge_time_per_method.png" in page
    assert "A newer run than" in (out / "merge_della-cpu.md").read_text()
    # The embedded .md keeps no link to a file outside docs/ (an MkDocs --strict error).
    for md in out.glob("*.md"):
        for target in re.findall(r"\]\(([^)]+)\)", md.read_text()):
            assert (out / target).exists(), (md.name, target)
    assert not list(out.glob(".*")), "a temporary file was left behind"


def test_pages_mode_names_an_empty_results_folder(tmp_path):
    done = _run("pages", "--results", str(tmp_path), "--out", str(tmp_path / "out"))
    assert done.returncode != 0 and "no *.json results in" in done.stderr


def test_raw_usage_still_writes_tables(tmp_path):
    raw = {
        "machine_info": {"fastmerge": {"cpu": "test-cpu", "cores": 2}},
        "benchmarks": [
            {
                "group": "g",
                "name": name,
                "stats": {"median": median, "data": [median] * 3, "q1": median, "q3": median},
                "extra_info": {"op": "ties", "provider": name},
            }
            for name, median in (("fastmerge", 0.001), ("torch.kthvalue-loop", 0.004))
        ],
    }
    path = tmp_path / "x.raw.json"
    path.write_text(json.dumps(raw))
    done = _run(str(path), "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "| `fastmerge` | 1.000 |" in (tmp_path / "x.md").read_text()
