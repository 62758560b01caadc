"""Streaming, resumable safetensors checkpoint writer (SPEC section 6).

    w = CheckpointWriter("out/Kimi-NVFP4", shard_size=5e9)
    for layer in range(n):
        unit = f"layer.{layer}"
        if w.is_done(unit):
            continue
        for name, array in quantized_tensors(layer):     # always the same order for a unit
            w.add(name, array)
        w.finish_unit(unit, {"experts_without_tokens": 3})
    w.finalize(config, hf_quant_config, reader.extra_files(), report)

Layout on disk while running (everything under ``OUT.partial/``):

- ``shard-00001.safetensors`` ...: closed shards (final bytes, final name given at finalize);
- ``shard-0000K.body``: tensor data of the shard being filled (its header is written when the shard
  closes: the file is then ``header + body``);
- ``manifest.json``: written atomically at every ``finish_unit``: finished units (with their info),
  closed shards with sha256, and the open shard's tensor list and body length.

Determinism: tensors are laid out in the order they are added; a shard is closed before a tensor
that would push its data past ``shard_size`` (a tensor larger than ``shard_size`` gets a shard of
its own).  Given the same sequence of ``add`` calls, the bytes are the same.  Resume restores the
state recorded at the last ``finish_unit`` (closed shards kept, open body truncated to its recorded
length, anything newer deleted), so a resumed run that re-adds the remaining units in the same
order is byte-identical to an uninterrupted one.

``finalize`` closes the last shard, names shards ``model-0000i-of-0000N.safetensors``, writes the
index, ``config.json``, ``hf_quant_config.json``, the report and the extra files, re-reads every
shard header to check that each tensor is listed exactly once, and only then renames
``OUT.partial`` to ``OUT``.  A killed run therefore never leaves ``OUT``.

:class:`PlannedWriter` gives the same files when the whole layout (every tensor's name, dtype and
shape, in the order this writer would receive them) is known before any data exists: shard
boundaries, headers and byte offsets are computed up front with the same rule
(:func:`starts_new_shard`), the shard files are created at their final size, and each tensor is
written once, at its offset, into its final file (no body file, no copy, no re-read for hashing).
``nvfp4_jax.pipeline.convert`` uses it for every run: one process (:func:`open_planned_writer`),
or many processes writing one checkpoint together (``nvfp4_jax.distributed``).
:class:`CheckpointWriter` stays the writer for callers that do not know the layout up front.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from . import formats
from .safetensors_io import CheckpointError, encode_header, fsync_dir, read_header, st_dtype
from ..errors import UsageError

MANIFEST = "manifest.json"
PLAN_NAME = "plan.json"  # PlannedWriter: the layout every process agreed on
MANIFEST_VERSION = 1
REPORT_NAME = "nvfp4_report.json"
INDEX_NAME = "model.safetensors.index.json"
FORMATS = ("modelopt", "compressed-tensors")
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def starts_new_shard(open_count: int, open_bytes: int, nbytes: int, shard_size: int) -> bool:
    """The sharding rule of both writers: a shard is closed before a tensor that would push its data
    past ``shard_size`` (a tensor larger than ``shard_size`` therefore gets a shard of its own)."""
    return open_count > 0 and open_bytes + nbytes > shard_size


def _to_numpy(array) -> np.ndarray:
    a = np.asarray(array)  # jax arrays come back with their ml_dtypes dtype
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.require(a, requirements='C')  # (np.ascontiguousarray would turn 0-d into [1])


def _publish(partial: Path, out_dir: Path, overwrite: bool, final_files: list[str], weight_map: dict[str, str],
             total: int, config: dict, quant_config: dict | None, extra_files, report: dict | None, units: dict,
             scratch) -> None:
    """The common end of both writers: index, config files, extra files and report next to the
    finished shards in ``partial``, a last check that index and headers agree, removal of the
    ``scratch`` files, then the atomic rename of ``partial`` to ``out_dir``."""
    scratch = [Path(p) for p in scratch]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _atomic_write_text(partial / INDEX_NAME, _dump_json(index))
    _atomic_write_text(partial / "config.json", _dump_json(config))
    if quant_config is not None:
        _atomic_write_text(partial / "hf_quant_config.json", _dump_json(quant_config))
    reserved = {INDEX_NAME, "config.json", "hf_quant_config.json", MANIFEST, *final_files, *(p.name for p in scratch)}
    for f in extra_files:
        f = Path(f)
        if f.name in reserved:
            raise CheckpointError(f"extra file {f} would overwrite a file the writer produces")
        shutil.copy2(f, partial / f.name)
    if report is not None:
        rep = dict(report)
        rep.setdefault("units", units)
        _atomic_write_text(partial / REPORT_NAME, _dump_json(rep))

    # last check: the index and the shard headers agree, every tensor exactly once
    seen: dict[str, str] = {}
    for final in final_files:
        for name in read_header(partial / final)[0]:
            if name in seen:
                raise CheckpointError(f"tensor {name!r} is listed in both {seen[name]} and {final}")
            seen[name] = final
    if seen != index["weight_map"]:
        raise CheckpointError(f"index {partial / INDEX_NAME} disagrees with the shard headers")

    for p in scratch:
        p.unlink(missing_ok=True)
    fsync_dir(partial)
    if out_dir.exists():
        if not overwrite:
            raise CheckpointError(f"output directory {out_dir} appeared while writing; refusing to replace it")
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(partial, out_dir)
    fsync_dir(out_dir.parent)


def _output_paths(out_dir, shard_size, fmt) -> tuple[Path, Path, int]:
    """(OUT, OUT.partial, shard size) after checking the writer's arguments."""
    out_dir = Path(out_dir)
    if int(shard_size) <= 0:
        raise UsageError(f"shard_size must be positive, got {shard_size}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {FORMATS}")
    return out_dir, out_dir.with_name(out_dir.name + ".partial"), int(shard_size)


