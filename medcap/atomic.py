"""Atomic writes: a file or folder is written under a temporary sibling name (``<name>.tmp``) and renamed into
place, so a reader never sees half of it and an interrupted write leaves the old one."""

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yields the temporary path to write (with ``folder``, an empty folder made here); when the block ends
    without an error it replaces ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if folder:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    yield tmp
    # a folder cannot be renamed over another: the old one is moved aside first, whole, and deleted only once the
    # new one is in place (a swap interrupted in between leaves both on disk; the next write tidies up)
    aside = path.with_name(f".{path.name}.old")
    if folder and path.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    os.replace(tmp, path)
    if folder:
        shutil.rmtree(aside, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, value, indent: int = 2) -> None:
    write_text(path, json.dumps(value, indent=indent))
