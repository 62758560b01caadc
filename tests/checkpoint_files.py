"""Reading a written checkpoint back in tests: every tensor of every shard, by name, or every file's bytes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nvfp4_jax.checkpoint.safetensors_io import FileCache, read_header


def load_dir(d) -> dict[str, np.ndarray]:
    """Every tensor of the *.safetensors files in ``d`` as numpy arrays (the file's dtype)."""
    out, fc = {}, FileCache()
    for f in sorted(Path(d).glob("*.safetensors")):
        entries, _ = read_header(f)
        for k, e in entries.items():
            out[k] = np.array(fc.read(e))
    fc.close()
    return out


def tree_bytes(path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes): to compare two outputs, or one before
    and after a run that must not touch it."""
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
