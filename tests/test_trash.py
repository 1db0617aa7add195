"""Trash: removed trees vanish from their place at once and are deleted in the background."""

from __future__ import annotations

from pathlib import Path

from pycrio.trash import Trash


def _tree(path: Path, files: int = 200) -> Path:
    (path / "sub").mkdir(parents=True)
    for n in range(files):
        (path / "sub" / f"f{n}").write_text("x")
    return path


def test_a_discarded_tree_is_gone_at_once_and_deleted_later(tmp_path: Path) -> None:
    trash = Trash(tmp_path / ".trash")
    tree = _tree(tmp_path / "containers" / "c1")
    trash.discard(tree)
    assert not tree.exists()
    assert trash.wait_empty(10)
    assert list((tmp_path / ".trash").iterdir()) == []
    trash.discard(tmp_path / "never-there")  # fine


def test_what_an_earlier_run_left_in_the_trash_is_deleted_at_start(tmp_path: Path) -> None:
    _tree(tmp_path / ".trash" / "left-by-a-crash")
    (tmp_path / ".trash" / "a-file").write_text("x")
    trash = Trash(tmp_path / ".trash")
    trash.empty()
    assert trash.wait_empty(10)
    assert list((tmp_path / ".trash").iterdir()) == []


def test_a_tree_on_another_file_system_is_deleted_in_place(tmp_path: Path) -> None:
    other = Path("/dev/shm") / f"pycrio-trash-test-{tmp_path.name}"
    tree = _tree(other, files=3)
    try:
        Trash(tmp_path / ".trash").discard(tree)  # /dev/shm is tmpfs, tmp_path is not: EXDEV
        assert not tree.exists()
    finally:
        import shutil

        shutil.rmtree(other, ignore_errors=True)
