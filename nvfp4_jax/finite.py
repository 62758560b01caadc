"""Every value a conversion reads must be finite: a NaN in a norm weight, a router or an embedding
is not quantized, so nothing else would notice it, and through the calibration forward it would
silently turn input scales into their floor. One fused reduction per tensor on device; the index
of the first bad value is computed only when there is one."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax.errors import NVFP4Error


class NonFiniteError(NVFP4Error, ValueError):
    """A tensor holds NaN or Inf; the message names it and the first such index."""


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def _first_non_finite(x) -> tuple[int, ...]:
    flat = int(jnp.argmin(jnp.isfinite(x).reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, x.shape)) if x.ndim else ()


def check_finite(tensors: Mapping[str, jax.Array], where: str = "") -> None:
    """Raise :class:`NonFiniteError` for the first (sorted by name) tensor with a NaN or Inf."""
    floats = {n: t for n, t in tensors.items() if jnp.issubdtype(t.dtype, jnp.floating)}
    flags = {n: _all_finite(t) for n, t in floats.items()}  # dispatched together, read once
    for name in sorted(flags):
        if not bool(flags[name]):
            t = floats[name]
            idx = _first_non_finite(t)
            value = float(np.asarray(t[idx], np.float32)) if t.ndim else float(np.asarray(t, np.float32))
            raise NonFiniteError(f"tensor {name}{' of ' + where if where else ''} holds {value} at index "
                                 f"{list(idx)}: the source checkpoint is corrupt; the conversion stops before writing it")


__all__ = ["NonFiniteError", "check_finite"]
