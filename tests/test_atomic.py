"""Atomic writes: the old file or folder stays whole when a write fails, and no temporary name is left after one
that succeeds."""

import pytest

from medcap.atomic import replaced_atomically, write_json, write_text


def test_failed_write_keeps_the_old_folder(tmp_path):
    out = tmp_path / "run"
    with replaced_atomically(out, folder=True) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), replaced_atomically(out, folder=True) as tmp:
        (tmp / "a.txt").write_text("second, half written")
        raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the half-written copy is deleted
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
    with pytest.raises(UnicodeEncodeError):  # fails after the file was opened: the old one stays, no .tmp left
        write_text(path, "a lone surrogate \ud83d")
    assert path.read_text() == '{\n "BLEU-4": 0.25\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_swap_interrupted_between_its_two_renames_keeps_the_old_folder_on_disk(tmp_path, monkeypatch):
    out = tmp_path / "step_000006"
    interrupt_a_swap(out, monkeypatch)
    aside = tmp_path / ".step_000006.old"  # not a step_* name: never taken for a checkpoint
    tmp = tmp_path / "step_000006.tmp"
    assert (aside / "model.safetensors").read_text() == "old" and (tmp / "model.safetensors").read_text() == "new"
    with replaced_atomically(out, folder=True) as tmp:  # the next write puts a folder in place and tidies up
        (tmp / "model.safetensors").write_text("newer")
    assert (out / "model.safetensors").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000006"]


def interrupt_a_swap(out, monkeypatch):
    """Writes ``out`` ("old"), then a second write ("new") killed between moving the old folder aside and renaming
    the new one in: nothing is left at ``out``."""
    import os

    with replaced_atomically(out, folder=True) as tmp:
        (tmp / "model.safetensors").write_text("old")
    real_replace, calls = os.replace, []

    def killed_before_the_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_before_the_second_rename)
        with pytest.raises(KeyboardInterrupt), replaced_atomically(out, folder=True) as tmp:
            (tmp / "model.safetensors").write_text("new")
    assert not out.exists()


def test_a_write_after_an_interrupted_swap_restores_the_old_folder_first(tmp_path, monkeypatch):
    out = tmp_path / "merged"
    interrupt_a_swap(out, monkeypatch)
    with pytest.raises(RuntimeError), replaced_atomically(out, folder=True):
        assert (out / "model.safetensors").read_text() == "old"
        raise RuntimeError("this write fails too")
    assert (out / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_readers_find_a_checkpoint_whose_swap_was_interrupted(tmp_path, monkeypatch):
    from medcap.checkpoint import resolve_checkpoint
    from medcap.runs import newest_complete

    out = tmp_path / "merged"
    interrupt_a_swap(out, monkeypatch)
    assert resolve_checkpoint(out) == out and (out / "model.safetensors").read_text() == "old"
    assert not (tmp_path / ".merged.old").exists()

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "step_000002").mkdir()
    interrupt_a_swap(ck / "step_000004", monkeypatch)
    newest_complete(ck)  # resume looks for the newest checkpoint: the interrupted one is back under its name
    assert (ck / "step_000004" / "model.safetensors").read_text() == "old"
    assert not (ck / ".step_000004.old").exists()


def fsync_log(monkeypatch):
    """Records, in order, each fsync (as the path it flushed) and each rename (as ("replace", destination))."""
    import os

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_folder_write_reaches_the_disk_before_the_old_folder_is_deleted(tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "step_000002"
    with replaced_atomically(out, folder=True) as tmp:
        (tmp / "a.txt").write_text("old")
    events = fsync_log(monkeypatch)
    aside, deleted_after = tmp_path / ".step_000002.old", []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: (deleted_after.append(len(events)), real_rmtree(p, **kw)))
    with replaced_atomically(out, folder=True) as tmp:
        (tmp / "a.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    tmp = str(tmp_path / "step_000002.tmp")
    first_rename = events.index(("replace", str(aside)))
    assert sorted(events[:first_rename]) == sorted([f"{tmp}/a.txt", f"{tmp}/sub", f"{tmp}/sub/b.txt", tmp])
    assert events[first_rename:] == [("replace", str(aside)), ("replace", str(out)), str(tmp_path)]
    assert deleted_after[-1] == len(events)  # the old copy went only once the parent folder was flushed
    assert (out / "a.txt").read_text() == "new" and (out / "sub" / "b.txt").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]


def test_a_file_write_reaches_the_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    events = fsync_log(monkeypatch)
    write_json(tmp_path / "metrics.json", {"a": 1})
    assert events == [str(tmp_path / "metrics.json.tmp"), ("replace", str(tmp_path / "metrics.json")), str(tmp_path)]
    assert (tmp_path / "metrics.json").read_text() == '{\n  "a": 1\n}'
