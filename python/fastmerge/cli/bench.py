"""``fastmerge bench [OP|all]``: argument handling of the benchmarks in :mod:`fastmerge.bench`.

The suites ship with the wheel, so this works from any directory; the repository's
``bench/`` keeps only what needs the source tree (the merge CLI against mergekit, quality
studies, the results pages).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["scope_stats", "--quick"]).quick
        True
    """
    parser.add_argument("op", nargs="?", default="all", help="a suite (see --list) or all")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows here")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _error(message: str) -> int:
    print(f"fastmerge bench: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def bench_command(args: argparse.Namespace) -> int:
    """Run the chosen suites and print the table; 2 on bad input, 1 if a fastmerge case
    failed.

    Example:
        $ fastmerge bench --list
        $ fastmerge bench call_overhead --quick --json overhead.json
    """
    from fastmerge import bench  # lazily: the CLI's import stays light

    if args.list:
        for name in bench.SUITES:
            print(f"{name:18} {bench.summary(name)}")
        return 0
    if args.op != "all" and args.op not in bench.SUITES:
        return _error(f"unknown op {args.op!r}; valid: all, {', '.join(bench.SUITES)}")
    if args.device not in ("cpu", "cuda"):
        return _error(f"unknown device {args.device!r}; valid: cpu, cuda")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: torch sees no CUDA GPU on this machine")
    if args.json is not None and not args.json.parent.is_dir():
        return _error(f"--json {args.json}: directory {args.json.parent} does not exist")
    suites = list(bench.SUITES) if args.op == "all" else [args.op]
    result = bench.run(suites, device=args.device, quick=args.quick, progress=not args.no_progress)
    print(result.text())
    if args.json is not None:
        from fastmerge.bench._report import write_json

        write_json(args.json, result.rows, result.machine)
        print(f"wrote {len(result.rows)} rows to {args.json}")
    for failure in result.failures:
        print(f"fastmerge bench: error: {failure}", file=sys.stderr)
    return 1 if result.failures else 0
