"""Atomic writes (a file or a directory appears complete under its name, or not at all), and
the digests that tell a run's inputs apart (:func:`file_sha256`, :func:`directory_fingerprint`).

Layer 0 (beside :mod:`rlcourse.config`): imports nothing from rlcourse, so every layer can use it.

The recipe for a file is: write a temporary file in the *same* directory (so the rename stays on
one file system and is atomic), flush and ``fsync`` it, ``os.replace`` it over the target, then
``fsync`` the directory so the rename itself survives a power cut (POSIX; Windows cannot open a
directory, and there the step is skipped). A crash at any point leaves the old file intact and no
temporary file behind (the temporary file is removed on the way out of an exception).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["atomic_directory_write", "atomic_write_text", "directory_fingerprint", "file_sha256",
           "fsync_directory"]


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


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Files up to this size are hashed whole by :func:`directory_fingerprint`; larger ones (model
#: weights) by their size and their first and last :data:`FINGERPRINT_SAMPLE` bytes.
FINGERPRINT_WHOLE = 64 << 20
FINGERPRINT_SAMPLE = 16 << 20


def directory_fingerprint(path: str | os.PathLike,
                          include: Callable[[Path], bool] | None = None) -> str | None:
    """A SHA-256 over every file below ``path`` (a model directory): its relative name, its size,
    and its bytes (files up to 64 MiB whole; larger ones their first and last 16 MiB). ``None``
    when ``path`` is not a directory. ``include(relative_path)``: hash only the files it accepts
    (e.g. a model's weights, config and tokenizer, not a run folder or ``.git`` inside it).

    It tells "the same checkpoint" from "another checkpoint saved in the same folder" (new
    weights change the bytes right after a safetensors header, and configs and tokenizers are
    hashed whole) while reading at most 32 MiB of a 15 GB weight file, so a 7B run pays well under
    a second for it. Two weight files that differ only in their middle are not told apart.
    """
    root = Path(path)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()
                       and (include is None or include(p.relative_to(root)))):
        size = file.stat().st_size
        h.update(f"{file.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as fh:
            if size <= FINGERPRINT_WHOLE:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(FINGERPRINT_SAMPLE))
                fh.seek(size - FINGERPRINT_SAMPLE)
                h.update(fh.read(FINGERPRINT_SAMPLE))
    return h.hexdigest()
