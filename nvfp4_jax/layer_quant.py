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

With the default mode ``max``, bytes equal :func:`nvfp4_jax.numerics.quantize` of each weight with
its group amax; another ``--weight-scales`` mode gives the bytes of
:func:`nvfp4_jax.weight_scales.quantize_with_mode` of each weight with its group amax (and, for
``local-hessian``, its input's block second moments). Every mode also reports each weight's squared
reconstruction error against the weight it was given.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import numerics, weight_scales
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


@functools.partial(jax.jit, static_argnames=("mode",))
def _chunk_search(ws, amax, hessians, mode):
    h = None if hessians is None else jnp.stack(hessians)
    return weight_scales.quantize_with_mode(jnp.stack(ws), mode, amax, h, check=False)


@jax.jit
def _chunk_error(ws, q):
    """Per weight of the chunk: (sum (w - dequant)^2, sum w^2), float32."""
    w = jnp.stack(ws).astype(jnp.float32)
    d = w - numerics.dequantize(q)
    return jnp.sum(d * d, axis=(-2, -1)), jnp.sum(w * w, axis=(-2, -1))


def _chunks(weights: Mapping[str, jax.Array], modules: Sequence[str], chunk: int) -> list[list[str]]:
    """Modules batched by (shape, dtype), in sorted order, at most ``chunk`` per batch."""
    by_kind: dict[tuple, list[str]] = {}
    for m in sorted(modules):
        w = weights[m]
        by_kind.setdefault((tuple(w.shape), str(w.dtype)), []).append(m)
    return [ms[i:i + chunk] for ms in by_kind.values() for i in range(0, len(ms), chunk)]


def _group_max(amax: jax.Array, group_ids: np.ndarray, num_groups: int) -> jax.Array:
    return jax.ops.segment_max(amax, jnp.asarray(group_ids), num_segments=num_groups)[jnp.asarray(group_ids)]


@dataclasses.dataclass
class QuantizedLayer:
    """The result: ``tensors[module]`` is an :class:`numerics.NVFP4Tensor` of numpy arrays;
    ``zero_weight_amax`` lists modules whose weight (and group) is all zeros;
    ``squared_error[module]`` / ``squared_norm[module]``: ``sum (w - dequant)^2`` and ``sum w^2``."""

    tensors: dict[str, numerics.NVFP4Tensor]
    zero_weight_amax: list[str]
    squared_error: dict[str, float] = dataclasses.field(default_factory=dict)
    squared_norm: dict[str, float] = dataclasses.field(default_factory=dict)


def _check_mode(mode: str, hessians) -> None:
    if mode not in weight_scales.MODES:
        raise ValueError(f"unknown weight-scale mode {mode!r}; choose one of {', '.join(weight_scales.MODES)}")
    if hessians is not None and mode != "local-hessian":
        raise ValueError(f"hessians are only used by mode 'local-hessian', not {mode!r}")


def _chunk_hessians(hessians, batch: Sequence[str], weights):
    """The chunk's per-weight hessians for local-hessian; an all-zero one (plain mse) where a weight
    has none."""
    kb = weights[batch[0]].shape[-1] // numerics.BLOCK
    zero = jnp.zeros((kb, numerics.BLOCK, numerics.BLOCK), jnp.float32)
    return tuple(hessians.get(m, zero) for m in batch)


def quantize_layer(weights: Mapping[str, jax.Array], groups: Sequence[Sequence[str]] = (), *,
                   mesh=None, chunk: int = EXPERT_CHUNK, mode: str = "max",
                   hessians: Optional[Mapping[str, jax.Array]] = None) -> QuantizedLayer:
    """Quantize every weight of ``weights`` (module name -> ``[N, K]`` array); members of each fused
    group in ``groups`` (only those present are used) share one amax. ``mode``: the block-scale
    rule (:data:`nvfp4_jax.weight_scales.MODES`); ``hessians`` (``local-hessian`` only): module ->
    f32 ``[K/16, 16, 16]`` input second moments, a module without one is searched as ``mse``. With
    a multi-device ``mesh`` the stacked chunks of ``max`` are split over its devices (the searches
    run on the default device)."""
    _check_mode(mode, hessians)
    if mode == "local-hessian" and hessians is None:
        hessians = {}
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
    for m in order:
        try:
            numerics.check_amax_range(shared[pos[m]], f"{m}.weight")
        except ValueError as e:
            raise LayerQuantError(str(e)) from None
    zero = sorted(m for m in order if shared[pos[m]] == 0.0)

    results, errors = [], []
    for b in batches:
        lo = pos[b[0]]
        a = unified[lo:lo + len(b)]
        ws = tuple(weights[m] for m in b)
        if mode != "max":
            h = _chunk_hessians(hessians, b, weights) if mode == "local-hessian" else None
            q = _chunk_search(ws, a, h, mode)
        elif mesh is not None and mesh.size > 1:
            from nvfp4_jax import sharding

            q = sharding.quantize_sharded(list(ws), a, mesh, check=False)
        else:
            q = _chunk_quantize(ws, a)
        results.append(q)
        errors.append(_chunk_error(ws, q))
    results, errors = jax.device_get((results, errors))  # one transfer for the whole layer
    out = QuantizedLayer({}, zero)
    for b, q, (err, norm) in zip(batches, results, errors):
        for j, m in enumerate(b):
            out.tensors[m] = numerics.NVFP4Tensor(np.asarray(q.weight[j]), np.asarray(q.weight_scale[j]),
                                                  np.asarray(q.weight_scale_2[j], np.float32).reshape(()))
            out.squared_error[m], out.squared_norm[m] = float(err[j]), float(norm[j])
    return out


def input_scales(input_amax: Mapping[str, float]) -> dict[str, np.ndarray]:
    """``input_scale`` of every module (``amax / 2688``, correctly rounded), in one device call."""
    names = sorted(input_amax)
    if not names:
        return {}
    s = np.asarray(jax.device_get(numerics.scale_from_amax(
        jnp.asarray([input_amax[m] for m in names], jnp.float32))), np.float32)
    return {m: s[i].reshape(()) for i, m in enumerate(names)}


__all__ = ["LayerQuantError", "QuantizedLayer", "quantize_layer", "input_scales", "EXPERT_CHUNK"]
