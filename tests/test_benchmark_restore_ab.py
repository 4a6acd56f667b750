"""The restore A/B benchmark never deletes what a user's folder held: a folder with files in it is
refused before anything runs, and a new or empty one is left empty, as given."""

from __future__ import annotations

import pytest

from benchmarks.restore_ab import main


def test_a_folder_with_files_in_it_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        main(["--folder", str(tmp_path)])
    assert stopped.value.code == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.e2e
def test_an_empty_folder_is_used_and_left_empty(tmp_path, capsys):
    folder = tmp_path / "ab"
    folder.mkdir()
    assert main(["--size-gib", "0.02", "--repeats", "1", "--folder", str(folder)]) == 0
    assert "torch.load" in capsys.readouterr().out
    assert folder.is_dir() and not list(folder.iterdir())
