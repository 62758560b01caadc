"""All quantized linears of one layer, on device, in a few jitted calls.

A MoE layer of Kimi-K2 has over a thousand linears. Handling them one by one costs a host sync per
module (the weight amax read back to decide the group amax) and a device-to-host copy per tensor,
which on a GPU is far more than the kernels themselves. Here the work is three steps:

1. weight amax: one jitted reduction per chunk of same-shaped weights, results left on device;
   NaN/Inf propagate into the amax (a sum of ``w * 0`` rides along, as in numerics), so one small
   read of all amax values per layer both finds bad weights and zero weights;
2. fused groups (SPEC section 4) take the max of their members' amax, on device (segment max);
3. quantize: one jitted call per chunk of same-shaped weights (stacked inside the jit), then a
   single ``device_get`` of every result of the layer.

Bytes equal :func:`nvfp4_jax.numerics.quantize` of each weight with its group amax.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import numerics
from nvfp4_jax.errors import NVFP4Error

EXPERT_CHUNK = 64  # weights per jitted call: bounds the stacked copy on device


class LayerQuantError(NVFP4Error, ValueError):
    """A weight of the layer cannot be quantized (NaN/Inf); the message names it."""


@jax.jit
def _chunk_amax(ws):
    """max |w| per weight, NaN where a weight holds NaN or Inf (max alone may drop NaN on CPU)."""
    out = []
    for w in ws:
        a = w.astype(jnp.float32)
        out.append(jnp.max(jnp.abs(a)) + jnp.sum(a * jnp.float32(0.0)))
    return jnp.stack(out)


@jax.jit
def _chunk_quantize(ws, amax):
    return numerics.quantize(jnp.stack(ws), amax, check=False)


def _chunks(weights: Mapping[str, jax.Array], modules: Sequence[str], chunk: int) -> list[list[str]]:
    """Modules batched by (shape, dtype), in sorted order, at most ``chunk`` per batch."""
    by_kind: dict[tuple, list[str]] = {}
    for m in sorted(modules):
        w = weights[m]
        by_kind.setdefault((tuple(w.shape), str(w.dtype)), []).append(m)
    return [ms[i:i + chunk] for ms in by_kind.values() for i in range(0, len(ms), chunk)]


def _group_max(amax: jax.Array, group_ids: np.ndarray, num_groups: int) -> jax.Array:
    return jax.ops.segment_max(amax, jnp.asarray(group_ids), num_segments=num_groups)[jnp.asarray(group_ids)]


class QuantizedLayer:
    """The result: ``tensors[module]`` is an :class:`numerics.NVFP4Tensor` of numpy arrays;
    ``zero_weight_amax`` lists modules whose weight (and group) is all zeros."""

    def __init__(self, tensors: dict[str, numerics.NVFP4Tensor], zero_weight_amax: list[str]):
        self.tensors, self.zero_weight_amax = tensors, zero_weight_amax


def quantize_layer(weights: Mapping[str, jax.Array], groups: Sequence[Sequence[str]] = (), *,
                   mesh=None, chunk: int = EXPERT_CHUNK) -> QuantizedLayer:
    """Quantize every weight of ``weights`` (module name -> ``[N, K]`` array); members of each fused
    group in ``groups`` (only those present are used) share one amax. With a multi-device ``mesh``
    the stacked chunks are split over its devices."""
    modules = sorted(weights)
    if not modules:
        return QuantizedLayer({}, [])
    batches = _chunks(weights, modules, chunk)
    order = [m for b in batches for m in b]
    pos = {m: i for i, m in enumerate(order)}
    amax = jnp.concatenate([_chunk_amax(tuple(weights[m] for m in b)) for b in batches])

    group_ids = np.arange(len(order))
    for g in groups:
        members = [pos[m] for m in g if m in pos]
        group_ids[members] = min(members, default=0)
    unified = _group_max(amax, group_ids, len(order))

    own, shared = (np.asarray(a) for a in jax.device_get((amax, unified)))  # the one sync before quantizing
    bad = [m for m in order if not np.isfinite(own[pos[m]])]
    if bad:
        raise LayerQuantError(f"cannot quantize {bad[0]}.weight: it holds NaN or Inf values"
                              + (f" ({len(bad) - 1} more weight(s) of this layer too)" if len(bad) > 1 else ""))
    zero = sorted(m for m in order if shared[pos[m]] == 0.0)

    results = []
    for b in batches:
        lo = pos[b[0]]
        a = unified[lo:lo + len(b)]
        if mesh is not None and mesh.size > 1:
            from nvfp4_jax import sharding

            results.append(sharding.quantize_sharded([weights[m] for m in b], a, mesh, check=False))
        else:
            results.append(_chunk_quantize(tuple(weights[m] for m in b), a))
    results = jax.device_get(results)  # one transfer for the whole layer
    tensors = {}
    for b, q in zip(batches, results):
        for j, m in enumerate(b):
            tensors[m] = numerics.NVFP4Tensor(np.asarray(q.weight[j]), np.asarray(q.weight_scale[j]),
                                              np.asarray(q.weight_scale_2[j], np.float32).reshape(()))
    return QuantizedLayer(tensors, zero)


def input_scales(input_amax: Mapping[str, float]) -> dict[str, np.ndarray]:
    """``input_scale`` of every module (``amax / 2688``, correctly rounded), in one device call."""
    names = sorted(input_amax)
    if not names:
        return {}
    s = np.asarray(jax.device_get(numerics.scale_from_amax(
        jnp.asarray([input_amax[m] for m in names], jnp.float32))), np.float32)
    return {m: s[i].reshape(()) for i, m in enumerate(names)}


__all__ = ["LayerQuantError", "QuantizedLayer", "quantize_layer", "input_scales", "EXPERT_CHUNK"]
