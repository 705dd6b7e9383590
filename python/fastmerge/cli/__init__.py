"""The ``fastmerge`` command line: ``info``, ``merge``, ``extract-lora`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .bench import add_arguments as bench_arguments
from .extract_lora import add_arguments as extract_lora_arguments
from .info import info_text
from .merge import EXIT_BAD_INPUT, add_arguments

__all__ = ["EXIT_BAD_INPUT", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmerge", description="fastmerge command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, built extensions, usable backends, threads, CUDA archs")
    m = sub.add_parser("merge", help="merge checkpoints from a (mergekit-style) YAML config")
    add_arguments(m)
    e = sub.add_parser("extract-lora", help="write the PEFT LoRA adapter of a fine-tune's delta")
    extract_lora_arguments(e)
    b = sub.add_parser("bench", help="throughput benchmarks beside their peers (--list)")
    bench_arguments(b)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``fastmerge`` console script.

    Example:
        $ fastmerge info
        $ fastmerge merge ties.yaml --out ./merged
        $ fastmerge merge --list-methods
        $ fastmerge extract-lora --base ./base --model ./ft --rank 16 --out ./ft-lora
        $ fastmerge bench call_overhead --quick
    """
    args = _parser().parse_args(argv)
    if args.command == "info":
        print(info_text())
        return 0
    if args.command == "merge":
        from .merge import merge_command

        return merge_command(args)
    if args.command == "extract-lora":
        from .extract_lora import extract_lora_command

        return extract_lora_command(args)
    from .bench import bench_command

    return bench_command(args)


if __name__ == "__main__":
    sys.exit(main())
