"""tasks.files.write_atomic: a local file is replaced whole or not at all, readable by others like any output."""

import os

import pytest

from tasks.files import write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    write_atomic(target, lambda partial: partial.write_text("old"))
    assert target.read_text() == "old" and target.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0o600

    def half(partial):
        partial.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half)
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_write_that_links_another_file_leaves_that_files_mode(tmp_path):
    source = tmp_path / "image.jpg"
    source.write_bytes(b"jpeg")
    source.chmod(0o600)

    def link(partial):
        partial.unlink()
        os.link(source, partial)

    write_atomic(tmp_path / "copy" / "image.jpg", link)
    assert (tmp_path / "copy" / "image.jpg").read_bytes() == b"jpeg" and source.stat().st_mode & 0o777 == 0o600
