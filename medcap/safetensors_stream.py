"""Write a safetensors file one tensor at a time: the header (names, dtypes, shapes, offsets) first, from
shapes known in advance, then each tensor's bytes as it is produced, so a multi-GB model is written without
holding a second copy of it. The format is the one ``safetensors`` reads: an 8-byte little-endian header size,
a JSON header padded with spaces to a multiple of 8, then the tensors' bytes back to back."""

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
          torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_streaming(path: str | Path, entries: Iterable[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                    produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``entries``: (name, shape) in file order; ``produce(name)`` returns that tensor (cast to ``dtype`` here)."""
    entries = list(entries)
    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, shape in entries:
        length = size * int(torch.Size(shape).numel())
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + length]}
        offset += length
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, shape in entries:
            tensor = produce(name).detach().to("cpu", dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced shape {tuple(tensor.shape)}, the header says {tuple(shape)}")
            f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))  # no copy of the bytes
            del tensor
