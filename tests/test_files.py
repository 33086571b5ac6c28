"""Files written whole or not at all (alignkit/files.py)."""

import os
import stat

import pytest

from alignkit import files
from alignkit.files import write_jsonl_atomic, write_text_atomic


def test_a_written_file_has_the_mode_of_any_new_file_and_replaces_the_old_one(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    path = write_text_atomic(tmp_path / "sub" / "a.json", "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert write_jsonl_atomic(tmp_path / "r.jsonl", [{"a": "é"}]).read_text(encoding="utf-8") == '{"a": "é"}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = write_text_atomic(tmp_path / "a.json", "old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_a_saved_model_directory_has_the_mode_of_any_new_directory(tmp_path, tok, model):
    from alignkit.models.load import save_model

    plain = tmp_path / "plain"
    plain.mkdir()
    final = save_model(model, tok, tmp_path / "run" / "final")
    assert stat.S_IMODE(final.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final"]