class CheckpointWriter:
    """See the module docstring.

    out_dir: final directory; work happens in ``out_dir + ".partial"``.
    shard_size: maximum tensor-data bytes per shard (a single larger tensor gets its own shard).
    overwrite: replace an existing ``out_dir`` at finalize (otherwise it is refused up front).
    resume: continue from ``OUT.partial/manifest.json`` (started afresh if there is none).  Without
        resume, an existing ``OUT.partial`` is refused unless overwrite=True, which wipes it.
    fmt: "modelopt" (tensors written as added) or "compressed-tensors" (``add`` renames and inverts
        scales with formats.to_compressed_tensors).
    verify_checksums: on resume, re-hash the kept shards against the manifest.
    """

    def __init__(self, out_dir, *, shard_size=5e9, overwrite=False, resume=False, fmt="modelopt",
                 verify_checksums=True):
        self.out_dir, self.partial, self.shard_size = _output_paths(out_dir, shard_size, fmt)
        self.fmt = fmt
        self.overwrite = overwrite
        if self.out_dir.exists() and not overwrite:
            raise CheckpointError(f"output directory {self.out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
        self._finalized = False
        self._body = None  # open file object of the current shard's body
        self._stale_bodies: list[Path] = []  # bodies of shards closed since the last manifest
        if resume and (self.partial / PLAN_NAME).exists():
            plan = _read_json(self.partial / PLAN_NAME, "plan")
            raise CheckpointError(
                f"cannot resume {self.partial} with the streaming writer: it was laid out in advance by a "
                f"planned run of {plan.get('num_processes')} process(es) (nvfp4-jax convert); resume it with "
                "nvfp4-jax convert --resume and the same --num-processes")
        if resume and (self.partial / MANIFEST).exists():
            self._resume(verify_checksums)
        else:
            if self.partial.exists():
                if not (overwrite or resume):
                    raise CheckpointError(
                        f"{self.partial} exists (an interrupted run?); pass resume=True (--resume) to continue it "
                        "or overwrite=True (--overwrite) to start over"
                    )
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
            self.units: dict[str, dict] = {}
            self.closed: list[dict] = []  # {"file", "sha256", "size", "tensors": [names]}
            self.open_tensors: list[list] = []  # [name, dtype, shape, nbytes]
            self.open_bytes = 0
            self._write_manifest()
        self._names = {t[0] for t in self.open_tensors}
        for s in self.closed:
            self._names.update(s["tensors"])

    # -- state ----------------------------------------------------------------------------------

    def _shard_index(self) -> int:
        return len(self.closed) + 1

    def _body_path(self) -> Path:
        return self.partial / f"shard-{self._shard_index():05d}.body"

    def _write_manifest(self) -> None:
        m = {
            "version": MANIFEST_VERSION,
            "fmt": self.fmt,
            "shard_size": self.shard_size,
            "units": self.units,
            "closed_shards": self.closed,
            "open_shard": {"tensors": self.open_tensors, "body_bytes": self.open_bytes},
        }
        _atomic_write_text(self.partial / MANIFEST, json.dumps(m, indent=1))
        fsync_dir(self.partial)

    def _resume(self, verify: bool) -> None:
        mpath = self.partial / MANIFEST
        try:
            m = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"resume manifest {mpath} is corrupt: {e}; delete {self.partial} and start over") from None
        if m.get("version") != MANIFEST_VERSION:
            raise CheckpointError(f"resume manifest {mpath} has version {m.get('version')}, expected {MANIFEST_VERSION}")
        if m["fmt"] != self.fmt or m["shard_size"] != self.shard_size:
            raise CheckpointError(
                f"cannot resume {self.partial}: it was started with fmt={m['fmt']!r}, shard_size={m['shard_size']} "
                f"but this run uses fmt={self.fmt!r}, shard_size={self.shard_size}"
            )
        self.units = m["units"]
        self.closed = m["closed_shards"]
        self.open_tensors = m["open_shard"]["tensors"]
        self.open_bytes = m["open_shard"]["body_bytes"]
        keep = {MANIFEST}
        for s in self.closed:
            p = self.partial / s["file"]
            if not p.exists() or p.stat().st_size != s["size"]:
                raise CheckpointError(f"cannot resume: shard {p} is missing or has the wrong size; delete {self.partial} and start over")
            if verify and _sha256(p) != s["sha256"]:
                raise CheckpointError(f"cannot resume: shard {p} does not match its checksum in {mpath}; delete {self.partial} and start over")
            keep.add(s["file"])
        body = self._body_path()
        if self.open_bytes:
            if not body.exists() or body.stat().st_size < self.open_bytes:
                raise CheckpointError(f"cannot resume: {body} is shorter than the {self.open_bytes} bytes recorded in {mpath}")
            with open(body, "r+b") as f:
                f.truncate(self.open_bytes)
                os.fsync(f.fileno())
            keep.add(body.name)
        # everything written after the last finished unit goes
        for p in self.partial.iterdir():
            if p.name not in keep:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    # -- public API -----------------------------------------------------------------------------

    def is_done(self, unit: str) -> bool:
        return unit in self.units

    def unit_info(self) -> dict[str, dict]:
        """Info dicts of the finished units (including those of a resumed run), in order."""
        return dict(self.units)

    def add(self, name: str, array) -> None:
        """Append one tensor (numpy or jax array; dtype kept: bf16, uint8, float8_e4m3fn, f32, ...)."""
        self._check_open()
        items = formats.to_compressed_tensors(name, array) if self.fmt == "compressed-tensors" else [(name, array)]
        for n, a in items:
            self._add_one(n, _to_numpy(a))

    def _add_one(self, name: str, a: np.ndarray) -> None:
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} was added twice")
        dtype = st_dtype(a.dtype)
        nbytes = a.nbytes
        if starts_new_shard(len(self.open_tensors), self.open_bytes, nbytes, self.shard_size):
            self._close_shard()
        if self._body is None:
            self._body = open(self._body_path(), "ab")
            if self._body.tell() != self.open_bytes:
                raise CheckpointError(f"{self._body_path()} has {self._body.tell()} bytes, expected {self.open_bytes}")
        self._body.write(a.reshape(-1).view(np.uint8))  # raw little-endian bytes, no copy
        self.open_tensors.append([name, dtype, list(a.shape), nbytes])
        self.open_bytes += nbytes
        self._names.add(name)

    def finish_unit(self, unit: str, info: dict | None = None) -> None:
        """Make everything added so far durable and record ``unit`` as done."""
        self._check_open()
        if unit in self.units:
            raise CheckpointError(f"unit {unit!r} was already finished")
        if self._body is not None:
            self._body.flush()
            os.fsync(self._body.fileno())
        self.units[unit] = json.loads(json.dumps(info or {}))  # must be JSON
        self._write_manifest()
        for p in self._stale_bodies:
            p.unlink(missing_ok=True)
        self._stale_bodies = []

    def _close_shard(self) -> None:
        body = self._body_path()
        if self._body is not None:
            self._body.close()
            self._body = None
        fname = f"shard-{self._shard_index():05d}.safetensors"
        path = self.partial / fname
        head = encode_header([(n, d, tuple(s), b) for n, d, s, b in self.open_tensors], {"format": "pt"})
        h = hashlib.sha256(head)
        with open(path, "wb") as out, open(body, "rb") as src:
            out.write(head)
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        if size != len(head) + self.open_bytes:
            raise CheckpointError(f"shard {path}: wrote {size} bytes, expected {len(head) + self.open_bytes}")
        self.closed.append({"file": fname, "sha256": h.hexdigest(), "size": size,
                            "tensors": [t[0] for t in self.open_tensors]})
        self.open_tensors = []
        self.open_bytes = 0
        # The body is deleted only after the manifest no longer refers to it; until the next
        # finish_unit the manifest still describes it as the open shard, so keep it around.
        self._stale_bodies.append(body)

    def finalize(self, config: dict, quant_config: dict | None, extra_files=(), report: dict | None = None,
                 *, quantization_config: dict | None = None) -> Path:
        """Close the last shard, write index/config/extra files, verify, rename to ``out_dir``.

        config: the config.json to write (the source's).  quantization_config, when given, replaces
            config["quantization_config"]; otherwise config must already carry the new one.  It must
            match the writer's format (quant_method "modelopt", or "compressed-tensors" with format
            "nvfp4-pack-quantized").
        quant_config: hf_quant_config.json contents (None: not written; the compressed-tensors
            format does not use it).
        extra_files: paths copied verbatim by file name (tokenizer, generation config, *.py, ...).
        report: written as nvfp4_report.json (with the finished units' info under "units").
        """
        self._check_open()
        config = dict(config)
        if quantization_config is not None:
            config["quantization_config"] = quantization_config
        self._check_quant_config(config.get("quantization_config"))
        if self.open_tensors:
            self._close_shard()
        if self._body is not None:
            self._body.close()
            self._body = None
        n = len(self.closed)
        if n == 0:
            raise CheckpointError("no tensors were added; nothing to write")

        # rename shards to their final names
        weight_map: dict[str, str] = {}
        total = 0
        final_files = []
        for i, s in enumerate(self.closed, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            src, dst = self.partial / s["file"], self.partial / final
            if src != dst:
                os.replace(src, dst)
            final_files.append(final)
            entries, _ = read_header(dst)  # verification: the shard parses and matches the manifest
            if list(entries) != s["tensors"]:
                raise CheckpointError(f"shard {dst}: its header lists {len(entries)} tensors, the manifest {len(s['tensors'])}")
            for name, e in entries.items():
                if name in weight_map:
                    raise CheckpointError(f"tensor {name!r} is in both {weight_map[name]} and {final}")
                weight_map[name] = final
                total += e.nbytes
        if set(weight_map) != self._names:
            missing = sorted(self._names - set(weight_map))[:5]
            raise CheckpointError(f"tensors added but not in any shard: {missing}")
        _publish(self.partial, self.out_dir, self.overwrite, final_files, weight_map, total, config, quant_config,
                 extra_files, report, self.units, scratch=[*self.partial.glob("*.body"), self.partial / MANIFEST])
        self._finalized = True
        return self.out_dir

    def _check_quant_config(self, qc) -> None:
        _check_quant_config(self.fmt, qc)

    def _check_open(self):
        if self._finalized:
            raise CheckpointError(f"writer for {self.out_dir} is already finalized")

    def close(self):
        """Release file handles without finalizing (the partial directory stays for resume)."""
        if self._body is not None:
            self._body.close()
            self._body = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _check_quant_config(fmt: str, qc) -> None:
    if not isinstance(qc, dict):
        raise CheckpointError("config has no quantization_config; pass quantization_config= (see formats.py)")
    method = qc.get("quant_method")
    if fmt == "modelopt" and method != "modelopt":
        raise CheckpointError(f"quantization_config.quant_method is {method!r}; the modelopt format needs 'modelopt'")
    if fmt == "compressed-tensors" and (method != "compressed-tensors" or qc.get("format") != "nvfp4-pack-quantized"):
        raise CheckpointError(
            f"quantization_config is quant_method {method!r}, format {qc.get('format')!r}; the compressed-tensors "
            "format needs 'compressed-tensors' / 'nvfp4-pack-quantized'"
        )


# ---------------------------------------------------------------------------------------------
# planned layout: many processes, one checkpoint


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} file {path} is unreadable: {e}; delete {path.parent} and start over") from None


