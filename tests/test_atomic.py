"""Atomic writes: the old file or folder stays whole when a write fails, and no temporary name is left after one
that succeeds."""

import pytest

from medcap.atomic import replaced_atomically, write_json


def test_failed_write_keeps_the_old_folder(tmp_path):
    out = tmp_path / "run"
    with replaced_atomically(out, folder=True) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), replaced_atomically(out, folder=True) as tmp:
        (tmp / "a.txt").write_text("second, half written")
        raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "first"
    with replaced_atomically(out, folder=True) as tmp:  # a stale temporary folder is cleared first
        assert list(tmp.iterdir()) == []
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_write_json_replaces_a_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"BLEU-4": 0.5})
    write_json(path, {"BLEU-4": 0.25}, indent=1)
    assert path.read_text() == '{\n "BLEU-4": 0.25\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_swap_interrupted_between_its_two_renames_keeps_the_old_folder_on_disk(tmp_path, monkeypatch):
    import os

    out = tmp_path / "step_000006"
    with replaced_atomically(out, folder=True) as tmp:
        (tmp / "model.safetensors").write_text("old")
    real_replace, calls = os.replace, []

    def killed_before_the_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt), replaced_atomically(out, folder=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    monkeypatch.undo()
    aside = tmp_path / ".step_000006.old"  # not a step_* name: never taken for a checkpoint
    assert (aside / "model.safetensors").read_text() == "old" and (tmp / "model.safetensors").read_text() == "new"
    with replaced_atomically(out, folder=True) as tmp:  # the next write puts a folder in place and tidies up
        (tmp / "model.safetensors").write_text("newer")
    assert (out / "model.safetensors").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000006"]
