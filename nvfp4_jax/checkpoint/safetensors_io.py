"""Minimal safetensors reading and writing, by hand.

The format: 8 bytes little-endian header length ``n``, ``n`` bytes of JSON (may be padded with
spaces), then the data area.  Each JSON entry is ``{"dtype", "shape", "data_offsets": [b, e]}``
with offsets relative to the data area.  The entries tile the data area exactly (no gaps, no
overlap) and the file ends where the data area ends.

We parse headers ourselves so that a truncated file or an inconsistent header is reported with the
file's name before any work starts, and we write files ourselves so that every dtype we need
(``F8_E4M3``, ``BF16``, ``U8``, ``F32``, 0-d tensors) is written byte for byte the same way on
every run.

This module holds the project's only header parser, checkpoint-directory scanner and dtype table:
``read_header`` (one file) and ``scan_checkpoint(root)`` raise CheckpointError at the first
problem, as the source reader needs; ``scan_checkpoint(root, strict=False)`` returns every problem
as a :class:`ScanProblem`, as ``verify`` needs to report them all.
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
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
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


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class ScanProblem:
    """One thing wrong with a checkpoint's safetensors files, found by :func:`scan_checkpoint`.

    subject: the file (base name) or tensor the problem is about.
    message: one line that names the file, fit to raise or print.
    severity: "error" or "warning" (what ``verify`` reports).
    readable: the tensors the index lists can still be read (a tensor stored twice), so a strict
        scan does not stop for it. A tensor or file outside the index is not readable: reading by
        the index would drop it without a word.
    """

    subject: str
    message: str
    severity: str = ERROR
    readable: bool = False


@dataclass
class CheckpointScan:
    """What :func:`scan_checkpoint` found: the tensors by name and, for a lenient scan, the problems."""

    tensors: dict[str, TensorEntry]
    problems: list[ScanProblem]


class _Problems:
    """Collects problems; a strict collector raises CheckpointError at the first one that matters."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.items: list[ScanProblem] = []

    def add(self, subject: str, message: str, severity: str = ERROR, readable: bool = False):
        if self.strict and not readable:
            raise CheckpointError(message)
        self.items.append(ScanProblem(subject, message, severity, readable))


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict]:
    """Parse and validate one safetensors file's header.

    Returns ``(entries by name, __metadata__)``.  Raises CheckpointError naming the file when the
    file is truncated, the header is not valid JSON, a tensor's byte range disagrees with its
    dtype and shape, or the tensors do not tile the data area exactly up to the end of the file.
    """
    return _scan_file(Path(path), _Problems(strict=True))


