"""A small GGUF reader: metadata and tensors of a GGUF v2/v3 file, memory-mapped.

The ``gguf`` package's reader builds Python objects for every array element (about 6 s for SmolLM2's
49k-token vocabulary); parsing the header directly takes a fraction of that. Dequantisation uses
``gguf.quants``.
"""

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF stores dims innermost first)
    qtype: GGMLQuantizationType
    offset: int


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.take("<I"), self.take("<Q")
            if item_type in _SCALARS and item_type != 7:
                dtype = np.dtype(_SCALARS[item_type])
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return arr
            return [self.value(item_type) for _ in range(count)]
        return self.take(_SCALARS[vtype])


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self.data))
        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError(f"{self.path}: not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(cur.take("<I")), cur.take("<Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        start = -(-cur.pos // alignment) * alignment
        self.tensors = {n: GGUFTensor(n, s, q, start + o) for n, s, q, o in infos}

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 in torch's dimension order."""
        t = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        rows, cols = int(np.prod(t.shape[:-1])), t.shape[-1]
        raw = self.data[t.offset:t.offset + rows * cols // block * type_size].reshape(rows, -1)
        if t.qtype == GGMLQuantizationType.F32:
            values = raw.view(np.float32)
        elif t.qtype == GGMLQuantizationType.F16:
            values = raw.view(np.float16).astype(np.float32)
        else:
            values = dequantize(raw, t.qtype)
        return np.array(values, dtype=np.float32).reshape(t.shape)  # a writable copy, off the memory map
