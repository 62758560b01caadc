"""Minimal safetensors reading and writing, by hand.

The format: 8 bytes little-endian header length ``n``, ``n`` bytes of JSON (may be padded with
spaces), then the data area.  Each JSON entry is ``{"dtype", "shape", "data_offsets": [b, e]}``
with offsets relative to the data area.  The entries tile the data area exactly (no gaps, no
overlap) and the file ends where the data area ends.

We parse headers ourselves so that a truncated file or an inconsistent header is reported with the
file's name before any work starts, and we write files ourselves so that every dtype we need
(``F8_E4M3``, ``BF16``, ``U8``, ``F32``, 0-d tensors) is written byte for byte the same way on
every run.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from nvfp4_jax.errors import NVFP4Error

# safetensors dtype string -> numpy dtype
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NUMPY_TO_ST = {v: k for k, v in DTYPES.items()}

# A header larger than this is certainly garbage (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(NVFP4Error, ValueError):
    """A checkpoint (source or output) is missing, malformed or inconsistent."""


def st_dtype(dtype) -> str:
    """safetensors dtype string of a numpy (or ml_dtypes) dtype."""
    dt = np.dtype(dtype)
    try:
        return _NUMPY_TO_ST[dt]
    except KeyError:
        raise CheckpointError(f"dtype {dt} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range in the file."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict]:
    """Parse and validate one safetensors file's header.

    Returns ``(entries by name, __metadata__)``.  Raises CheckpointError naming the file when the
    file is truncated, the header is not valid JSON, a tensor's byte range disagrees with its
    dtype and shape, or the tensors do not tile the data area exactly up to the end of the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"safetensors file {path} does not exist") from None
    if size < 8:
        raise CheckpointError(f"safetensors file {path} is truncated: {size} bytes, no header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"safetensors file {path} is truncated or corrupt: header length {n} "
                f"but the file has only {size} bytes"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"safetensors file {path} has an unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors file {path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    spans = []
    for name, h in header.items():
        try:
            dtype = h["dtype"]
            shape = tuple(int(s) for s in h["shape"])
            b, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"safetensors file {path}: malformed header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"safetensors file {path}: tensor {name!r} has unsupported dtype {dtype}")
        expect = math.prod(shape) * DTYPES[dtype].itemsize
        if e - b != expect or b < 0:
            raise CheckpointError(
                f"safetensors file {path}: tensor {name!r} ({dtype} {list(shape)}) needs {expect} bytes "
                f"but its data_offsets [{b}, {e}] span {e - b}"
            )
        entries[name] = TensorEntry(path, name, dtype, shape, data_start + b, data_start + e)
        spans.append((b, e, name))
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            raise CheckpointError(
                f"safetensors file {path}: tensor {name!r} starts at data offset {b}, expected {pos} "
                "(gap or overlap in the header's data_offsets)"
            )
        pos = e
    if data_start + pos != size:
        what = "truncated" if data_start + pos > size else "longer than its header says"
        raise CheckpointError(
            f"safetensors file {path} is {what}: the header describes {pos} data bytes after a "
            f"{n}-byte header ({data_start + pos} bytes in all) but the file has {size} bytes"
        )
    return entries, meta


def encode_header(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict | None) -> bytes:
    """Header bytes (length prefix included) for tensors ``(name, dtype, shape, nbytes)`` laid out
    in the given order.  Padded with spaces so the data area starts 8-byte aligned."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-(len(raw) + 8)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def save_file(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write a whole safetensors file from numpy arrays (any dtype in DTYPES, 0-d allowed)."""
    arrays = [(k, np.require(np.asarray(v), requirements='C')) for k, v in tensors.items()]
    head = encode_header([(k, st_dtype(a.dtype), a.shape, a.nbytes) for k, a in arrays], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for _, a in arrays:
            f.write(a.tobytes())


def array_from_bytes(buf, entry: TensorEntry) -> np.ndarray:
    """View raw little-endian bytes as the entry's numpy dtype and shape."""
    return np.frombuffer(buf, dtype=DTYPES[entry.dtype], count=math.prod(entry.shape)).reshape(entry.shape)


class FileCache:
    """Keeps each safetensors file open and reads tensors with ``pread`` into fresh buffers.

    Not a memory map on purpose: pages of a mapped file stay in the process's resident set once
    touched, so a layer-by-layer conversion would grow with the model. A buffer read here is freed
    with the last array that uses it, which keeps peak memory at one layer.
    """

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def read(self, entry: TensorEntry) -> np.ndarray:
        """The tensor as a numpy array of its own (one copy from the file)."""
        if entry.nbytes == 0:
            return np.zeros(entry.shape, DTYPES[entry.dtype])
        fd = self._fds.get(entry.file)
        if fd is None:
            fd = self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        buf = bytearray(entry.nbytes)
        view = memoryview(buf)
        done = 0
        while done < entry.nbytes:
            n = os.preadv(fd, [view[done:]], entry.start + done)
            if n <= 0:
                raise CheckpointError(f"{entry.file}: unexpected end of file reading {entry.nbytes} bytes "
                                      f"at offset {entry.start}")
            done += n
        return array_from_bytes(buf, entry)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
