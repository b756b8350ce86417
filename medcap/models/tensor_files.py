"""Another project's checkpoint read as data: ``torch.load(weights_only=True)``, never its pickled code."""

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


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
