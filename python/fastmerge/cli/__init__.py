"""The ``fastmerge`` command line: ``info``, ``merge`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .info import info_text

#: Exit status for bad input (missing/corrupt files, bad config, existing output).
EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmerge", description="fastmerge command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, built extensions, usable backends, threads, CUDA archs")
    m = sub.add_parser("merge", help="merge checkpoints from a (mergekit-style) YAML config")
    m.add_argument("config", help="YAML merge configuration")
    m.add_argument("--out", required=True, help="output directory (created atomically)")
    m.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    m.add_argument("--threads", type=int, default=None, help="CPU threads")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    m.add_argument("--shard-size", default="5GB", help="max output shard size (e.g. 2GB, 500MB)")
    m.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.pt checkpoints (loaded with weights_only=True)")  # fmt: skip
    m.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    b = sub.add_parser("bench", help="run benchmark suites (from a source checkout)")
    b.add_argument("op", nargs="?", default="all", help="suite name, e.g. merge_cli, or all")
    b.add_argument("--device", default=None, help="cpu or cuda: benchmark groups to keep")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``fastmerge`` console script.

    Example:
        $ fastmerge info
        $ fastmerge merge ties.yaml --out ./merged
        $ fastmerge bench merge_cli
    """
    args = _parser().parse_args(argv)
    if args.command == "info":
        print(info_text())
        return 0
    if args.command == "merge":
        from .merge import merge_command

        return merge_command(args)
    from .bench import bench_command

    return bench_command(args.op, args.device)


if __name__ == "__main__":
    sys.exit(main())
