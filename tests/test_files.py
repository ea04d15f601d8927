"""Atomic file and folder writes (``lit_peft.files``): a failed write keeps the old file or folder and leaves no
temporary behind."""

from __future__ import annotations

import os

import pytest

from lit_peft.files import atomic_write, atomic_write_folder, atomic_write_text


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old\n")

    def broken(tmp):
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["f.txt"]
    atomic_write_text(tmp_path / "new" / "g.txt", "x")  # parents are created
    assert (tmp_path / "new" / "g.txt").read_text() == "x"


@pytest.mark.parametrize("merge", [False, True])
def test_atomic_write_folder(tmp_path, merge):
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "old").write_text("old")
    (folder / "keep.txt").write_text("keep")

    def write(tmp):
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new").write_text("new")
        (tmp / "a.txt").write_text("a")

    assert atomic_write_folder(folder, write, merge=merge) == folder
    expected = {"sub", "a.txt"} | ({"keep.txt"} if merge else set())
    assert set(os.listdir(folder)) == expected
    assert os.listdir(folder / "sub") == ["new"]  # a folder of the same name is replaced, not merged into
    assert os.listdir(tmp_path) == ["out"]  # no temporary left

    def broken(tmp):
        (tmp / "a.txt").write_text("changed")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_folder(folder, broken, merge=merge)
    assert (folder / "a.txt").read_text() == "a" and os.listdir(tmp_path) == ["out"]