def _scan_file(path: Path, problems: _Problems) -> tuple[dict[str, TensorEntry], dict]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        problems.add(path.name, f"safetensors file {path} does not exist")
        return {}, {}
    if size < 8:
        problems.add(path.name, f"safetensors file {path} is truncated: {size} bytes, no header")
        return {}, {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            problems.add(path.name, f"safetensors file {path} is truncated or corrupt: header length {n} "
                                    f"but the file has only {size} bytes")
            return {}, {}
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.add(path.name, f"safetensors file {path} has an unreadable header: {e}")
        return {}, {}
    if not isinstance(header, dict):
        problems.add(path.name, f"safetensors file {path}: header is not a JSON object")
        return {}, {}
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, h in header.items():
        try:
            dtype = h["dtype"]
            shape = tuple(int(s) for s in h["shape"])
            b, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            problems.add(name, f"safetensors file {path}: malformed header entry for tensor {name!r}")
            continue
        if dtype not in DTYPES:
            problems.add(name, f"safetensors file {path}: tensor {name!r} has unsupported dtype {dtype}",
                         severity=WARNING)
        elif e - b != math.prod(shape) * DTYPES[dtype].itemsize or b < 0:
            expect = math.prod(shape) * DTYPES[dtype].itemsize
            problems.add(name, f"safetensors file {path}: tensor {name!r} ({dtype} {list(shape)}) needs "
                               f"{expect} bytes but its data_offsets [{b}, {e}] span {e - b}")
        if 0 <= b <= e:
            entries[name] = TensorEntry(path, name, dtype, shape, data_start + b, data_start + e)
    _check_data_area(path, entries, data_start, size, problems)
    return entries, meta


def _check_data_area(path: Path, entries: dict[str, TensorEntry], data_start: int, size: int,
                     problems: _Problems):
    """The tensors must tile the data area without gaps or overlap, up to the end of the file."""
    pos = 0
    for entry in sorted(entries.values(), key=lambda x: (x.start, x.end, x.name)):
        if entry.start - data_start != pos:
            problems.add(entry.name, f"safetensors file {path}: tensor {entry.name!r} starts at data offset "
                                     f"{entry.start - data_start}, expected {pos} (gap or overlap in the "
                                     "header's data_offsets)")
        pos = entry.end - data_start
    if data_start + pos != size:
        what = "truncated" if data_start + pos > size else "longer than its header says"
        problems.add(path.name, f"safetensors file {path} is {what}: the header describes {pos} data bytes "
                                f"after a {data_start - 8}-byte header ({data_start + pos} bytes in all) but "
                                f"the file has {size} bytes")
    for entry in entries.values():
        if entry.end > size:
            problems.add(entry.name, f"{path.name}: data of {entry.name!r} ends at byte {entry.end} beyond "
                                     f"the file size {size} (truncated file)")


def scan_checkpoint(root, *, strict: bool = True) -> CheckpointScan:
    """Every tensor of the checkpoint directory ``root``, located through its index
    (``model.safetensors.index.json``) or, without one, ``model.safetensors`` or else every
    ``*.safetensors`` file.

    strict: raise CheckpointError at the first problem that keeps a listed tensor from being read
    (what a reader needs). Otherwise (what ``verify`` needs) return every problem instead, and also
    the tensors that files hold outside their index, since engines load every tensor of a file.
    """
    root = Path(root)
    problems = _Problems(strict)
    index_path = root / INDEX_NAME
    weight_map = _weight_map(index_path, problems) if index_path.exists() else None
    if weight_map is not None:
        tensors = _scan_indexed(root, index_path, weight_map, problems)
    else:
        tensors = _scan_unindexed(root, problems)
    return CheckpointScan(tensors, problems.items)


def _weight_map(index_path: Path, problems: _Problems) -> dict | None:
    try:
        index = json.loads(index_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.add(index_path.name, f"index file {index_path} is not valid JSON: {e}")
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        problems.add(index_path.name, f"index file {index_path} has no weight_map")
        return None
    return weight_map


def _scan_indexed(root: Path, index_path: Path, weight_map: dict, problems: _Problems) -> dict[str, TensorEntry]:
    headers: dict[str, dict[str, TensorEntry]] = {}
    for fname in sorted(set(weight_map.values())):
        if not (root / fname).exists():
            problems.add(fname, f"index file {index_path} names {fname}, which does not exist in {root}")
            continue
        headers[fname], _ = _scan_file(root / fname, problems)
    for name, fname in weight_map.items():
        if fname in headers and name not in headers[fname]:
            problems.add(name, f"tensor {name!r} is listed in the index {index_path} under {fname}, but "
                               f"{root / fname} has no such tensor")
    tensors: dict[str, TensorEntry] = {}
    for fname, entries in headers.items():
        for name, entry in entries.items():
            indexed = weight_map.get(name) == fname
            if not indexed:  # a converter reading by the index would silently drop it
                problems.add(name, f"tensor {name!r} is present in {root / fname} but the index {index_path} "
                                   + (f"places it in {weight_map[name]!r}" if name in weight_map else "does not list it")
                                   + ": the index and the shards disagree")
            if name in tensors:
                problems.add(name, f"tensor {name!r} stored twice ({tensors[name].file.name}, {fname})",
                             readable=True)
            if indexed:
                tensors[name] = entry
            elif not problems.strict:
                tensors.setdefault(name, entry)
    named = set(headers)
    for p in sorted(root.glob("*.safetensors")):
        if p.name not in named:
            problems.add(p.name, f"safetensors file {p} is not referenced by the index {index_path}: the index and "
                                 "the shards disagree", severity=WARNING)
    return tensors


def _scan_unindexed(root: Path, problems: _Problems) -> dict[str, TensorEntry]:
    files = [SINGLE_NAME] if (root / SINGLE_NAME).exists() else sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        problems.add(str(root), f"checkpoint directory {root} has no *.safetensors files and no {INDEX_NAME}")
    tensors: dict[str, TensorEntry] = {}
    for fname in files:
        entries, _ = _scan_file(root / fname, problems)
        for name, entry in entries.items():
            if name in tensors:
                problems.add(name, f"tensor {name!r} appears in both {tensors[name].file} and {entry.file}")
            tensors[name] = entry
    return tensors


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
        self.bytes_read = 0  # what read() returned, for the run report beside the OS counter

    def read(self, entry: TensorEntry) -> np.ndarray:
        """The tensor as a numpy array of its own (one copy from the file)."""
        if entry.nbytes == 0:
            return np.zeros(entry.shape, DTYPES[entry.dtype])
        fd = self._fds.get(entry.file)
        if fd is None:  # two threads may open the file at once (read-ahead and writer): one fd is kept
            opened = os.open(entry.file, os.O_RDONLY)
            fd = self._fds.setdefault(entry.file, opened)
            if fd != opened:
                os.close(opened)
        buf = bytearray(entry.nbytes)
        view = memoryview(buf)
        done = 0
        while done < entry.nbytes:
            n = os.preadv(fd, [view[done:]], entry.start + done)
            if n <= 0:
                raise CheckpointError(f"{entry.file}: unexpected end of file reading {entry.nbytes} bytes "
                                      f"at offset {entry.start}")
            done += n
        self.bytes_read += done
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
