"""All quantized linears of one layer, on device, in a few jitted calls.

A MoE layer of Kimi-K2 has over a thousand linears. Handling them one by one costs a host sync per
module (the weight amax read back to decide the group amax) and a device-to-host copy per tensor,
which on a GPU is far more than the kernels themselves. Here the work is three steps:

1. weight amax: one jitted reduction per chunk of same-shaped weights (an integer max over the
   magnitude bits, :func:`numerics.abs_max_or_nan`: NaN/Inf come back NaN), then one small read of
   every amax of the layer, which both finds bad weights and zero weights;
2. fused groups (SPEC section 4) take the max of their members' amax, on the host (a few numbers);
3. quantize: one jitted call per chunk of same-shaped weights, then one for the chunk's squared
   reconstruction error over every ERROR_ROW_STRIDE-th output row (:func:`numerics.squared_error`;
   a separate program because XLA:CPU runs a quantize fused with a reduction on one core instead
   of all of them), then a single ``device_get`` of every result of the layer.

The error is a report figure (the run's weight relative squared error), not part of the output:
a fixed sample of rows estimates it to well under a percent for a linear of a few hundred rows or
more, at an eighth of the cost of all rows, which on CPU would cost as much as the quantize kernel
itself. ``nvfp4-jax eval`` computes the figure over every element.

Chunks are bounded in bytes of source weight (:func:`chunk_bytes`): on an accelerator a chunk of
up to 64 Kimi experts is stacked inside the jit (few launches, the stack is cheap there); on CPU
every weight is its own call: no stacked copy, one compilation per weight shape, and only one
weight's temporaries live at a time (XLA:CPU allocates every buffer over 32 MB freshly, which
costs page faults in proportion to its size).

With the default mode ``max``, bytes equal :func:`nvfp4_jax.numerics.quantize` of each weight with
its group amax; another ``--weight-scales`` mode gives the bytes of
:func:`nvfp4_jax.weight_scales.quantize_with_mode` of each weight with its group amax (and, for
``local-hessian``, its input's block second moments). Every mode also reports each weight's squared
reconstruction error against the weight it was given (over the sampled rows).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import numerics, weight_scales
from nvfp4_jax.errors import NVFP4Error

#: bytes of source weight per jitted call on an accelerator: 64 Kimi-K2 experts (2048 x 7168
#: bf16), the chunk an H200 quantizes a 384-expert layer with in a few seconds
ACCELERATOR_CHUNK_BYTES = 64 * 2048 * 7168 * 2
#: on CPU: 0, one weight per call (see the module docstring)
CPU_CHUNK_BYTES = 0


def chunk_bytes(backend: Optional[str] = None) -> int:
    """The chunk bound of ``backend`` (default: JAX's default backend); NVFP4_QUANT_CHUNK_BYTES
    overrides (0: one weight per call)."""
    env = os.environ.get("NVFP4_QUANT_CHUNK_BYTES", "")
    if env:
        return int(env)
    return CPU_CHUNK_BYTES if (backend or jax.default_backend()) == "cpu" else ACCELERATOR_CHUNK_BYTES


class LayerQuantError(NVFP4Error, ValueError):
    """A weight of the layer cannot be quantized (NaN/Inf); the message names it."""


@jax.jit
def _chunk_amax(ws):
    """max |w| per weight of the chunk ``[len(ws)]``, NaN where a weight holds NaN or Inf."""
    return jnp.stack([numerics.abs_max_or_nan(w) for w in ws])


def _stacked(ws):
    return ws[0] if len(ws) == 1 else jnp.stack(ws)  # one weight: no copy, a scalar amax


#: the squared error is taken over output rows 0, ERROR_ROW_STRIDE, 2 x ERROR_ROW_STRIDE, ...
ERROR_ROW_STRIDE = 8


@jax.jit
def _chunk_quantize(ws, amax):
    """The chunk quantized; one weight: no leading axis."""
    return numerics.quantize(_stacked(ws), amax, check=False)


@functools.partial(jax.jit, static_argnames=("mode",))
def _chunk_search(ws, amax, hessians, mode):
    h = None if hessians is None else _stacked(hessians)
    return weight_scales.quantize_with_mode(_stacked(ws), mode, amax, h, check=False)


def sampled_rows(n: int) -> int:
    """How many of ``n`` output rows the squared error is taken over."""
    return -(-n // ERROR_ROW_STRIDE)


@jax.jit
def _chunk_error(ws, q):
    """(squared error, squared norm) of each weight of the chunk (no leading axis for one weight,
    as ``q``) over its sampled rows, scaled by rows / sampled rows to estimate the whole sums."""
    rows = slice(None, None, ERROR_ROW_STRIDE)
    sampled = [x[rows] for x in ws]
    # only the sampled rows are stacked (copied); a mesh's result has a leading axis even for one weight
    w = jnp.stack(sampled) if q.weight.ndim > ws[0].ndim else sampled[0]
    sample = numerics.NVFP4Tensor(q.weight[..., rows, :], q.weight_scale[..., rows, :], q.weight_scale_2)
    err, norm = numerics.squared_error(w, sample)
    n = ws[0].shape[0]
    scale = jnp.float32(n / sampled_rows(n))
    return err * scale, norm * scale


def _chunks(weights: Mapping[str, jax.Array], modules: Sequence[str], max_bytes: int) -> list[list[str]]:
    """Modules batched by (shape, dtype), in sorted order, each batch of at most ``max_bytes`` of
    weight (at least one weight); the batches of a kind are split evenly, so they have one or two
    sizes (each size is a compilation)."""
    by_kind: dict[tuple, list[str]] = {}
    for m in sorted(modules):
        w = weights[m]
        by_kind.setdefault((tuple(w.shape), str(w.dtype)), []).append(m)
    out = []
    for (shape, dtype), ms in by_kind.items():
        one = int(np.prod(shape)) * np.dtype(dtype).itemsize
        per = max(1, max_bytes // max(one, 1))
        n = -(-len(ms) // per)  # batches of this kind
        size, extra = divmod(len(ms), n)
        lo = 0
        for i in range(n):
            hi = lo + size + (i < extra)
            out.append(ms[lo:hi])
            lo = hi
    return out


def _group_max(amax: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    shared = np.full(amax.shape, -np.inf, np.float32)
    np.maximum.at(shared, group_ids, amax)
    return shared[group_ids]


@dataclasses.dataclass
class QuantizedLayer:
    """The result: ``tensors[module]`` is an :class:`numerics.NVFP4Tensor` of numpy arrays;
    ``zero_weight_amax`` lists modules whose weight (and group) is all zeros;
    ``squared_error[module]`` / ``squared_norm[module]``: ``sum (w - dequant)^2`` and ``sum w^2``
    over the weight's sampled rows (every ERROR_ROW_STRIDE-th), times rows / sampled rows."""

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
                   mesh=None, max_chunk_bytes: Optional[int] = None, mode: str = "max",
                   hessians: Optional[Mapping[str, jax.Array]] = None) -> QuantizedLayer:
    """Quantize every weight of ``weights`` (module name -> ``[N, K]`` array); members of each fused
    group in ``groups`` (only those present are used) share one amax. ``mode``: the block-scale
    rule (:data:`nvfp4_jax.weight_scales.MODES`); ``hessians`` (``local-hessian`` only): module ->
    f32 ``[K/16, 16, 16]`` input second moments, a module without one is searched as ``mse``.
    ``max_chunk_bytes``: bytes of weight per jitted call (default :func:`chunk_bytes`). With a
    multi-device ``mesh`` the stacked chunks of ``max`` are split over its devices (the searches
    run on the default device)."""
    _check_mode(mode, hessians)
    if mode == "local-hessian" and hessians is None:
        hessians = {}
    modules = sorted(weights)
    if not modules:
        return QuantizedLayer({}, [])
    sharded = mode == "max" and mesh is not None and mesh.size > 1
    if max_chunk_bytes is not None:
        bound = max_chunk_bytes
    else:  # a mesh splits stacked chunks over its devices: accelerator-sized chunks on any backend
        bound = ACCELERATOR_CHUNK_BYTES if sharded else chunk_bytes()
    batches = _chunks(weights, modules, bound)
    order = [m for b in batches for m in b]
    pos = {m: i for i, m in enumerate(order)}
    amax = [_chunk_amax(tuple(weights[m] for m in b)) for b in batches]
    own = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in jax.device_get(amax)])  # the one sync

    group_ids = np.arange(len(order))
    for g in groups:
        members = [pos[m] for m in g if m in pos]
        group_ids[members] = min(members, default=0)
    bad = [m for m in order if not np.isfinite(own[pos[m]])]
    if bad:
        raise LayerQuantError(f"cannot quantize {bad[0]}.weight: it holds NaN or Inf values"
                              + (f" ({len(bad) - 1} more weight(s) of this layer too)" if len(bad) > 1 else ""))
    shared = _group_max(own, group_ids)
    for m in order:
        try:
            numerics.check_amax_range(shared[pos[m]], f"{m}.weight")
        except ValueError as e:
            raise LayerQuantError(str(e)) from None
    zero = sorted(m for m in order if shared[pos[m]] == 0.0)

    results = []
    for b in batches:
        lo = pos[b[0]]
        a = shared[lo:lo + len(b)] if len(b) > 1 else shared[lo]
        ws = tuple(weights[m] for m in b)
        if mode != "max":
            h = _chunk_hessians(hessians, b, weights) if mode == "local-hessian" else None
            q = _chunk_search(ws, a, h, mode)
        elif sharded:
            from nvfp4_jax import sharding

            q = sharding.quantize_sharded(list(ws), np.atleast_1d(a), mesh, check=False)
        else:
            q = _chunk_quantize(ws, a)
        results.append((q, _chunk_error(ws, q)))
    results = jax.device_get(results)  # one transfer for the whole layer
    out = QuantizedLayer({}, zero)
    for b, (q, (err, norm)) in zip(batches, results):
        stacked = np.ndim(err) == 1  # a chunk of one weight (not sharded) has no leading axis
        for j, m in enumerate(b):
            def pick(x):
                return np.asarray(x)[j] if stacked else np.asarray(x)
            out.tensors[m] = numerics.NVFP4Tensor(pick(q.weight), pick(q.weight_scale),
                                                  np.asarray(pick(q.weight_scale_2), np.float32).reshape(()))
            out.squared_error[m], out.squared_norm[m] = float(pick(err)), float(pick(norm))
    return out


def input_scales(input_amax: Mapping[str, float]) -> dict[str, np.ndarray]:
    """``input_scale`` of every module (``amax / 2688``, correctly rounded), in one jitted call on
    the amax padded with ones to a power of two of at least INPUT_SCALES_MIN_LEN."""
    names = sorted(input_amax)
    if not names:
        return {}
    padded = max(INPUT_SCALES_MIN_LEN, 1 << (len(names) - 1).bit_length())  # few lengths, few compilations
    a = np.ones(padded, np.float32)
    a[:len(names)] = [input_amax[m] for m in names]
    s = np.asarray(jax.device_get(_scales_jit(a)), np.float32)
    return {m: s[i].reshape(()) for i, m in enumerate(names)}


_scales_jit = jax.jit(numerics.scale_from_amax)
INPUT_SCALES_MIN_LEN = 2048  # one compilation for every layer of up to 2048 linears (a Kimi MoE layer: 1158)


__all__ = ["LayerQuantError", "QuantizedLayer", "quantize_layer", "input_scales", "chunk_bytes", "sampled_rows",
           "ACCELERATOR_CHUNK_BYTES", "CPU_CHUNK_BYTES", "ERROR_ROW_STRIDE"]
