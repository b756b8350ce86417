"""A small GGUF reader: metadata and tensors of a GGUF v2/v3 file, memory-mapped.

The ``gguf`` package's reader builds Python objects for every array element (about 6 s for SmolLM2's
49k-token vocabulary); parsing the header directly takes a fraction of that. Dequantisation uses
``gguf.quants``.
"""

import math
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
    """Reads a GGUF header; anything that does not fit in the file, or is of an unknown type, is a ValueError
    naming the file and the field."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, field: str) -> None:
        left = len(self.buf) - self.pos
        if n > left:
            raise ValueError(f"{self.path}: truncated or damaged: {field}: needs {n} bytes at byte {self.pos}, "
                             f"{left} left")

    def take(self, fmt: str, field: str) -> Any:
        self.need(struct.calcsize(fmt), field)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self, field: str) -> str:
        n = self.take("<Q", field)
        self.need(n, field)
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int, field: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(field)
        if vtype == _ARRAY:
            if depth == MAX_ARRAY_DEPTH:  # llama.cpp writes flat arrays; a deep nest is damage, or a crafted file
                raise ValueError(f"{self.path}: {field}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
            item_type, count = self.take("<I", f"{field}: item type"), self.take("<Q", f"{field}: length")
            if item_type in _SCALARS and item_type != 7:
                dtype = np.dtype(_SCALARS[item_type])
                self.need(dtype.itemsize * count, field)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return arr
            self.need(count, field)  # every item takes at least a byte: a damaged length fails here, not in a loop
            return [self.value(item_type, f"{field}[{i}]", depth + 1) for i in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"{self.path}: {field}: unknown value type {vtype}")
        return self.take(_SCALARS[vtype], field)


MAX_ARRAY_DEPTH = 4


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        if self.path.stat().st_size == 0:  # np.memmap cannot map it
            raise ValueError(f"{self.path}: empty file, not a GGUF file")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self.data), self.path)
        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError(f"{self.path}: not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.take("<I", "version")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.take("<Q", "tensor count"), cur.take("<Q", "metadata count")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            self.metadata[key] = cur.value(cur.take("<I", f"{key}: value type"), key)
        infos, names = [], set()
        for i in range(n_tensors):
            name = cur.string(f"tensor #{i}: name")
            field = f"tensor {name!r}"
            rank = cur.take("<I", f"{field}: rank")
            cur.need(8 * rank, f"{field}: shape")
            dims = [cur.take("<Q", f"{field}: shape") for _ in range(rank)]
            if any(d == 0 or d >= 2 ** 48 for d in dims):
                raise ValueError(f"{self.path}: {field}: shape {dims} has a dimension of 0 or one too large")
            if name in names:
                raise ValueError(f"{self.path}: {field}: a second tensor with this name")
            qtype = cur.take("<I", f"{field}: quantization type")
            try:
                qtype = GGMLQuantizationType(qtype)
            except ValueError:
                raise ValueError(f"{self.path}: {field}: unknown quantization type {qtype}") from None
            infos.append((name, tuple(reversed(dims)), qtype, cur.take("<Q", f"{field}: offset")))
            names.add(name)
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
            raise ValueError(f"{self.path}: general.alignment must be a positive integer, found {alignment!r}")
        start = -(-cur.pos // alignment) * alignment
        self.tensors = {n: GGUFTensor(n, s, q, start + o) for n, s, q, o in infos}
        for t in self.tensors.values():
            end = t.offset + self.nbytes(t)
            if end > len(self.data):
                raise ValueError(f"{self.path}: tensor {t.name!r}: its data ends at byte {end}, past the end of the "
                                 f"file ({len(self.data)} bytes)")

    def nbytes(self, t: GGUFTensor) -> int:
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        cols = t.shape[-1] if t.shape else 1
        if cols % block:
            raise ValueError(f"{self.path}: tensor {t.name!r}: rows of {cols} values do not fill the "
                             f"{t.qtype.name} blocks of {block}")
        return int(np.prod(t.shape, dtype=object)) // block * type_size

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 in torch's dimension order."""
        t = self.tensors[name]
        rows = math.prod(t.shape[:-1])
        raw = self.data[t.offset:t.offset + self.nbytes(t)].reshape(rows, -1)
        if t.qtype == GGMLQuantizationType.F32:
            values = raw.view(np.float32)
        elif t.qtype == GGMLQuantizationType.F16:
            values = raw.view(np.float16).astype(np.float32)
        else:
            values = dequantize(raw, t.qtype)
        return np.array(values, dtype=np.float32).reshape(t.shape)  # a writable copy, off the memory map
