"""JAX's persistent compilation cache for ``convert`` (``--compile-cache DIR``).

A conversion compiles one program per layer kind and weight shape; across layers JAX's in-memory
cache already reuses them, and across runs (a resume, the next model of the same family, the
processes of a multi-process run on one host) this on-disk cache does. Compiled programs are
what XLA would compile again, so the output bytes do not depend on the cache. The directory may
be shared by concurrent runs (JAX writes each entry atomically under its own key).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

import jax

OFF = ("off", "none")
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_counts = {_HIT: 0, _MISS: 0}
_lock = threading.Lock()
_listening = False
_enabled_dir: Optional[Path] = None


def default_dir() -> str:
    """``$NVFP4_JAX_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/nvfp4-jax/jax-compile`` (XDG_CACHE_HOME
    defaulting to ``~/.cache``)."""
    env = os.environ.get("NVFP4_JAX_COMPILE_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nvfp4-jax", "jax-compile")


def _count(event: str, **_kwargs) -> None:
    if event in _counts:
        with _lock:
            _counts[event] += 1


def enable(path) -> Optional[Path]:
    """Use ``path`` as the persistent cache for every compilation of this process from now on
    (``off``/``none``: no persistent cache); the directory, or None when off. Call it before the
    first compilation: JAX fixes the cache directory at its first use."""
    global _listening, _enabled_dir
    if path is None or str(path).lower() in OFF:
        return None
    directory = Path(path).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # every program, however quick to compile: a layer's programs are few, and a run's
    # compilations add up to seconds on a GPU and tens of seconds on a CPU
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    _enabled_dir = directory
    return directory


def report() -> Optional[dict]:
    """The cache of this process for the run report: directory, entries read from it (hits) and
    compilations not found in it (misses); None when no persistent cache is on."""
    if _enabled_dir is None:
        return None
    with _lock:
        return {"dir": str(_enabled_dir), "hits": _counts[_HIT], "misses": _counts[_MISS]}


__all__ = ["default_dir", "enable", "report", "OFF"]
