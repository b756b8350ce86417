"""Atomic writes: a file or folder is written under a temporary sibling name (``<name>.tmp``), flushed to disk and
renamed into place, so a reader never sees half of it and an interrupted write (or a power failure) leaves the old
one."""

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def aside_name(path: Path) -> Path:
    """Where a folder's old copy waits while its new one is renamed in (not a ``step_*`` name)."""
    return path.with_name(f".{path.name}.old")


def restore_interrupted(path: str | Path) -> None:
    """Puts the old copy of a folder back under its name when a swap was stopped between its two renames (then
    nothing is at ``path``; its half-swapped new copy is given up)."""
    path = Path(path)
    aside = aside_name(path)
    if not path.exists() and aside.is_dir():
        try:
            os.replace(aside, path)
        except FileNotFoundError:  # another process restored it first
            pass


def fsync(path: Path) -> None:
    """Flushes a file's contents, or a folder's list of names, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for item in folder.rglob("*"):
        if not item.is_symlink():
            fsync(item)
    fsync(folder)


@contextmanager
def replaced_atomically(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yields the temporary path to write (with ``folder``, an empty folder made here); when the block ends
    without an error it replaces ``path``, and when it raises the temporary path is deleted."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if folder:
        restore_interrupted(path)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    if folder:
        fsync_tree(tmp)
    else:
        fsync(tmp)
    # a folder cannot be renamed over another: the old one is moved aside first, whole, and deleted only once the
    # new one is in place on disk (a swap interrupted in between leaves the old one aside: see restore_interrupted)
    aside = aside_name(path)
    if folder and path.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    os.replace(tmp, path)
    fsync(path.parent)
    if folder:
        shutil.rmtree(aside, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, value, indent: int = 2) -> None:
    write_text(path, json.dumps(value, indent=indent))


def remove_earlier(paths: list[Path]) -> list[Path]:
    """Removes the files and folders in ``paths`` that exist: outputs an earlier run left beside the ones this run
    writes but does not write itself (an ``intervals.json`` with ``bootstrap=0``), which would read as this run's.
    Returns those removed."""
    removed = []
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed
