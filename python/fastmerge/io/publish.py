"""Publishing an output directory durably: one run's own staging directory, its lock,
the leftovers of dead runs, fsync, and replacing an old output atomically.

Every run (all ranks of a distributed one together) has a random run id. Beside the
output ``OUT`` it uses:

* ``.OUT.fastmerge-<id>.lock``: created first and held (``flock``) for the whole run by the
  process that publishes (rank 0); the kernel releases it when that process dies, however
  it dies (``kill -9`` included);
* ``.OUT.fastmerge-<id>.tmp``: the staging directory the files are written into;
* ``.OUT.fastmerge-<id>.old``: only while an existing output is being replaced on a
  filesystem without ``renameat2(RENAME_EXCHANGE)``.

Publishing fsyncs every file and the staging directory, then either exchanges it with the
old output in one ``renameat2(RENAME_EXCHANGE)`` (so at every instant ``OUT`` is the old or
the new complete output) or, where the filesystem cannot, renames the old output to
``.old`` and the staging directory to ``OUT`` (putting the old one back if that fails);
then it fsyncs the parent. SIGTERM and SIGINT are held back from the first rename until
the run's lock is released, and delivered then, so a signal never stops a run between two
renames. A run that finds the lock of a dead run (:func:`clean_leftovers`) removes its
staging directory and puts a ``.old`` back at ``OUT`` if the crash (``kill -9``) came
between those two renames.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp()) / "merged"
    >>> stage = Staging(out, new_run_id())
    >>> _ = (stage.tmp_dir / "model.safetensors").write_bytes(b"...")
    >>> stage.publish(overwrite=False)
    >>> sorted(p.name for p in out.iterdir())
    ['model.safetensors']
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Optional

from .safetensors import CheckpointError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: renameat2's system call number where glibc has no wrapper (x86_64, aarch64).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


def new_run_id() -> str:
    """A random run id (12 hex digits) naming one run's files beside the output.

    Example:
        >>> len(new_run_id())
        12
    """
    return secrets.token_hex(6)


def _prefix(out: Path) -> str:
    return f".{out.name}.fastmerge-"


def staging_dir(out: Path, run_id: str) -> Path:
    """The staging directory of run `run_id` beside `out`.

    Example:
        >>> staging_dir(Path("/data/merged"), "0123456789ab").name
        '.merged.fastmerge-0123456789ab.tmp'
    """
    out = Path(out)
    return out.resolve().parent / f"{_prefix(out)}{run_id}.tmp"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    dirs = []
    for current, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(current) / f)
        dirs.append(Path(current))
    for d in reversed(dirs):
        fsync_path(d)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    kernel or the filesystem cannot (nothing changed then)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    func = getattr(libc, "renameat2", None)
    if func is not None:
        c_path = ctypes.c_char_p
        func.argtypes = [ctypes.c_int, c_path, ctypes.c_int, c_path, ctypes.c_uint]
        result = func(*args)
    else:
        number = _SYS_RENAMEAT2.get(os.uname().machine)
        if number is None:
            return False
        result = libc.syscall(number, *args)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove(path: Path) -> None:
    """Remove a directory tree, or a file or symbolic link (never what a link points to)."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
    """SIGTERM and SIGINT wait for the end of the block: their Python handlers are swapped
    for one that notes the signal, and the noted signals are raised again afterwards, under
    the original handlers. Only the main thread runs Python signal handlers, so elsewhere
    nothing can interrupt the block and nothing needs holding."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(s) not in (signal.SIG_IGN, None):  # None: not set from Python
            previous[s] = signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)


def tree_bytes(root: Path) -> int:
    """Bytes of the files under `root` (0 when it is gone)."""
    total = 0
    for current, _, files in os.walk(root):
        for f in files:
            try:
                total += (Path(current) / f).stat().st_size
            except OSError:
                pass
    return total


def clean_leftovers(out: Path, keep: Optional[str] = None) -> list[str]:
    """Remove what dead runs left beside `out` (their staging directories), put back an
    old output that a dead run had moved aside, and return one note per action. Runs
    that are alive (their lock is held) and the run `keep` are left alone; staging
    directories of older fastmerge versions (no lock) are reported with their size.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "merged"
        >>> dead = out.parent / ".merged.fastmerge-0123456789ab"
        >>> _ = Path(str(dead) + ".lock").write_text("")
        >>> Path(str(dead) + ".tmp").mkdir()
        >>> clean_leftovers(out)[0].startswith("removed 0 MB left by an interrupted run")
        True
    """
    notes = []
    parent = out.parent
    if not parent.is_dir():
        return notes
    pattern = re.compile(re.escape(_prefix(out)) + r"([0-9a-f]{12})\.lock$")
    for entry in sorted(parent.iterdir()):
        found = pattern.match(entry.name)
        if not found or found.group(1) == keep:
            continue
        lock = _try_lock(entry)
        if lock is None:
            continue  # that run is alive
        try:
            base = str(parent / (_prefix(out) + found.group(1)))
            tmp, old = Path(base + ".tmp"), Path(base + ".old")
            if tmp.exists():
                size = tree_bytes(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
                notes.append(f"removed {size / 1e6:.0f} MB left by an interrupted run: {tmp}")
            if os.path.lexists(old):
                if not os.path.lexists(out):
                    os.replace(old, out)
                    notes.append(f"restored {out}, which an interrupted run was replacing")
                else:
                    _remove(old)
            entry.unlink(missing_ok=True)
        finally:
            os.close(lock)
    legacy = re.compile(re.escape(f".{out.name}.") + r"(tmp-.*|fastmerge-partial|old-.*)$")
    for entry in sorted(parent.iterdir()):
        if legacy.match(entry.name) and entry.is_dir():
            notes.append(
                f"found {tree_bytes(entry) / 1e6:.0f} MB in {entry}, left by an older "
                "fastmerge run; remove it if no merge is running"
            )
    return notes


def _create_lock(path: Path) -> int:
    """An fd holding an exclusive lock on the file `path`, created if needed. A run that
    cleans leftovers may take and delete a lock file in the instant between its creation
    and its locking here: then the lock is on a deleted file and a new one is made."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    while True:
        fd = os.open(path, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine, there = os.fstat(fd), os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
            return fd
        os.close(fd)


def _try_lock(path: Path) -> Optional[int]:
    """An fd holding an exclusive lock on `path`, or None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class Staging:
    """One run's staging directory beside `out` (see the module doc). The publishing
    process (`owner`: rank 0, or the only one) takes the run's lock and cleans up after
    dead runs first; the other ranks of a distributed run only make sure the directory
    exists. Directories are created with the process's umask applied.

    ``notes`` holds what :func:`clean_leftovers` did.
    """

    def __init__(self, out: Path, run_id: str, *, owner: bool = True, fsync: bool = True):
        if not re.fullmatch(r"[0-9a-f]{12}", run_id):
            raise ValueError(f"run_id must be 12 hex digits, got {run_id!r}")
        self.out = Path(out)
        self.run_id, self.owner, self.fsync = run_id, owner, fsync
        parent = self.out.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        base = str(parent / (_prefix(self.out) + run_id))
        self.lock_path, self.tmp_dir = Path(base + ".lock"), Path(base + ".tmp")
        self.old_dir = Path(base + ".old")
        self.notes: list[str] = []
        self._lock: Optional[int] = None
        if owner:
            self._lock = _create_lock(self.lock_path)
        try:
            if owner:
                self.notes = clean_leftovers(self.out, keep=run_id)
            # every rank of a run may create it; mode 0o777 & ~umask, as any new directory
            self.tmp_dir.mkdir(exist_ok=True)
        except BaseException:  # a signal or an error while cleaning: leave no lock behind
            self.release()
            raise

    def publish(self, overwrite: bool) -> None:
        """Move the staging directory to `out` durably (owner only), replacing an
        existing output with `overwrite` (atomically where the filesystem allows)."""
        if self.fsync:
            fsync_tree(self.tmp_dir)
        out = self.out
        if (out.exists() or out.is_symlink()) and not overwrite:  # appeared while merging
            raise CheckpointError(f"{out}: output directory exists")
        with _signals_held():  # no signal stops the run between the renames
            if out.is_dir() and not out.is_symlink() and exchange(self.tmp_dir, out):
                shutil.rmtree(self.tmp_dir, ignore_errors=True)  # now the old output
            elif out.exists() or out.is_symlink():
                os.replace(out, self.old_dir)
                try:
                    os.replace(self.tmp_dir, out)
                except BaseException:
                    os.replace(self.old_dir, out)  # the old output stays
                    raise
                _remove(self.old_dir)
            else:
                os.replace(self.tmp_dir, out)
            if self.fsync:
                fsync_path(out.resolve().parent)
            self.release()

    def remove(self) -> None:
        """Remove the staging directory and release the lock (after a failure)."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Drop the run's lock file (the owner's, once nothing of the run is left)."""
        if self._lock is not None:
            self.lock_path.unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None
