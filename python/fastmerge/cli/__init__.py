"""The ``fastmerge`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .info import info_text


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``fastmerge`` console script.

    Example:
        $ fastmerge info
    """
    parser = argparse.ArgumentParser(prog="fastmerge", description="fastmerge command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, built extensions, usable backends, threads, CUDA archs")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
