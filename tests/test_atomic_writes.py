"""Files and folders are replaced whole or not at all: `write_atomic` and `fill_folder`."""
import pytest

from engine.records import fill_folder, write_atomic, write_text
from errors import UserError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.md"
    write_text(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise ValueError("stopped")
    with pytest.raises(ValueError):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_a_write_error_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(UserError, match=r"cannot write .*missing.*table\.md: No such file"):
        write_text(tmp_path / "missing" / "table.md", "x")
    (tmp_path / "table.md.tmp").mkdir()          # a user's name: neither in the way nor ours to remove
    write_text(tmp_path / "table.md", "x")
    assert (tmp_path / "table.md.tmp").is_dir() and (tmp_path / "table.md").read_text() == "x"


def test_each_write_has_a_temporary_of_its_own(tmp_path):
    seen = []
    for _ in range(2):
        write_atomic(tmp_path / "a.pt", lambda tmp: seen.append(tmp) or tmp.write_text("x"))
    assert seen[0] != seen[1] and all(t.parent == tmp_path and t.name.startswith(".a.pt.") for t in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_a_folder_is_replaced_whole_and_its_neighbours_are_left_alone(tmp_path):
    out = tmp_path / "eval"
    for name in ("eval.old", "eval.tmp"):          # a user's folders, named as a writer might name its own
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("mine")
    (tmp_path / "eval.old-notes").write_text("notes")

    def write(folder, name):
        folder.mkdir()
        (folder / name).write_text(name)
        return name
    assert fill_folder(out, lambda tmp: write(tmp, "first")) == "first"
    assert fill_folder(out, lambda tmp: write(tmp, "second")) == "second"
    assert [p.name for p in out.iterdir()] == ["second"]

    def fail(tmp):
        write(tmp, "third")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fill_folder(out, fail)
    assert [p.name for p in out.iterdir()] == ["second"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "eval.old", "eval.old-notes", "eval.tmp"]
    assert all((tmp_path / name / "mine.txt").read_text() == "mine" for name in ("eval.old", "eval.tmp"))
