"""Another project's files read as data: ``torch.load(weights_only=True)``, never its pickled code; safetensors and
JSON files whose damage is an error naming the file."""

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor


def read_json(path: str | Path) -> Any:
    """A JSON file's value; a damaged one is a ValueError naming the file and the line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: invalid JSON ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_safetensors(path: str | Path, as_numpy: bool = False) -> dict:
    """A safetensors file's tensors (numpy arrays with ``as_numpy``); a damaged one is a ValueError naming it."""
    if as_numpy:
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def load_weights_only(path: str | Path, holds: str, hint: str = "", safe_globals: list | None = None) -> Any:
    """The file's contents, memory-mapped where its format allows (a pre-zip ``torch.save`` file is read whole).
    A file with anything beyond tensors, containers and ``safe_globals`` is refused with a ValueError naming it;
    ``holds`` says what it may hold, ``hint`` what such a file should be."""
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"{path}: refused: the file holds more than {holds} (torch.load(weights_only=True) "
                         f"stopped at: {reason}){hint}") from None
    except (RuntimeError, EOFError, KeyError, ValueError) as error:  # a damaged file, or another format
        reason = " ".join(str(error).split())[:200]
        cause = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
        raise ValueError(f"{path}: not a readable torch.save file ({cause})") from None


def not_tensors(state: Any, name: str) -> list[str]:
    """The keys of the state dict ``state`` whose values are not tensors (``[name]`` when it is no dict)."""
    if not isinstance(state, dict):
        return [name]
    return [k for k, v in state.items() if not isinstance(v, Tensor)]
