"""``fastmerge extract-lora``: argument handling only; the work is
:func:`fastmerge.lora.extract_lora`."""

from __future__ import annotations

import argparse
import sys

#: Exit status for bad input (missing/corrupt files, bad rank, existing output).
EXIT_BAD_INPUT = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastmerge extract-lora``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> a = p.parse_args(["--base", "b", "--model", "m", "--out", "o", "--rank", "8"])
        >>> a.rank, a.energy, a.device
        (8, None, 'cpu')
    """
    p.add_argument("--base", required=True, help="the base model (directory or .safetensors)")
    p.add_argument("--model", required=True, help="the fine-tuned model of the same architecture")
    p.add_argument("--out", required=True, help="the adapter's directory (created atomically)")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--rank", type=int, default=None, help="rank of every module (default 16)")
    choice.add_argument(
        "--energy",
        type=float,
        default=None,
        help="per-module rank: keep this fraction of each delta's squared "
        "Frobenius norm, e.g. 0.99",
    )
    p.add_argument(
        "--max-rank",
        type=int,
        default=128,
        help="with --energy: the largest rank a module may get (default 128)",
    )
    p.add_argument(
        "--modules",
        default=None,
        help="regular expression searched in module names (default: every 2-D weight that differs)",
    )
    p.add_argument("--device", default="cpu", help="where the SVDs run: cpu or cuda[:N]")
    p.add_argument(
        "--exact",
        action="store_true",
        help="exact SVD (torch.linalg.svd) instead of the randomized one",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no per-module report")


def _error(message: str) -> int:
    message = " ".join(message.split())[:2000]
    print(f"fastmerge extract-lora: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def extract_lora_command(args: argparse.Namespace) -> int:
    """Run ``fastmerge extract-lora`` from parsed arguments: 0 on success (the per-module
    report on stdout), 2 with a one-line message on stderr for bad input (nothing is
    written then).

    Example:
        $ fastmerge extract-lora --base ./base --model ./ft --rank 16 --out ./ft-lora
    """
    from ..engine.run import check_device
    from ..lora import extract_lora

    try:
        device = check_device(args.device)
        report = extract_lora(
            args.base,
            args.model,
            args.out,
            rank=args.rank,
            energy=args.energy,
            max_rank=args.max_rank,
            modules=args.modules,
            device=device,
            seed=args.seed,
            method="exact" if args.exact else "randomized",
            overwrite=args.overwrite,
            progress=not (args.no_progress or args.quiet),
        )
    except (ValueError, OSError, RuntimeError) as exc:
        return _error(str(exc) or type(exc).__name__)
    if not args.quiet:
        print(report.text())
    return 0
