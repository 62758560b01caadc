"""Lossless conversions between torch tensors, numpy arrays and jax arrays, and safetensors I/O.

bfloat16 and the float8 types have no numpy-native dtype; numpy uses ``ml_dtypes`` for them (as jax
does). Conversions go through raw bytes (``.view`` of a same-width integer type), so no value is
ever rounded or widened on the way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import ml_dtypes
import numpy as np
import torch

__all__ = [
    "to_numpy",
    "to_torch",
    "to_jax",
    "torch_dtype_to_numpy",
    "numpy_dtype_to_torch",
    "load_safetensors",
    "load_checkpoint",
    "save_safetensors",
    "safetensors_header",
]

# torch dtype <-> numpy dtype for the types numpy lacks natively, with the same-width integer
# type used to move the raw bytes.
_SPECIAL: list[tuple[torch.dtype, np.dtype, torch.dtype, np.dtype]] = [
    (torch.bfloat16, np.dtype(ml_dtypes.bfloat16), torch.int16, np.dtype(np.int16)),
    (torch.float8_e4m3fn, np.dtype(ml_dtypes.float8_e4m3fn), torch.uint8, np.dtype(np.uint8)),
    (torch.float8_e5m2, np.dtype(ml_dtypes.float8_e5m2), torch.uint8, np.dtype(np.uint8)),
]
for _td, _nd in (("float8_e4m3fnuz", "float8_e4m3fnuz"), ("float8_e5m2fnuz", "float8_e5m2fnuz")):
    if hasattr(torch, _td) and hasattr(ml_dtypes, _nd):
        _SPECIAL.append((getattr(torch, _td), np.dtype(getattr(ml_dtypes, _nd)), torch.uint8, np.dtype(np.uint8)))

_TORCH_TO_NP_SPECIAL = {t: (n, ti, ni) for t, n, ti, ni in _SPECIAL}
_NP_TO_TORCH_SPECIAL = {n: (t, ti, ni) for t, n, ti, ni in _SPECIAL}

_PLAIN = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
    torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}
for _name, _np in (("uint16", np.uint16), ("uint32", np.uint32), ("uint64", np.uint64)):
    if hasattr(torch, _name):
        _PLAIN[getattr(torch, _name)] = _np
_PLAIN_NP = {np.dtype(v): k for k, v in _PLAIN.items()}


def torch_dtype_to_numpy(dtype: torch.dtype) -> np.dtype:
    if dtype in _TORCH_TO_NP_SPECIAL:
        return _TORCH_TO_NP_SPECIAL[dtype][0]
    if dtype in _PLAIN:
        return np.dtype(_PLAIN[dtype])
    raise TypeError(f"no numpy dtype for torch dtype {dtype}")


def numpy_dtype_to_torch(dtype: Any) -> torch.dtype:
    dtype = np.dtype(dtype)
    if dtype in _NP_TO_TORCH_SPECIAL:
        return _NP_TO_TORCH_SPECIAL[dtype][0]
    if dtype in _PLAIN_NP:
        return _PLAIN_NP[dtype]
    raise TypeError(f"no torch dtype for numpy dtype {dtype}")


def _is_jax_array(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("jax") or mod.startswith("jaxlib")


def to_numpy(x: Any) -> np.ndarray:
    """torch tensor / jax array / numpy array / scalar -> numpy array, bit for bit.

    bf16 and float8 come back as ``ml_dtypes`` dtypes. Tensors on an accelerator are copied to
    host; gradients are detached.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype in _TORCH_TO_NP_SPECIAL:
            nd, ti, _ni = _TORCH_TO_NP_SPECIAL[t.dtype]
            return t.view(ti).numpy().view(nd)
        if t.dtype not in _PLAIN:
            raise TypeError(f"to_numpy: unsupported torch dtype {t.dtype} (shape {list(t.shape)})")
        return t.numpy()
    if isinstance(x, np.ndarray):
        return x
    # jax arrays (and numpy scalars, lists) convert through __array__; jax yields ml_dtypes arrays
    return np.asarray(x)


def to_torch(x: Any, device: Any = None) -> torch.Tensor:
    """numpy array / jax array / torch tensor -> torch tensor (a copy), bit for bit.

    bf16 and float8 (ml_dtypes) arrays become torch.bfloat16 / torch.float8_e4m3fn / ... tensors.
    """
    if isinstance(x, torch.Tensor):
        return x.to(device) if device is not None else x
    a = np.asarray(x)
    if a.dtype in _NP_TO_TORCH_SPECIAL:
        td, ti, ni = _NP_TO_TORCH_SPECIAL[a.dtype]
        t = torch.from_numpy(np.ascontiguousarray(a).view(ni).copy()).view(td)
    elif a.dtype in _PLAIN_NP:
        t = torch.from_numpy(np.array(a, copy=True, order="C"))
    else:
        raise TypeError(f"to_torch: unsupported dtype {a.dtype} (shape {list(a.shape)})")
    return t.to(device) if device is not None else t


def to_jax(x: Any, device: Any = None):
    """torch tensor / numpy array -> jax array, bit for bit (bf16/float8 via ml_dtypes)."""
    import jax
    import jax.numpy as jnp

    a = to_numpy(x)
    if device is not None:
        return jax.device_put(a, device)
    return jnp.asarray(a)


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------
def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a .safetensors file (name -> {dtype, shape, data_offsets}, __metadata__)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def load_safetensors(
    path: str | os.PathLike, device: str = "cpu", names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Read a .safetensors file into torch tensors (safetensors.torch), F8_E4M3 included.

    ``names`` restricts the read to those tensors (KeyError names a missing one).
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        keys = list(f.keys())
        wanted = keys if names is None else list(names)
        missing = [n for n in wanted if n not in set(keys)]
        if missing:
            raise KeyError(f"{path}: no tensor(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for k in wanted:
            out[k] = f.get_tensor(k)
    return out


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: a .safetensors file, or a directory with either
    ``model.safetensors.index.json`` or ``*.safetensors`` files."""
    p = Path(path)
    if p.is_file():
        return load_safetensors(p, device)
    index = p / "model.safetensors.index.json"
    out: dict[str, torch.Tensor] = {}
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        by_file: dict[str, list[str]] = {}
        for name, fn in wm.items():
            by_file.setdefault(fn, []).append(name)
        for fn, names in sorted(by_file.items()):
            out.update(load_safetensors(p / fn, device, names))
        return out
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{p}: no model.safetensors.index.json and no *.safetensors")
    for fn in files:
        part = load_safetensors(fn, device)
        dup = set(part) & set(out)
        if dup:
            raise ValueError(f"{p}: tensor(s) {sorted(dup)[:5]} appear in more than one shard")
        out.update(part)
    return out


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write tensors (torch/numpy/jax, any dtype incl. bf16 / float8) with safetensors.torch."""
    from safetensors.torch import save_file

    save_file({k: to_torch(v).contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
