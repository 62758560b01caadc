"""The checkpoint writer: a safetensors checkpoint laid out before any data exists (SPEC section 6).

    w = open_planned_writer("out/Kimi-NVFP4", plan.writer_units(), WriterOptions(shard_size=5e9))
    for unit in units:
        if w.is_done(unit):
            continue
        for name, array in quantized_tensors(unit):
            w.add(name, array)                 # written at its planned offset, in its final file
        w.finish_unit(unit, {"experts_without_tokens": 3})
    w.finalize(config, hf_quant_config, reader.extra_files(), report)

The whole layout (every stored tensor's name, dtype and shape, per unit, in add order) is given up
front; shard boundaries, headers and byte offsets follow from it (:func:`plan_shards`): a shard is
closed before a tensor that would push its data past ``shard_size``, and a tensor larger than
``shard_size`` gets a shard of its own. The shard files are created at their final size with their
final names and each tensor is written once, at its offset (no body file, no copy).

Several processes can write one checkpoint together: every process builds the writer from the same
units; process 0 calls :meth:`PlannedWriter.prepare` (creates ``OUT.partial`` with ``plan.json``
and every shard file), then every process calls :meth:`PlannedWriter.open` and adds its own
tensors; process 0 ends with :meth:`PlannedWriter.finalize` given every process's manifest.

Resume: :meth:`PlannedWriter.finish_unit` makes the process's writes durable and records the unit
(the tensors it wrote and a CRC-32 of their bytes) in its manifest (``manifest.json``, or
``manifest-p{I}-of-{N}.json`` for one of N processes). ``resume=True`` continues from it after
checking that the run's settings are those ``plan.json`` recorded (naming each one that differs)
and re-checking the finished units' bytes against their CRC-32.

``finalize`` checks that every planned tensor was written exactly once, writes the index,
``config.json``, ``hf_quant_config.json``, the report and the extra files, checks the index against
the shard headers, and only then renames ``OUT.partial`` to ``OUT``: a killed run never leaves
``OUT``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from .formats import get_format
from .safetensors_io import CheckpointError, encode_header, fsync_dir, read_header, st_dtype
from .. import guards
from ..errors import UsageError

MANIFEST = "manifest.json"
PLAN_NAME = "plan.json"  # the layout and settings every process agreed on
MANIFEST_VERSION = 1
REPORT_NAME = "nvfp4_report.json"
CHECKSUMS_NAME = "nvfp4_checksums.json"  # CRC-32 of every tensor as written, per shard; verify checks it
INDEX_NAME = "model.safetensors.index.json"
_CHUNK = 64 << 20


def _dump_json(obj) -> str:
    # ModelOpt writes its json files with indent=4 and no trailing newline; so do we.
    return json.dumps(obj, indent=4)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} file {path} is unreadable: {e}; delete {path.parent} and start over") from None


def _to_numpy(array) -> np.ndarray:
    a = np.asarray(array)  # jax arrays come back with their ml_dtypes dtype
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.require(a, requirements='C')  # (np.ascontiguousarray would turn 0-d into [1])


def starts_new_shard(open_count: int, open_bytes: int, nbytes: int, shard_size: int) -> bool:
    """The sharding rule: a shard is closed before a tensor that would push its data past
    ``shard_size`` (a tensor larger than ``shard_size`` therefore gets a shard of its own)."""
    return open_count > 0 and open_bytes + nbytes > shard_size


def plan_shards(specs, shard_size: int) -> list[list[tuple]]:
    """Split ``specs`` ``[(name, dtype, shape, nbytes), ...]`` (in add order) into shards."""
    shards: list[list[tuple]] = []
    open_bytes = 0
    for spec in specs:
        if not shards or starts_new_shard(len(shards[-1]), open_bytes, spec[3], shard_size):
            shards.append([])
            open_bytes = 0
        shards[-1].append(spec)
        open_bytes += spec[3]
    return shards


def _json_value(obj):
    return json.loads(json.dumps(obj))


@dataclasses.dataclass(frozen=True)
class WriterOptions:
    """How a :class:`PlannedWriter` writes.

    shard_size: maximum tensor-data bytes per shard (a single larger tensor gets its own shard).
    fmt: an output format name (``checkpoint.formats.FORMATS``): ``add`` stores each tensor under
        the format's names.
    resume: continue from ``OUT.partial`` (started afresh if it holds no plan). Without resume, an
        existing ``OUT.partial`` is refused unless overwrite=True, which wipes it.
    overwrite: replace an existing ``OUT`` at finalize (otherwise it is refused up front).
    verify_checksums: on resume, re-check the finished units' bytes against their CRC-32.
    settings: the run's options that change the output bytes (``ConversionPlan.settings``),
        recorded in ``plan.json``; a resume with other values is refused, naming them.
    """

    shard_size: float = 5e9
    fmt: str = "modelopt"
    resume: bool = False
    overwrite: bool = False
    verify_checksums: bool = True
    process_id: int = 0
    num_processes: int = 1
    settings: Mapping = dataclasses.field(default_factory=dict)


class PlannedWriter:
    """See the module docstring.

    units: ``[(unit, [(name, dtype, shape, nbytes), ...]), ...]``: every stored tensor (after the
        format's renaming), per unit, in add order.
    """

    def __init__(self, out_dir, units, options: WriterOptions = WriterOptions()):
        if int(options.shard_size) <= 0:
            raise UsageError(f"shard_size must be positive, got {options.shard_size}")
        self.out_dir = Path(out_dir)
        self.partial = self.out_dir.with_name(self.out_dir.name + ".partial")
        self.options, self.shard_size, self.format = options, int(options.shard_size), get_format(options.fmt)
        self.process_id, self.num_processes = int(options.process_id), int(options.num_processes)
        self.settings = _json_value({**options.settings, "fmt": options.fmt, "shard_size": self.shard_size,
                                     "num_processes": self.num_processes})
        self.unit_order = [u for u, _ in units]
        self._lay_out([(str(n), str(d), tuple(int(x) for x in s), int(b)) for _, ts in units for n, d, s, b in ts])
        plan = {"version": MANIFEST_VERSION, "fmt": options.fmt, "shard_size": self.shard_size,
                "num_processes": self.num_processes, "units": [[u, [list(t) for t in ts]] for u, ts in units]}
        self.digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
        self.manifest_path = self.partial / (
            MANIFEST if self.num_processes == 1 else f"manifest-p{self.process_id}-of-{self.num_processes}.json")
        self.units: dict[str, dict] = {}
        self.written: dict[str, list[str]] = {}  # unit -> tensors this process wrote
        self.tensor_crc32: dict[str, int] = {}  # stored name -> CRC-32 of its bytes as written
        self._pending: list[str] = []
        self._added: set[str] = set()
        self._fds: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._finalized = False
        self.resumed = False  # this process continues an interrupted run (its plan or manifest was there)

    def _lay_out(self, specs) -> None:
        """File names, headers, sizes and every tensor's place (``self.where``)."""
        names = [s[0] for s in specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[:5]
            raise CheckpointError(f"the output plan lists tensors twice: {dup}")
        if not specs:
            raise CheckpointError("no tensors were added; nothing to write")
        shards = plan_shards(specs, self.shard_size)
        n = len(shards)
        self.files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self.headers: list[bytes] = []
        self.sizes: list[int] = []
        self.where: dict[str, tuple] = {}  # name -> (file index, absolute offset, dtype, shape, nbytes)
        for i, shard in enumerate(shards):
            head = encode_header(shard, {"format": "pt"})
            pos = len(head)
            for name, dtype, shape, nbytes in shard:
                self.where[name] = (i, pos, dtype, shape, nbytes)
                pos += nbytes
            self.headers.append(head)
            self.sizes.append(pos)

    # -- process 0 ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Process 0, before any other process opens the files: lay out ``OUT.partial``."""
        guards.check_replaceable(self.out_dir, self.options.overwrite)
        plan_path = self.partial / PLAN_NAME
        if self.options.resume and plan_path.exists():
            self._check_resumable(_read_json(plan_path, "plan"))
            self.resumed = True
            return
        if self.partial.exists() or self.partial.is_symlink():
            laid_out_halfway = self.options.resume and (self.partial / guards.PARTIAL_MARKER).is_file()
            if not (self.options.overwrite or laid_out_halfway):  # a run killed while laying out: nothing kept
                raise CheckpointError(
                    f"{self.partial} exists but holds no resumable run{' (no ' + PLAN_NAME + ')' if self.options.resume else ''}; "
                    "pass --resume to continue an interrupted run, or --overwrite to start over")
            guards.check_partial_removable(self.partial)
            shutil.rmtree(self.partial)
        guards.check_free_space(self.partial, sum(self.sizes))
        self.partial.mkdir(parents=True)
        (self.partial / guards.PARTIAL_MARKER).write_text("an unfinished nvfp4-jax output; see plan.json\n")
        for fname, head, size in zip(self.files, self.headers, self.sizes):
            with open(self.partial / fname, "wb") as f:
                f.write(head)
                f.truncate(size)  # sparse until every process has written its tensors
                f.flush()
                os.fsync(f.fileno())
        _atomic_write_text(plan_path, json.dumps({"digest": self.digest, "settings": self.settings,
                                                  "files": self.files}, indent=1))
        fsync_dir(self.partial)

    def _check_resumable(self, plan: dict) -> None:
        recorded = plan.get("settings") or {}
        differ = [k for k in sorted(set(recorded) | set(self.settings)) if recorded.get(k) != self.settings.get(k)]
        if differ:
            what = ", ".join(f"{k} {recorded.get(k)!r} (this run: {self.settings.get(k)!r})" for k in differ)
            raise CheckpointError(f"cannot resume {self.partial}: it was started with other settings: {what}; "
                                  "rerun with the original settings or start over with --overwrite")
        if plan.get("digest") != self.digest:
            raise CheckpointError(f"cannot resume {self.partial}: it was started with the same settings but plans "
                                  "a different output (another source checkpoint?); start over with --overwrite")
        for fname, head, size in zip(self.files, self.headers, self.sizes):
            p = self.partial / fname
            ok = p.exists() and p.stat().st_size == size
            if ok:
                with open(p, "rb") as f:
                    ok = f.read(len(head)) == head
            if not ok:
                raise CheckpointError(f"cannot resume: shard {p} is missing or does not match the plan; "
                                      f"delete {self.partial} and start over")

    # -- every process --------------------------------------------------------------------------

    def open(self) -> None:
        """Every process, once process 0 has prepared: pick up this process's manifest on resume."""
        if not (self.partial / PLAN_NAME).exists():
            raise CheckpointError(f"{self.partial / PLAN_NAME} is missing: is {self.partial} on a file system "
                                  "shared by every process?")
        if self.options.resume and self.manifest_path.exists():
            self.resumed = True
            m = _read_json(self.manifest_path, "resume manifest")
            if m.get("digest") != self.digest:
                raise CheckpointError(f"resume manifest {self.manifest_path} belongs to another plan; "
                                      f"delete {self.partial} and start over")
            self.units, self.written = m["units"], m["tensors"]
            self.tensor_crc32 = {n: int(c) for n, c in m.get("tensor_crc32", {}).items()}
            self._added = {n for ts in self.written.values() for n in ts}
            if self.options.verify_checksums:
                for unit in self.written:
                    self._verify_unit(unit)

    def _verify_unit(self, unit: str) -> None:
        """On resume: re-read the tensors this process wrote for ``unit`` and check their CRC-32."""
        for name in self.written[unit]:
            i, offset, _, _, nbytes = self.where[name]
            path = self.partial / self.files[i]
            if _file_crc32(path, offset, nbytes) != self.tensor_crc32.get(name):
                raise CheckpointError(
                    f"cannot resume: the bytes of {name} ({unit}) in {path} do not match their checksum in "
                    f"{self.manifest_path}; delete {self.partial} and start over")

    def is_done(self, unit: str) -> bool:
        return unit in self.units

    def unit_info(self) -> dict[str, dict]:
        """Info dicts of the finished units (including those of a resumed run)."""
        return dict(self.units)

    def manifest(self) -> dict:
        mine = {n for names in self.written.values() for n in names}
        return {"process_id": self.process_id, "digest": self.digest, "units": self.units, "tensors": self.written,
                "tensor_crc32": {n: c for n, c in self.tensor_crc32.items() if n in mine}}

    def add(self, name: str, array) -> None:
        """Write one of this process's tensors (numpy or jax array, logical name) at its planned place."""
        self._check_open()
        for n, a in self.format.encode(name, array):
            self._write(n, _to_numpy(a))

    def _write(self, name: str, a: np.ndarray) -> None:
        if name not in self.where:
            raise CheckpointError(f"tensor {name!r} is not in the output plan")
        i, offset, dtype, shape, nbytes = self.where[name]
        if (st_dtype(a.dtype), tuple(a.shape)) != (dtype, shape):
            raise CheckpointError(f"tensor {name!r} is {st_dtype(a.dtype)} {list(a.shape)} but the output plan "
                                  f"expects {dtype} {list(shape)}")
        if name in self._added:
            raise CheckpointError(f"tensor {name!r} was added twice")
        fd = self._fds.get(i)
        if fd is None:
            fd = self._fds[i] = os.open(self.partial / self.files[i], os.O_WRONLY)
        buf = memoryview(a.reshape(-1).view(np.uint8))
        done = 0
        while done < nbytes:  # pwrite may write less than asked (e.g. above 2 GB)
            done += os.pwrite(fd, buf[done:], offset + done)
        self.tensor_crc32[name] = zlib.crc32(buf)
        self._dirty.add(i)
        self._pending.append(name)
        self._added.add(name)

    def finish_unit(self, unit: str, info: dict | None = None) -> None:
        """Make this process's writes durable and record ``unit`` (its share of it) as done."""
        self._check_open()
        if unit in self.units:
            raise CheckpointError(f"unit {unit!r} was already finished")
        for i in sorted(self._dirty):
            os.fsync(self._fds[i])
        self._dirty.clear()
        self.units[unit] = _json_value(info or {})  # must be JSON
        self.written[unit] = list(self._pending)
        self._pending = []
        _atomic_write_text(self.manifest_path, json.dumps({"version": MANIFEST_VERSION, **self.manifest()}))
        fsync_dir(self.partial)

    def close(self) -> None:
        """Release file handles without finalizing (``OUT.partial`` stays for resume)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- process 0, at the end ------------------------------------------------------------------

    def finalize(self, config: dict, quant_config: dict | None, extra_files=(), report: dict | None = None, *,
                 manifests=None, units: dict | None = None) -> Path:
        """Process 0, after every process finished: check coverage, write the rest, rename.

        config: the config.json to write; its quantization_config must be the writer's format's.
        quant_config: hf_quant_config.json contents (None: not written).
        extra_files: paths copied verbatim by file name (tokenizer, generation config, *.py, ...).
        report: written as nvfp4_report.json (with the finished units' info under "units").
        manifests: every process's :meth:`manifest` (may be left out when there is one process).
        units: the finished units' info for the report (default: this process's)."""
        self._check_open()
        if manifests is None:
            if self.num_processes != 1:
                raise CheckpointError("finalize needs every process's manifest (manifests=) in a multi-process run")
            manifests = [self.manifest()]
        self.close()
        self.format.check_config(config.get("quantization_config"))
        self._check_coverage(manifests)
        self._write_side_files(config, quant_config, extra_files)
        self._write_checksums(manifests)
        if report is not None:
            report = dict(report)
            report.setdefault("units", self.units if units is None else units)
            _atomic_write_text(self.partial / REPORT_NAME, _dump_json(report))
        self._check_index()
        self._publish()
        self._finalized = True
        return self.out_dir

    def _check_coverage(self, manifests) -> None:
        by: dict[str, int] = {}
        for m in manifests:
            for unit in self.unit_order:
                if unit not in m["units"]:
                    raise CheckpointError(f"process {m['process_id']} did not finish {unit}")
            for names in m["tensors"].values():
                for n in names:
                    if n in by:
                        raise CheckpointError(f"tensor {n!r} was written by processes {by[n]} and {m['process_id']}")
                    by[n] = m["process_id"]
        missing = sorted(set(self.where) - set(by))
        if missing:
            raise CheckpointError(f"{len(missing)} planned tensors were written by no process, e.g. {missing[:5]}")

    def _write_side_files(self, config: dict, quant_config: dict | None, extra_files) -> None:
        """The index (from the shard headers), config files and extra files next to the shards."""
        weight_map, total = {}, 0
        for fname in self.files:
            entries, _ = read_header(self.partial / fname)  # parses, tiles the file exactly
            for name, e in entries.items():
                weight_map[name] = fname
                total += e.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic_write_text(self.partial / INDEX_NAME, _dump_json(index))
        _atomic_write_text(self.partial / "config.json", _dump_json(config))
        if quant_config is not None:
            _atomic_write_text(self.partial / "hf_quant_config.json", _dump_json(quant_config))
        reserved = {INDEX_NAME, "config.json", "hf_quant_config.json", MANIFEST, PLAN_NAME, guards.PARTIAL_MARKER,
                    CHECKSUMS_NAME, *self.files}
        for f in map(Path, extra_files):
            if f.name in reserved:
                raise CheckpointError(f"extra file {f} would overwrite a file the writer produces")
            shutil.copy2(f, self.partial / f.name)

    def _write_checksums(self, manifests) -> None:
        """``nvfp4_checksums.json``: every tensor's CRC-32 as written, per shard, for verify."""
        crc = {n: int(c) for m in manifests for n, c in m.get("tensor_crc32", {}).items()}
        per_file: dict[str, dict[str, str]] = {f: {} for f in self.files}
        for name, (i, *_rest) in sorted(self.where.items()):
            per_file[self.files[i]][name] = f"{crc[name]:08x}"
        _atomic_write_text(self.partial / CHECKSUMS_NAME, _dump_json({"algorithm": "crc32", "files": per_file}))

    def _check_index(self) -> None:
        """The last check: the index and the shard headers agree, every tensor exactly once."""
        seen: dict[str, str] = {}
        for final in self.files:
            for name in read_header(self.partial / final)[0]:
                if name in seen:
                    raise CheckpointError(f"tensor {name!r} is listed in both {seen[name]} and {final}")
                seen[name] = final
        index = _read_json(self.partial / INDEX_NAME, "index")
        if seen != index["weight_map"]:
            raise CheckpointError(f"index {self.partial / INDEX_NAME} disagrees with the shard headers")

    def _publish(self) -> None:
        """Remove the resume files, then rename ``OUT.partial`` to ``OUT`` atomically."""
        for p in [self.partial / PLAN_NAME, self.partial / guards.PARTIAL_MARKER, self.manifest_path,
                  *self.partial.glob("manifest-p*-of-*.json")]:
            p.unlink(missing_ok=True)
        fsync_dir(self.partial)
        if self.out_dir.exists() or self.out_dir.is_symlink():
            if not self.options.overwrite:
                raise CheckpointError(f"output directory {self.out_dir} appeared while writing; refusing to replace it")
            guards.check_replaceable(self.out_dir, overwrite=True)  # it may have changed since prepare()
            old = self.out_dir.with_name(self.out_dir.name + f".old-{os.getpid()}")
            os.replace(self.out_dir, old)
            os.replace(self.partial, self.out_dir)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.out_dir)
        fsync_dir(self.out_dir.parent)

    def _check_open(self):
        if self._finalized:
            raise CheckpointError(f"writer for {self.out_dir} is already finalized")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _file_crc32(path: Path, offset: int, nbytes: int) -> int:
    """CRC-32 of ``nbytes`` bytes of ``path`` from ``offset``."""
    crc, end = 0, offset + nbytes
    with open(path, "rb") as f:
        f.seek(offset)
        while offset < end:
            chunk = f.read(min(_CHUNK, end - offset))
            if not chunk:
                raise CheckpointError(f"{path} is shorter than planned (ends before byte {end})")
            crc = zlib.crc32(chunk, crc)
            offset += len(chunk)
    return crc


def open_planned_writer(out_dir, units, options: WriterOptions = WriterOptions()) -> PlannedWriter:
    """The prepared and opened writer of a one-process run (``options`` of process 0 of 1)."""
    writer = PlannedWriter(out_dir, units, dataclasses.replace(options, process_id=0, num_processes=1))
    writer.prepare()
    writer.open()
    return writer
