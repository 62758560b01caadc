"""What one process of a conversion used: bytes read from storage, peak RSS, peak device memory.

* Bytes read: ``/proc/self/io``. The reader reads tensors with ``preadv`` into its own buffers
  (``checkpoint.safetensors_io.FileCache``, no memory map), so ``rchar`` (bytes returned by
  read-family system calls, page cache hits included) counts every source byte this process
  read; ``read_bytes`` counts only what the block layer fetched from the device (0 for a file in
  the page cache), so it says how much came from the disk, not how much the process read. A memory
  map would escape ``rchar``: none is used on the read path. ``rchar`` also counts the few other
  files the process reads (config, tokenizer, Python modules imported late), a small constant.
* Peak RSS: ``getrusage(RUSAGE_SELF).ru_maxrss``.
* Device memory: the largest sum of live buffers per device, sampled by the pipeline after each
  layer's calibration and quantization (``jax.live_arrays``, each shard on its device); where the
  backend keeps allocator statistics (GPU, TPU: ``Device.memory_stats``) its ``peak_bytes_in_use``;
  and the compiled programs' own needs (``Compiled.memory_analysis``: arguments, outputs,
  temporaries, per device for an SPMD program) as noted by the code that compiles them
  (:func:`note_compiled`).
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Optional

import jax

_PROC_IO = Path("/proc/self/io")
_PROGRAMS: dict[str, dict] = {}  # program name -> its largest memory analysis (this process)


def io_counters() -> Optional[dict]:
    """``/proc/self/io`` as ints (None where the OS has no such file)."""
    try:
        text = _PROC_IO.read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().isdigit():
            out[key.strip()] = int(value)
    return out


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_analysis(compiled) -> Optional[dict]:
    """A compiled program's memory analysis as a dict of bytes (None where the backend has none)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without one
        return None
    if ma is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    return {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}


def note_compiled(name: str, compiled) -> None:
    """Remember ``compiled``'s memory analysis under ``name`` (the largest per name is kept)."""
    ma = memory_analysis(compiled)
    if ma is None:
        return
    total = ma.get("argument_size_in_bytes", 0) + ma.get("output_size_in_bytes", 0) + ma.get("temp_size_in_bytes", 0)
    prev = _PROGRAMS.get(name)
    if prev is None or total > prev["total_bytes"]:
        _PROGRAMS[name] = {**ma, "total_bytes": total}


def live_bytes_per_device() -> dict[str, int]:
    """Bytes of live JAX buffers on each of this process's devices."""
    out: dict[str, int] = {}
    for a in jax.live_arrays():
        try:
            shards = a.addressable_shards
        except Exception:  # noqa: BLE001 - deleted while we looked
            continue
        for s in shards:
            key = str(s.device)
            out[key] = out.get(key, 0) + int(s.data.nbytes)
    return out


class ResourceMonitor:
    """The figures of one conversion in this process, from its start (:meth:`sample` at the points
    where memory peaks, :meth:`report` at the end)."""

    def __init__(self):
        self.io_start = io_counters()
        self.peak_live: dict[str, int] = {}

    def sample(self) -> None:
        for device, n in live_bytes_per_device().items():
            if n > self.peak_live.get(device, 0):
                self.peak_live[device] = n

    def report(self) -> dict:
        io = io_counters()
        read = None
        if io is not None and self.io_start is not None:
            read = {"rchar": io.get("rchar", 0) - self.io_start.get("rchar", 0),
                    "read_bytes": io.get("read_bytes", 0) - self.io_start.get("read_bytes", 0),
                    "syscr": io.get("syscr", 0) - self.io_start.get("syscr", 0)}
        allocator = {}
        for d in jax.local_devices():
            try:
                stats = d.memory_stats()
            except Exception:  # noqa: BLE001
                stats = None
            if stats and "peak_bytes_in_use" in stats:
                allocator[str(d)] = int(stats["peak_bytes_in_use"])
        live = dict(sorted(self.peak_live.items()))
        return {
            "process": jax.process_index(),
            "bytes_read": read,  # rchar: every byte our reads returned; read_bytes: fetched from the disk
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_live_device_bytes": live,
            "peak_live_device_bytes_max": max(live.values(), default=0),
            "allocator_peak_bytes": allocator or None,  # None: the backend keeps no statistics (CPU)
            "compiled_programs": {k: dict(v) for k, v in sorted(_PROGRAMS.items())},
        }


__all__ = ["ResourceMonitor", "io_counters", "live_bytes_per_device", "memory_analysis", "note_compiled",
           "peak_rss_bytes"]
