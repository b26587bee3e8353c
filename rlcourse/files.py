"""Atomic writes: a file or a directory appears complete under its name, or not at all.

Layer 0 (beside :mod:`rlcourse.config`): imports nothing from rlcourse, so every layer can use it.

The recipe for a file is: write a temporary file in the *same* directory (so the rename stays on
one file system and is atomic), flush and ``fsync`` it, ``os.replace`` it over the target, then
``fsync`` the directory so the rename itself survives a power cut (POSIX; Windows cannot open a
directory, and there the step is skipped). A crash at any point leaves the old file intact and no
temporary file behind (the temporary file is removed on the way out of an exception).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["atomic_directory_write", "atomic_write_text", "fsync_directory"]


def fsync_directory(path: str | os.PathLike) -> None:
    """``fsync`` a directory so a rename inside it is durable (no-op where the OS forbids it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows: a directory cannot be opened; its renames are durable already
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename still happened
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str | Iterable[str],
                      encoding: str = "utf-8") -> Path:
    """Write ``text`` (a string, or an iterable of string pieces written in order) to ``path``.

    Parent directories are created. An exception while the pieces are produced or written (or
    while syncing) leaves the previous ``path`` untouched and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as fh:
            for piece in [text] if isinstance(text, str) else text:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)
    return path


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_directory(d)


def atomic_directory_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_dir)``, fsync the files, then move ``tmp_dir`` to ``path``.

    The temporary directory sits next to ``path`` (same file system, so the rename is atomic).
    An existing ``path`` is first renamed aside and removed only after the new one is in place,
    so a crash leaves either the old or the new directory, never a half-written one; an exception
    inside ``write`` leaves the old directory as it was and no temporary directory behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(path.parent)
    return path
