"""Tests for rlcourse.files: atomic writes of a file and of a directory; the digests that tell
a run's inputs apart."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from rlcourse import files
from rlcourse.files import atomic_directory_write, atomic_write_text


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_text_complete_and_clean(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "é\nline two\n")
    assert path.read_bytes() == "é\nline two\n".encode()  # no newline translation, UTF-8
    atomic_write_text(path, (f"{i}\n" for i in range(3)))  # pieces, written in order
    assert path.read_text() == "0\n1\n2\n"
    assert _names(path.parent) == ["a.txt"]


def test_atomic_write_text_crash_while_producing_keeps_old(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old\n")

    def pieces():
        yield "new, half"
        raise RuntimeError("crash inside the writer")

    with pytest.raises(RuntimeError, match="crash inside"):
        atomic_write_text(path, pieces())
    assert path.read_text() == "old\n"
    assert _names(tmp_path) == ["a.txt"]  # no temporary file left behind


def test_atomic_write_text_crash_at_fsync_or_rename_keeps_old(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "a.txt", "old\n")
    for name in ("fsync", "replace"):
        with monkeypatch.context() as m:
            def boom(*args, _name=name, **kwargs):
                raise OSError(f"{_name} failed")

            m.setattr(files.os, name, boom)
            with pytest.raises(OSError, match=f"{name} failed"):
                atomic_write_text(path, "new\n")
        assert path.read_text() == "old\n"
        assert _names(tmp_path) == ["a.txt"]


def test_atomic_write_text_syncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                      else None)
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", spy)
    atomic_write_text(tmp_path / "a.txt", "x")
    if os.name == "posix" and os.path.exists("/proc/self/fd"):
        assert synced == [False, True]  # the file's data, then the directory's rename


def test_atomic_directory_write_crash_keeps_old(tmp_path):
    def write(folder, text):
        (folder / "inner").mkdir()
        (folder / "inner" / "f.txt").write_text(text)

    path = atomic_directory_write(tmp_path / "ckpt", lambda d: write(d, "old"))
    assert (path / "inner" / "f.txt").read_text() == "old"

    def crash(folder):
        write(folder, "new, half")
        raise RuntimeError("crash inside the writer")

    with pytest.raises(RuntimeError, match="crash inside"):
        atomic_directory_write(path, crash)
    assert (path / "inner" / "f.txt").read_text() == "old"
    assert _names(tmp_path) == ["ckpt"]  # no temporary directory left behind
    atomic_directory_write(path, lambda d: write(d, "new"))
    assert (path / "inner" / "f.txt").read_text() == "new"
    assert _names(tmp_path) == ["ckpt"]  # the old directory was removed once replaced


def test_models_reexports_the_one_helper():
    from rlcourse import models

    assert models.atomic_directory_write is atomic_directory_write


def test_file_sha256_is_hashlibs_digest_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB: two 1 MiB reads
    (tmp_path / "f").write_bytes(data)
    assert files.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def _model_dir(root, weights: bytes):
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "model.safetensors").write_bytes(weights)
    return root


@pytest.mark.parametrize("size", [1000, 3000])  # hashed whole / sampled (limits patched below)
def test_directory_fingerprint_tells_another_checkpoint_in_the_same_folder(tmp_path, monkeypatch,
                                                                            size):
    monkeypatch.setattr(files, "FINGERPRINT_WHOLE", 2000)
    monkeypatch.setattr(files, "FINGERPRINT_SAMPLE", 100)
    weights = bytes((7 * i) % 251 for i in range(size))
    a = files.directory_fingerprint(_model_dir(tmp_path / "a", weights))
    # The same files elsewhere: the same checkpoint.
    assert files.directory_fingerprint(_model_dir(tmp_path / "b", weights)) == a
    # New weights saved into the same folder: bytes right after the start differ.
    changed = bytearray(weights)
    changed[50] ^= 1
    (tmp_path / "b" / "model.safetensors").write_bytes(bytes(changed))
    assert files.directory_fingerprint(tmp_path / "b") != a
    # A config edited, a file renamed, a file added: another checkpoint.
    shutil.rmtree(tmp_path / "b")
    _model_dir(tmp_path / "b", weights)
    (tmp_path / "b" / "config.json").write_text('{"hidden_size": 9}')
    assert files.directory_fingerprint(tmp_path / "b") != a
    shutil.rmtree(tmp_path / "b")
    _model_dir(tmp_path / "b", weights).joinpath("model.safetensors").rename(
        tmp_path / "b" / "weights.safetensors")
    assert files.directory_fingerprint(tmp_path / "b") != a
    shutil.rmtree(tmp_path / "b")
    _model_dir(tmp_path / "b", weights).joinpath("sub").mkdir()
    (tmp_path / "b" / "sub" / "extra.bin").write_bytes(b"x")
    assert files.directory_fingerprint(tmp_path / "b") != a
    assert files.directory_fingerprint(tmp_path / "missing") is None
    assert files.directory_fingerprint(tmp_path / "a" / "config.json") is None


def test_directory_fingerprint_reads_only_the_ends_of_a_large_file(tmp_path, monkeypatch):
    """The documented limit: a change in the middle of a sampled file is not seen."""
    monkeypatch.setattr(files, "FINGERPRINT_WHOLE", 2000)
    monkeypatch.setattr(files, "FINGERPRINT_SAMPLE", 100)
    weights = bytearray(3000)
    a = files.directory_fingerprint(_model_dir(tmp_path / "a", bytes(weights)))
    weights[1500] = 1
    assert files.directory_fingerprint(_model_dir(tmp_path / "b", bytes(weights))) == a
    weights[2950] = 1  # within the last 100 bytes
    assert files.directory_fingerprint(_model_dir(tmp_path / "c", bytes(weights))) != a
