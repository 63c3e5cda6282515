"""Content digests (pathgen.digest): a file's sha256 (hashlib.file_digest), remembered under (path, size, mtime) and
computed again when the file changes; a folder's digest over names and contents, hidden files left out."""

from __future__ import annotations

import hashlib
import os

from pathgen import digest


def test_a_file_digest_is_its_sha256_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHGEN_DIGEST_CACHE", str(tmp_path / "cache" / "digests.json"))
    monkeypatch.setattr(digest, "_memory", type(digest._memory)())
    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(3 * 2**20 + 17))  # over hashlib.file_digest's buffer, not a multiple of it
    assert digest.file_digest(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (tmp_path / "cache" / "digests.json").is_file()

    monkeypatch.setattr(digest, "_memory", type(digest._memory)())  # a new process: the disk cache answers
    monkeypatch.setattr(digest.hashlib, "file_digest", None)  # hashing now would fail
    assert digest.file_digest(file) == hashlib.sha256(file.read_bytes()).hexdigest()

    monkeypatch.undo()
    monkeypatch.setenv("PATHGEN_DIGEST_CACHE", str(tmp_path / "cache" / "digests.json"))
    file.write_bytes(b"edited")
    os.utime(file, ns=(1, 1))
    assert digest.file_digest(file) == hashlib.sha256(b"edited").hexdigest()


def test_a_folder_digest_covers_names_and_contents_but_not_hidden_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHGEN_DIGEST_CACHE", str(tmp_path / "digests.json"))
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"w")
    before = digest.path_digest(model)
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("x")
    assert digest.folder_digest(model) == before
    (model / "sub" / "weights.bin").write_bytes(b"W")
    assert digest.folder_digest(model) != before
