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