def plan_shards(specs, shard_size: int) -> list[list[tuple]]:
    """Split ``specs`` ``[(name, dtype, shape, nbytes), ...]`` (in add order) into shards exactly as
    :class:`CheckpointWriter` does when the tensors are added in that order."""
    shards: list[list[tuple]] = []
    open_bytes = 0
    for spec in specs:
        if not shards or starts_new_shard(len(shards[-1]), open_bytes, spec[3], shard_size):
            shards.append([])
            open_bytes = 0
        shards[-1].append(spec)
        open_bytes += spec[3]
    return shards


class PlannedWriter:
    """A checkpoint written by several processes at once, byte-identical to :class:`CheckpointWriter`
    fed with the same tensors in the same order.

    units: ``[(unit, [(name, dtype, shape, nbytes), ...]), ...]``: every output tensor (after the
        format's renaming), in the order the streaming writer would get them.
    Every process builds the writer from the same units; process 0 calls :meth:`prepare` (creates
    ``OUT.partial`` with ``plan.json`` and every shard file at its final size, header included),
    then every process calls :meth:`open` and :meth:`add` for its own tensors only;
    :meth:`finish_unit` makes the process's writes durable and records the unit (the tensors it
    wrote, and a CRC-32 of their bytes computed as they were written) in its own
    ``manifest-p{I}-of-{N}.json`` (``manifest.json`` for a single process), which is what
    ``--resume`` continues from (the finished units' bytes are re-checked against their CRC-32
    unless verify_checksums=False).  Process 0 ends with :meth:`finalize`, given every process's
    :meth:`manifest`: it checks that each planned tensor was written by exactly one process, then
    writes index/configs/report and renames ``OUT.partial`` to ``OUT`` like :class:`CheckpointWriter`.
    A single process can use :func:`open_planned_writer` (prepare + open) and call ``finalize``
    without ``manifests``.
    """

    def __init__(self, out_dir, units, *, shard_size=5e9, fmt="modelopt", process_id=0, num_processes=1,
                 resume=False, overwrite=False, verify_checksums=True):
        self.out_dir, self.partial, self.shard_size = _output_paths(out_dir, shard_size, fmt)
        self.fmt, self.process_id, self.num_processes = fmt, int(process_id), int(num_processes)
        self.resume, self.overwrite, self.verify_checksums = resume, overwrite, verify_checksums
        self.unit_order = [u for u, _ in units]
        specs = [(str(n), str(d), tuple(int(x) for x in s), int(b)) for _, ts in units for n, d, s, b in ts]
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
        plan = {"version": MANIFEST_VERSION, "fmt": fmt, "shard_size": self.shard_size,
                "num_processes": self.num_processes, "units": [[u, [list(t) for t in ts]] for u, ts in units]}
        self.digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
        self.manifest_path = self.partial / (
            MANIFEST if self.num_processes == 1 else f"manifest-p{self.process_id}-of-{self.num_processes}.json")
        self.units: dict[str, dict] = {}
        self.written: dict[str, list[str]] = {}  # unit -> tensors this process wrote
        self.crc32: dict[str, int] = {}  # unit -> CRC-32 of those tensors' bytes, in written order
        self._pending: list[str] = []
        self._pending_crc = 0
        self._added: set[str] = set()
        self._fds: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._finalized = False

    # -- process 0 ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Process 0, before any other process opens the files: lay out ``OUT.partial``."""
        if self.out_dir.exists() and not self.overwrite:
            raise CheckpointError(f"output directory {self.out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
        plan_path = self.partial / PLAN_NAME
        if self.resume and plan_path.exists():
            self._check_resumable(_read_json(plan_path, "plan"))
            return
        if self.resume and (self.partial / MANIFEST).exists():
            raise CheckpointError(f"cannot resume {self.partial} with {self.num_processes} processes: it was started by "
                                  "the streaming writer (a single-process run of an earlier version); resume it "
                                  "without --num-processes")
        if self.partial.exists():
            if not (self.overwrite or self.resume):
                raise CheckpointError(
                    f"{self.partial} exists (an interrupted run?); pass resume=True (--resume) to continue it "
                    "or overwrite=True (--overwrite) to start over")
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        for fname, head, size in zip(self.files, self.headers, self.sizes):
            with open(self.partial / fname, "wb") as f:
                f.write(head)
                f.truncate(size)  # sparse until every process has written its tensors
                f.flush()
                os.fsync(f.fileno())
        _atomic_write_text(plan_path, json.dumps({"digest": self.digest, "num_processes": self.num_processes,
                                                  "fmt": self.fmt, "shard_size": self.shard_size,
                                                  "files": self.files}, indent=1))
        fsync_dir(self.partial)

    def _check_resumable(self, plan: dict) -> None:
        if plan.get("digest") != self.digest:
            raise CheckpointError(
                f"cannot resume {self.partial}: it was started with {plan.get('num_processes')} processes, "
                f"fmt={plan.get('fmt')!r}, shard_size={plan.get('shard_size')} and this run plans a different output "
                f"({self.num_processes} processes, fmt={self.fmt!r}, shard_size={self.shard_size}, or another "
                "source/preset); rerun with the original settings or start over with --overwrite")
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
        if self.resume and self.manifest_path.exists():
            m = _read_json(self.manifest_path, "resume manifest")
            if m.get("digest") != self.digest:
                raise CheckpointError(f"resume manifest {self.manifest_path} belongs to another plan; "
                                      f"delete {self.partial} and start over")
            self.units, self.written = m["units"], m["tensors"]
            self.crc32 = {u: int(c) for u, c in m.get("crc32", {}).items()}
            self._added = {n for ts in self.written.values() for n in ts}
            if self.verify_checksums:
                self._verify_written()

    def _verify_written(self) -> None:
        """On resume: re-read the tensors of every finished unit and check their CRC-32."""
        fds: dict[int, int] = {}
        try:
            for unit, names in self.written.items():
                if unit not in self.crc32:  # a manifest without checksums (an earlier version)
                    continue
                crc = 0
                ranges: list[list[int]] = []  # [file, start, end], runs of adjacent tensors merged
                for n in names:
                    i, offset, _, _, nbytes = self.where[n]
                    if ranges and ranges[-1][0] == i and ranges[-1][2] == offset:
                        ranges[-1][2] += nbytes
                    else:
                        ranges.append([i, offset, offset + nbytes])
                for i, start, end in ranges:
                    fd = fds.get(i)
                    if fd is None:
                        fd = fds[i] = os.open(self.partial / self.files[i], os.O_RDONLY)
                    while start < end:
                        chunk = os.pread(fd, min(_CHUNK, end - start), start)
                        if not chunk:
                            raise CheckpointError(f"cannot resume: {self.partial / self.files[i]} is shorter than "
                                                  f"planned; delete {self.partial} and start over")
                        crc = zlib.crc32(chunk, crc)
                        start += len(chunk)
                if crc != self.crc32[unit]:
                    raise CheckpointError(
                        f"cannot resume: the bytes of {unit} in {self.partial} do not match their checksum in "
                        f"{self.manifest_path}; delete {self.partial} and start over")
        finally:
            for fd in fds.values():
                os.close(fd)

    def is_done(self, unit: str) -> bool:
        return unit in self.units

    def unit_info(self) -> dict[str, dict]:
        return dict(self.units)

    def manifest(self) -> dict:
        return {"process_id": self.process_id, "digest": self.digest, "units": self.units, "tensors": self.written,
                "crc32": self.crc32}

    def add(self, name: str, array) -> None:
        """Write one of this process's tensors at its planned place."""
        self._check_open()
        items = formats.to_compressed_tensors(name, array) if self.fmt == "compressed-tensors" else [(name, array)]
        for n, a in items:
            a = _to_numpy(a)
            if n not in self.where:
                raise CheckpointError(f"tensor {n!r} is not in the output plan")
            i, offset, dtype, shape, nbytes = self.where[n]
            if (st_dtype(a.dtype), tuple(a.shape)) != (dtype, shape):
                raise CheckpointError(f"tensor {n!r} is {st_dtype(a.dtype)} {list(a.shape)} but the output plan "
                                      f"expects {dtype} {list(shape)}")
            if n in self._added:
                raise CheckpointError(f"tensor {n!r} was added twice")
            fd = self._fds.get(i)
            if fd is None:
                fd = self._fds[i] = os.open(self.partial / self.files[i], os.O_WRONLY)
            buf = memoryview(a.reshape(-1).view(np.uint8))
            done = 0
            while done < nbytes:  # pwrite may write less than asked (e.g. above 2 GB)
                done += os.pwrite(fd, buf[done:], offset + done)
            self._pending_crc = zlib.crc32(buf, self._pending_crc)
            self._dirty.add(i)
            self._pending.append(n)
            self._added.add(n)

    def finish_unit(self, unit: str, info: dict | None = None) -> None:
        """Make this process's writes durable and record ``unit`` (its share of it) as done."""
        self._check_open()
        if unit in self.units:
            raise CheckpointError(f"unit {unit!r} was already finished")
        for i in sorted(self._dirty):
            os.fsync(self._fds[i])
        self._dirty.clear()
        self.units[unit] = json.loads(json.dumps(info or {}))
        self.written[unit] = list(self._pending)
        self.crc32[unit] = self._pending_crc
        self._pending = []
        self._pending_crc = 0
        _atomic_write_text(self.manifest_path, json.dumps({"version": MANIFEST_VERSION, **self.manifest()}))
        fsync_dir(self.partial)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def finalize(self, config: dict, quant_config: dict | None, extra_files=(), report: dict | None = None, *,
                 manifests=None, units: dict | None = None, quantization_config: dict | None = None) -> Path:
        """Process 0, after every process finished: check coverage, write the rest, rename.

        manifests: every process's :meth:`manifest` (may be left out when there is one process).
        units: the finished units' info for the report (default: this process's)."""
        self._check_open()
        if manifests is None:
            if self.num_processes != 1:
                raise CheckpointError("finalize needs every process's manifest (manifests=) in a multi-process run")
            manifests = [self.manifest()]
        self.close()
        config = dict(config)
        if quantization_config is not None:
            config["quantization_config"] = quantization_config
        _check_quant_config(self.fmt, config.get("quantization_config"))
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
        weight_map, total = {}, 0
        for i, fname in enumerate(self.files):
            entries, _ = read_header(self.partial / fname)  # parses, tiles the file exactly
            for name, e in entries.items():
                weight_map[name] = fname
                total += e.nbytes
        _publish(self.partial, self.out_dir, self.overwrite, self.files, weight_map, total, config, quant_config,
                 extra_files, report, self.units if units is None else units,
                 scratch=[self.partial / PLAN_NAME, self.manifest_path, *self.partial.glob("manifest-p*-of-*.json")])
        self._finalized = True
        return self.out_dir

    def _check_open(self):
        if self._finalized:
            raise CheckpointError(f"writer for {self.out_dir} is already finalized")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_planned_writer(out_dir, units, *, shard_size=5e9, fmt="modelopt", resume=False, overwrite=False,
                        verify_checksums=True):
    """The writer of a single-process run whose layout is known up front (``units`` as for
    :class:`PlannedWriter`): a prepared and opened one-process :class:`PlannedWriter`, so every
    tensor is written once, in place, into its final shard.  A partial output of the streaming
    :class:`CheckpointWriter` (``manifest.json`` and no ``plan.json``, left by an earlier version)
    is resumed with that writer instead, so its bytes stay those of the run it continues."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if resume and (partial / MANIFEST).exists() and not (partial / PLAN_NAME).exists():
        return CheckpointWriter(out_dir, shard_size=shard_size, overwrite=overwrite, resume=True, fmt=fmt,
                                verify_checksums=verify_checksums)
    writer = PlannedWriter(out_dir, units, shard_size=shard_size, fmt=fmt, process_id=0, num_processes=1,
                           resume=resume, overwrite=overwrite, verify_checksums=verify_checksums)
    writer.prepare()
    writer.open()
    return writer
