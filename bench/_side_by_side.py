"""The shared ending of the side-by-side op scripts (bench_magprune.py, bench_sce.py): the
machine and load lines under a results table, and the command line that measures, writes
``bench/results/<name>.{md,json}`` and prints the table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent


def footer(result: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    """The lines after a results table: the machine, and the load average around the run."""
    before = ", ".join(f"{x:.2f}" for x in result["load_before"])
    after = ", ".join(f"{x:.2f}" for x in result["load_after"])
    return [
        "",
        f"Machine: {json.dumps(machine)}",
        f"Load average before: {before}; after: {after} (a shared machine: ratios only).",
        "",
    ]


def main(
    description: str,
    default_name: str,
    measure: Callable[[int], dict[str, Any]],
    report: Callable[[dict[str, Any], dict[str, Any]], str],
    argv: Optional[list[str]] = None,
) -> int:
    """``--rounds N --name NAME``: measure, write the results pages, print the table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--name", default=default_name)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from conftest import machine_description

    result = measure(args.rounds)
    machine = machine_description()
    result["machine"] = machine
    text = report(result, machine)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"{args.name}.md").write_text(text)
    (results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    return 0
