"""All quantized linears of one layer, on device, in a few jitted calls.

A MoE layer of Kimi-K2 has over a thousand linears. Handling them one by one costs a host sync per
module (the weight amax read back to decide the group amax) and a device-to-host copy per tensor,
which on a GPU is far more than the kernels themselves. Here the work is two kinds of call and one
transfer:

1. quantize: the linears go in batches of whole fused groups (SPEC section 4: the members share
   one amax; a linear in no group is a group of one), groups of one kind (the members' shapes and
   dtypes) together, at most :func:`chunk_bytes` of weight a batch (:func:`fused_batches`). One
   jitted call per batch stacks each member position over the batch's groups, takes every
   member's amax from the block maxima (:func:`numerics.abs_max_or_nan`: NaN/Inf come back NaN),
   the group max of those, and quantizes with it: the block maxima are the quantize kernel's own
   first pass, so XLA computes them once and the amax costs almost nothing (a separate amax pass
   read every weight once more);
2. the squared reconstruction error over every ERROR_ROW_STRIDE-th output row of each weight
   (:func:`numerics.squared_error`), a call per member position of a batch: a separate program
   because XLA:CPU runs a quantize fused with a reduction on one core instead of all of them;
3. one ``device_get`` of every result and amax of the layer; the amax are checked then (a NaN/Inf
   weight, an amax out of range: the error names the weight; the results are dropped).

With a multi-device ``mesh`` the amax come first (one call per batch and a read), then each member
position's stack is quantized split over the devices (:func:`sharding.quantize_sharded`).

The error is a report figure (the run's weight relative squared error), not part of the output:
a fixed sample of rows estimates it to well under a percent for a linear of a few hundred rows or
more, at an eighth of the cost of all rows, which on CPU would cost as much as the quantize kernel
itself. ``nvfp4-jax eval`` computes the figure over every element.

Batches are bounded in bytes of source weight (:func:`chunk_bytes`): on an accelerator up to 64
Kimi experts' worth is stacked inside the jit (few launches, the stack is cheap there); on CPU
every group is its own call: no stacked copy, one compilation per group kind, and only one group's
temporaries live at a time (XLA:CPU allocates every buffer over 32 MB freshly, which costs page
faults in proportion to its size).

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
#: on CPU: 0, one fused group (or lone weight) per call (see the module docstring)
CPU_CHUNK_BYTES = 0


def chunk_bytes(backend: Optional[str] = None) -> int:
    """The chunk bound of ``backend`` (default: JAX's default backend); NVFP4_QUANT_CHUNK_BYTES
    overrides (0: one group per call)."""
    env = os.environ.get("NVFP4_QUANT_CHUNK_BYTES", "")
    if env:
        return int(env)
    return CPU_CHUNK_BYTES if (backend or jax.default_backend()) == "cpu" else ACCELERATOR_CHUNK_BYTES


class LayerQuantError(NVFP4Error, ValueError):
    """A weight of the layer cannot be quantized (NaN/Inf); the message names it."""


#: the squared error is taken over output rows 0, ERROR_ROW_STRIDE, 2 x ERROR_ROW_STRIDE, ...
ERROR_ROW_STRIDE = 8

Group = tuple  # the member module names of one fused group, in position order


def fused_groups(modules: Sequence[str], groups: Sequence[Sequence[str]] = ()) -> list[Group]:
    """Every module of ``modules`` in exactly one group: the given groups restricted to the
    modules present (groups sharing a module are merged: one amax for all), every other module
    alone; members sorted by name (so the groups of one kind list their members in the same
    positions, e.g. gate before up), groups in the order of their first member."""
    present = set(modules)
    owner: dict[str, int] = {}
    merged: list[set] = []
    for g in groups:
        members = {m for m in g if m in present}
        hit = sorted({owner[m] for m in members if m in owner})
        target = hit[0] if hit else len(merged)
        if not hit:
            merged.append(set())
        for other in hit[1:]:  # union with every earlier group it shares a module with
            members |= merged[other]
            merged[other] = set()
        merged[target] |= members
        for m in merged[target]:
            owner[m] = target
    out = [tuple(sorted(g)) for g in merged if g]
    out += [(m,) for m in modules if m not in owner]
    return sorted(out)


def _kind(weights: Mapping[str, jax.Array], group: Group) -> tuple:
    return tuple((tuple(weights[m].shape), str(weights[m].dtype)) for m in group)


def fused_batches(weights: Mapping[str, jax.Array], groups: Sequence[Group], max_bytes: int) -> list[list[Group]]:
    """``groups`` batched by kind, each batch at most ``max_bytes`` of weight (at least one group);
    the batches of a kind are split evenly, so they have one or two sizes (each size is a
    compilation)."""
    by_kind: dict[tuple, list[Group]] = {}
    for g in groups:
        by_kind.setdefault(_kind(weights, g), []).append(g)
    out = []
    for kind, gs in by_kind.items():
        one = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in kind)
        per = max(1, max_bytes // max(one, 1))
        n = -(-len(gs) // per)  # batches of this kind
        size, extra = divmod(len(gs), n)
        lo = 0
        for i in range(n):
            hi = lo + size + (i < extra)
            out.append(gs[lo:hi])
            lo = hi
    return out


def _stacked(ws):
    return ws[0] if len(ws) == 1 else jnp.stack(ws)  # one weight: no copy, a scalar amax


def _positions_amax(positions):
    """Each member position stacked (:func:`_stacked`) and its amax per group: (stacks, amax
    ``[J]`` or ``[J, G]``, shared group amax ``[]`` or ``[G]``)."""
    ws = [_stacked(p) for p in positions]
    amax = jnp.stack([numerics.abs_max_or_nan(w, per_leading=True) for w in ws])
    return ws, amax, jnp.max(amax, axis=0)


@jax.jit
def _batch_amax(positions):
    """The amax of every member of the batch ``[J, G]``, each weight reduced where it lies (the mesh
    path's first call: no stack on one device)."""
    return jnp.stack([jnp.stack([numerics.abs_max_or_nan(w) for w in p]) for p in positions])


@jax.jit
def _batch_quantize(positions):
    """(quantized per member position, amax ``[J]`` or ``[J, G]``): each position's stack quantized
    with its groups' shared amax, taken in the same program."""
    ws, amax, shared = _positions_amax(positions)
    return [numerics.quantize(w, shared, check=False) for w in ws], amax


@functools.partial(jax.jit, static_argnames=("mode",))
def _batch_search(positions, hessians, mode):
    """As :func:`_batch_quantize` with a searching weight-scale mode; ``hessians`` per position
    (None but for local-hessian)."""
    ws, amax, shared = _positions_amax(positions)
    return [weight_scales.quantize_with_mode(w, mode, shared, None if h is None else _stacked(h), check=False)
            for w, h in zip(ws, hessians)], amax


def sampled_rows(n: int) -> int:
    """How many of ``n`` output rows the squared error is taken over."""
    return -(-n // ERROR_ROW_STRIDE)


@jax.jit
def _chunk_error(ws, q):
    """(squared error, squared norm) of each weight of ``ws`` (no leading axis for one weight, as
    ``q``) over its sampled rows, scaled by rows / sampled rows to estimate the whole sums."""
    rows = slice(None, None, ERROR_ROW_STRIDE)
    sampled = [x[rows] for x in ws]
    # only the sampled rows are stacked (copied); a mesh's result has a leading axis even for one weight
    w = jnp.stack(sampled) if q.weight.ndim > ws[0].ndim else sampled[0]
    sample = numerics.NVFP4Tensor(q.weight[..., rows, :], q.weight_scale[..., rows, :], q.weight_scale_2)
    err, norm = numerics.squared_error(w, sample)
    n = ws[0].shape[0]
    scale = jnp.float32(n / sampled_rows(n))
    return err * scale, norm * scale


@dataclasses.dataclass
class QuantizedLayer:
    """The result: ``tensors[module]`` is an :class:`numerics.NVFP4Tensor` of numpy arrays (modules
    in sorted order); ``zero_weight_amax`` lists modules whose weight (and group) is all zeros;
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


def _position_hessians(hessians, batch: Sequence[Group], weights) -> list:
    """Per member position, the batch's hessians for local-hessian (an all-zero one, plain mse,
    where a weight has none); None per position for the other modes."""
    if hessians is None:
        return [None] * len(batch[0])
    out = []
    for j in range(len(batch[0])):
        kb = weights[batch[0][j]].shape[-1] // numerics.BLOCK
        zero = jnp.zeros((kb, numerics.BLOCK, numerics.BLOCK), jnp.float32)
        out.append(tuple(hessians.get(g[j], zero) for g in batch))
    return out


def _check_amax(groups: Sequence[Group], amax: Mapping[str, float]) -> list[str]:
    """Raise :class:`LayerQuantError` naming the first weight (sorted) with NaN/Inf or a group
    amax out of range; else the modules whose group amax is zero."""
    bad = sorted(m for m, a in amax.items() if not np.isfinite(a))
    if bad:
        raise LayerQuantError(f"cannot quantize {bad[0]}.weight: it holds NaN or Inf values"
                              + (f" ({len(bad) - 1} more weight(s) of this layer too)" if len(bad) > 1 else ""))
    zero = []
    for g in groups:
        shared = np.float32(max(amax[m] for m in g))
        for m in g:
            try:
                numerics.check_amax_range(shared, f"{m}.weight")
            except ValueError as e:
                raise LayerQuantError(str(e)) from None
        zero += list(g) if shared == 0.0 else []
    return sorted(zero)


def _quantize_batch(weights, batch: Sequence[Group], opts: dict):
    """(quantized per position, amax) of one batch, dispatched (nothing read back, but the mesh
    path's amax)."""
    positions = tuple(tuple(weights[g[j]] for g in batch) for j in range(len(batch[0])))
    if opts["mode"] != "max":
        return _batch_search(positions, _position_hessians(opts["hessians"], batch, weights), opts["mode"])
    if not opts["sharded"]:
        return _batch_quantize(positions)
    from nvfp4_jax import sharding

    amax = _batch_amax(positions)
    shared = np.max(np.asarray(jax.device_get(amax), np.float32), axis=0)
    return [sharding.quantize_sharded(list(p), np.atleast_1d(shared), opts["mesh"], check=False)
            for p in positions], amax


def quantize_layer(weights: Mapping[str, jax.Array], groups: Sequence[Sequence[str]] = (), *,
                   mesh=None, max_chunk_bytes: Optional[int] = None, mode: str = "max",
                   hessians: Optional[Mapping[str, jax.Array]] = None) -> QuantizedLayer:
    """Quantize every weight of ``weights`` (module name -> ``[N, K]`` array); members of each fused
    group in ``groups`` (only those present are used) share one amax. ``mode``: the block-scale
    rule (:data:`nvfp4_jax.weight_scales.MODES`); ``hessians`` (``local-hessian`` only): module ->
    f32 ``[K/16, 16, 16]`` input second moments, a module without one is searched as ``mse``.
    ``max_chunk_bytes``: bytes of weight per jitted call (default :func:`chunk_bytes`). With a
    multi-device ``mesh`` the stacked batches of ``max`` are split over its devices (the searches
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
    else:  # a mesh splits stacked batches over its devices: accelerator-sized batches on any backend
        bound = ACCELERATOR_CHUNK_BYTES if sharded else chunk_bytes()
    grouped = fused_groups(modules, groups)
    batches = fused_batches(weights, grouped, bound)
    opts = {"mode": mode, "hessians": hessians, "sharded": sharded, "mesh": mesh}
    results = []
    for batch in batches:
        qs, amax = _quantize_batch(weights, batch, opts)
        errors = [_chunk_error(tuple(weights[g[j]] for g in batch), q) for j, q in enumerate(qs)]
        results.append((qs, errors, amax))
    results = jax.device_get(results)  # one transfer for the whole layer

    per_module = {}
    for batch, (qs, errors, amax) in zip(batches, results):
        amax = np.asarray(amax, np.float32).reshape(len(batch[0]), len(batch))
        for j, (q, (err, norm)) in enumerate(zip(qs, errors)):
            stacked = np.ndim(err) == 1  # a batch of one group (not sharded) has no leading axis
            for i, g in enumerate(batch):
                def pick(x):
                    return np.asarray(x)[i] if stacked else np.asarray(x)
                t = numerics.NVFP4Tensor(pick(q.weight), pick(q.weight_scale),
                                         np.asarray(pick(q.weight_scale_2), np.float32).reshape(()))
                per_module[g[j]] = (t, float(pick(err)), float(pick(norm)), float(amax[j, i]))
    zero = _check_amax(grouped, {m: v[3] for m, v in per_module.items()})
    out = QuantizedLayer({}, zero)
    for m in modules:
        out.tensors[m], out.squared_error[m], out.squared_norm[m], _ = per_module[m]
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
           "fused_groups", "fused_batches",
           "ACCELERATOR_CHUNK_BYTES", "CPU_CHUNK_BYTES", "ERROR_ROW_STRIDE"]
