"""A GGUF file's header and tensor table, read with struct and a memory map: the metadata as Python values and each
tensor's data as a view into the file (copy-on-write: writable arrays, the file itself is never written).

Why not gguf's GGUFReader: it builds a numpy view per array element, ~2 s for a 49k-token vocabulary (SmolLM2)
and more for Llama 3's 128k, which was most of a model's launch. Every count and offset is checked against the
file's size, so a truncated or damaged file is a one-line error, never a crash or a huge allocation.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from trainfer.errors import TrainferError

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
STRING, ARRAY = 8, 9
_DTYPES = {Q.F32: np.float32, Q.F16: np.float16}  # other types' data is read as bytes


@dataclass
class Tensor:
    name: str
    tensor_type: Q
    shape: tuple[int, ...]  # GGUF order: innermost (columns) first, as gguf's reader gives it
    n_elements: int
    n_bytes: int
    data: np.ndarray  # F32 / F16: values (rows, cols); other types: bytes (rows, row bytes)
    offset: int  # of the data in the file
    owner: GGUFFile

    def release(self) -> None:
        """Drop this tensor's pages from the process's memory once it has been copied (GGUFFile.release)."""
        self.owner.release(self)


class GGUFFile:
    """Owns the memory map of one GGUF file: `metadata` ({key: value}), `tensors` (in file order)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._map = np.memmap(self.path, mode="c")
        except FileNotFoundError:
            raise TrainferError(f"no such file: {path}") from None
        except (OSError, ValueError) as e:  # an empty file cannot be mapped
            raise TrainferError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from None
        self._buf = memoryview(self._map)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
            raise TrainferError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from None

    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._buf):
            raise ValueError(f"a field at byte {self._pos} runs past the end of the file")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return bytes(self._take(self._scalar("<Q"))).decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype])
        if vtype == STRING:
            return self._string()
        if vtype == ARRAY:
            itype, count = self._scalar("<I"), self._scalar("<Q")
            if itype in _NUMPY:
                size = np.dtype(_NUMPY[itype]).itemsize
                return np.frombuffer(self._take(count * size), dtype=_NUMPY[itype]).tolist()
            if count > len(self._buf):  # every element takes at least a byte
                raise ValueError(f"an array of {count} elements cannot fit in the file")
            return [self._value(itype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")

    def _parse(self) -> None:
        if bytes(self._take(4)) != MAGIC:
            raise ValueError("no GGUF magic number at the start")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (trainfer reads 2 and 3)")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        if n_tensors > len(self._buf) or n_kv > len(self._buf):
            raise ValueError(f"{n_tensors} tensors and {n_kv} keys cannot fit in the file")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = tuple(self._scalar("<Q") for _ in range(n_dims))
            raw_type, offset = self._scalar("<I"), self._scalar("<Q")
            try:
                qtype = Q(raw_type)
            except ValueError:
                raise ValueError(f"tensor {name} has an unknown type {raw_type}") from None
            infos.append((name, dims, qtype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors: list[Tensor] = []
        for name, dims, qtype, offset in infos:
            block, size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims))
            if dims[0] % block:
                raise ValueError(f"tensor {name}: rows of {dims[0]} are not whole {qtype.name} blocks of {block}")
            nbytes = n // block * size
            begin = start + offset
            if begin + nbytes > len(self._buf):
                raise ValueError(f"tensor {name} runs past the end of the file")
            rows = n // dims[0]
            raw = self._map[begin : begin + nbytes]
            dtype = _DTYPES.get(qtype)
            data = raw.view(dtype).reshape(rows, dims[0]) if dtype is not None else raw.reshape(rows, -1)
            self.tensors.append(Tensor(name, qtype, dims, n, nbytes, data, begin, self))

    def release(self, t: Tensor) -> None:
        """Drop the pages of a tensor that was copied (Llama's q / k rows, reordered) from this process's memory:
        read once, they would otherwise count in its RSS next to the copy until the map is closed."""
        page = mmap.PAGESIZE
        start, end = -(-t.offset // page) * page, (t.offset + t.n_bytes) // page * page
        raw = getattr(self._map, "_mmap", None)
        if raw is not None and end > start and hasattr(mmap, "MADV_DONTNEED"):
            raw.madvise(mmap.MADV_DONTNEED, start, end - start)
