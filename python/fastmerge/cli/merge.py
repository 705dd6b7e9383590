"""``fastmerge merge``: argument handling only; the work is :func:`fastmerge.engine.run`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading

#: Exit status for bad input (missing/corrupt files, bad config, existing output).
EXIT_BAD_INPUT = 2


def add_arguments(m: argparse.ArgumentParser) -> None:
    """The options of ``fastmerge merge``."""
    m.add_argument("config", nargs="?", help="YAML merge configuration (mergekit's format)")
    m.add_argument("--out", help="output directory (created atomically)")
    m.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    m.add_argument("--threads", type=int, default=None, help="CPU threads")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    m.add_argument("--shard-size", default="5GB", help="max output shard size (e.g. 2GB, 500MB)")
    m.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.pt checkpoints (loaded with weights_only=True)")  # fmt: skip
    m.add_argument("--trust-remote-code", action="store_true",
                   help="allow code named by the configuration to run (pleas' model/data "
                   "functions, tokenizers with custom code)")  # fmt: skip
    m.add_argument("--write-model-card", action="store_true",
                   help="write a README.md model card (method, models, configuration)")  # fmt: skip
    m.add_argument("--dry-run", action="store_true",
                   help="print the plan (tensors, bytes, parameters); write nothing")  # fmt: skip
    m.add_argument("--list-methods", action="store_true",
                   help="print the merge methods with their parameters and references")  # fmt: skip
    m.add_argument("--timeout", default="300",
                   help="torchrun: seconds a rank waits for the others (default 300)")  # fmt: skip
    m.add_argument("--no-fsync", action="store_true",
                   help="do not fsync the output before publishing (scratch merges)")  # fmt: skip
    m.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def _error(message: str, where: str = "") -> int:
    message = " ".join(message.split())[:2000]
    print(f"fastmerge merge: error{where}: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGINT raise :class:`~fastmerge.engine.errors.Interrupted` in the main
    thread while the merge runs, so that it removes what it wrote and the command exits
    with one line (128 + the signal's number), as a killed command should. One that comes
    while the output is being moved into place waits until it is there
    (:mod:`fastmerge.io.publish`); the line says so then."""
    from ..engine.errors import Interrupted

    def stop(signum, frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _directories(out: str) -> set:
    """(device, inode) of `out` and of the old outputs beside it that an interrupted run
    had moved aside (``.OUT.fastmerge-<id>.old``, which the next run puts back): an `out`
    that is none of these afterwards is the one this run published."""
    parent = os.path.dirname(os.path.abspath(out))
    prefix = f".{os.path.basename(os.path.abspath(out))}.fastmerge-"
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix) and n.endswith(".old")]
    except OSError:
        names = []
    found = set()
    for path in [out, *(os.path.join(parent, n) for n in names)]:
        try:
            st = os.stat(path)
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def _published(out: str, before: set) -> bool:
    """Whether `out` is now a directory that was not there (as `before`) at the start."""
    try:
        st = os.stat(out)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) not in before


def _seconds(text: str):
    """A positive, finite number of seconds (at most a week), or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value <= 7 * 86400 else None


def merge_command(args: argparse.Namespace) -> int:
    """Run ``fastmerge merge`` from parsed arguments: 0 on success, 2 with a one-line
    message on stderr for bad input (nothing is written then)."""
    from .. import engine

    if args.list_methods:
        print(engine.method_table())
        return 0
    if args.config is None:
        return _error("a configuration file is needed (or --list-methods)")
    if args.dry_run:
        try:
            merge_plan = engine.plan(args.config, allow_pickle=args.allow_pickle,
                                     trust_remote_code=args.trust_remote_code)  # fmt: skip
        except (ValueError, OSError, RuntimeError) as exc:
            return _error(str(exc) or type(exc).__name__)
        try:
            print(merge_plan.describe())
        finally:
            for c in merge_plan.checkpoints:
                c.close()
        return 0
    if args.out is None:
        return _error("--out is needed (the output directory)")
    timeout = _seconds(args.timeout)
    if timeout is None:
        return _error(f"--timeout must be a positive number of seconds, got {args.timeout[:40]!r}")
    from ..dist import process_group_from_launcher
    from ..engine.distributed import run_merge_distributed
    from ..engine.errors import Interrupted
    from ..engine.run import parse_size

    before = _directories(args.out)
    with _signals_interrupt(), process_group_from_launcher(timeout_s=timeout) as (rank, world_size):
        try:
            summary = run_merge_distributed(
                args.config,
                args.out,
                device=args.device,
                threads=args.threads,
                overwrite=args.overwrite,
                allow_pickle=args.allow_pickle,
                shard_bytes=parse_size(args.shard_size),
                progress=not args.quiet and rank == 0,
                write_model_card=args.write_model_card,
                trust_remote_code=args.trust_remote_code,
                timeout_s=timeout,
                fsync=not args.no_fsync,
            )
        except Interrupted as stop:
            # a signal that came while the output was moved into place acts once it is there
            done = ("the output was complete and is published" if _published(args.out, before)
                    else "nothing was written")  # fmt: skip
            print(f"fastmerge merge: interrupted by {stop.name}; {done}", file=sys.stderr)
            return 128 + stop.signum
        except (ValueError, OSError, RuntimeError) as exc:
            where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
            return _error(str(exc) or type(exc).__name__, where)
    if not args.quiet and rank == 0:
        for note in summary.notes:
            print(f"fastmerge merge: note: {note}", file=sys.stderr)
        print(summary.line())
    return 0
