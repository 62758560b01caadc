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

Weights already held stacked (a MoE layer's routed experts, held as ``moe.ExpertStacks`` from the
read through calibration, given as :class:`WeightStack` in a :class:`LayerWeights`) are batched by
consecutive rows of their stacks (a routed expert's gate/up group: the same row of the gate and the
up stack) and read as slices of them inside the jitted calls: no per-weight array and no re-stacked
copy, the same byte bound and the same bytes.

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
from typing import Mapping, NamedTuple, Optional, Sequence

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


def _even_split(items: Sequence, one_bytes: int, max_bytes: int) -> list:
    """``items`` (``one_bytes`` of weight each) in consecutive batches of at most ``max_bytes`` (at
    least one item), split evenly, so they have one or two sizes (each size is a compilation)."""
    per = max(1, max_bytes // max(one_bytes, 1))
    n = -(-len(items) // per)
    size, extra = divmod(len(items), n)
    out, lo = [], 0
    for i in range(n):
        hi = lo + size + (i < extra)
        out.append(list(items[lo:hi]))
        lo = hi
    return out


def fused_batches(weights: Mapping[str, jax.Array], groups: Sequence[Group], max_bytes: int) -> list[list[Group]]:
    """``groups`` batched by kind, each batch at most ``max_bytes`` of weight (at least one group);
    the batches of a kind are split evenly."""
    by_kind: dict[tuple, list[Group]] = {}
    for g in groups:
        by_kind.setdefault(_kind(weights, g), []).append(g)
    return [b for kind, gs in by_kind.items()
            for b in _even_split(gs, sum(_nbytes(shape, dtype) for shape, dtype in kind), max_bytes)]


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class WeightStack:
    """Same-shaped weights held as one array, ``modules[i]`` being ``array[i]`` (one projection of
    a MoE layer's routed experts, ``moe.ExpertStacks``)."""

    array: jax.Array  # [E, N, K]
    modules: tuple[str, ...]  # E names

    def __post_init__(self):
        if len(self.modules) != self.array.shape[0]:
            raise ValueError(f"a stack of {self.array.shape[0]} weights named by {len(self.modules)} modules")


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """The weights of a layer to quantize: ``arrays`` (module -> ``[N, K]``) and ``stacks``, whose
    weights are quantized from slices of them (no module in both)."""

    arrays: Mapping[str, jax.Array]
    stacks: tuple[WeightStack, ...] = ()

    def modules(self) -> list[str]:
        return sorted([*self.arrays, *(m for s in self.stacks for m in s.modules)])

    def rows(self) -> dict[str, tuple[int, int]]:
        """module -> (its stack's index in ``stacks``, its row) of every stacked weight."""
        return {m: (i, row) for i, s in enumerate(self.stacks) for row, m in enumerate(s.modules)}

    def as_arrays(self, modules: Optional[Sequence[str]] = None) -> dict[str, jax.Array]:
        """``arrays`` plus the stacked weights among ``modules`` (default: all) as arrays of their
        own (copies of their rows: the paths that take separate weights)."""
        rows = self.rows()
        out = dict(self.arrays)
        for m in rows if modules is None else (m for m in modules if m in rows):
            i, row = rows[m]
            out[m] = self.stacks[i].array[row]
        return out


@functools.partial(jax.tree_util.register_dataclass, data_fields=["array", "start"], meta_fields=["size"])
@dataclasses.dataclass(frozen=True)
class _StackRange:
    """A member position of a batch read from a stack inside the jitted call: rows ``[start, start
    + size)`` of ``array``. ``start`` is traced, so a stack compiles once per batch size, not once
    per batch."""

    array: jax.Array
    start: jax.Array  # int32 []
    size: int

    def _cut(self, fn):
        # the slice is taken of the bits (same-width unsigned ints), not of the floats: XLA:CPU turned
        # a slice of bf16 values that the quantize reads in float32 into one float32 copy of the
        # weight (59 MB for a Kimi expert, a call 25-30% slower), a slice of the bits it fuses away
        bits = _UINT_OF_WIDTH.get(np.dtype(self.array.dtype).itemsize)
        if bits is None:
            return fn(self.array)
        return jax.lax.bitcast_convert_type(fn(jax.lax.bitcast_convert_type(self.array, bits)), self.array.dtype)

    def each(self) -> list[jax.Array]:
        return [self._cut(lambda a, i=i: jax.lax.dynamic_index_in_dim(a, self.start + i, keepdims=False))
                for i in range(self.size)]

    def whole(self) -> jax.Array:
        if self.size == 1:
            return self.each()[0]
        return self._cut(lambda a: jax.lax.dynamic_slice_in_dim(a, self.start, self.size))


_UINT_OF_WIDTH = {2: jnp.uint16, 4: jnp.uint32}


class _Batch(NamedTuple):
    """One batch: its fused groups (members in position order) and, per member position, what the
    jitted calls read: a tuple of arrays (one per group) or a :class:`_StackRange`."""

    groups: list[Group]
    positions: tuple


def _stack_batches(weights: LayerWeights, grouped: Sequence[Group], max_bytes: int):
    """(batches of the groups whose members lie at one row of as many different stacks, e.g. a
    routed expert's gate/up pair or its down alone; the other groups). Per kind (the stacks of the
    member positions) the rows go in consecutive runs, each split under ``max_bytes`` as
    :func:`fused_batches` splits a kind, so every position of a batch is one slice of its stack."""
    rows = weights.rows()
    by_kind: dict[tuple, list] = {}
    rest = []
    for g in grouped:
        places = [rows.get(m) for m in g]
        stacks = tuple(p[0] for p in places if p is not None)
        if None in places or len({p[1] for p in places}) != 1 or len(set(stacks)) != len(stacks):
            rest.append(g)
            continue
        by_kind.setdefault(stacks, []).append((places[0][1], g))
    out = []
    for stacks, members in by_kind.items():
        members.sort()
        runs = [[members[0]]]
        for row_group in members[1:]:
            if row_group[0] == runs[-1][-1][0] + 1:
                runs[-1].append(row_group)
            else:
                runs.append([row_group])
        arrays = [weights.stacks[i].array for i in stacks]
        one = sum(_nbytes(a.shape[1:], a.dtype) for a in arrays)
        for run in runs:
            for part in _even_split(run, one, max_bytes):
                start = jnp.int32(part[0][0])
                out.append(_Batch([g for _, g in part], tuple(_StackRange(a, start, len(part)) for a in arrays)))
    return out, rest


def _layer_batches(weights: LayerWeights, grouped: Sequence[Group], max_bytes: int) -> list[_Batch]:
    """Every group of ``grouped`` in one batch: the stacked ones by rows of their stacks, the others
    by :func:`fused_batches` (a group that mixes stacked and separate weights, or rows, takes its
    stacked members as arrays of their own)."""
    stacked, rest = _stack_batches(weights, grouped, max_bytes)
    arrays = weights.as_arrays([m for g in rest for m in g])
    separate = [_Batch(b, tuple(tuple(arrays[g[j]] for g in b) for j in range(len(b[0]))))
                for b in fused_batches(arrays, rest, max_bytes)]
    return separate + stacked


def _stacked(ws):
    """A member position as one array; a batch of one group has no leading axis (a scalar amax)."""
    if isinstance(ws, _StackRange):
        return ws.whole()
    return ws[0] if len(ws) == 1 else jnp.stack(ws)  # one weight: no copy


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
    return jnp.stack([jnp.stack([numerics.abs_max_or_nan(w) for w in (p.each() if isinstance(p, _StackRange) else p)])
                      for p in positions])


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
def _batch_error(ws, q):
    """(squared error, squared norm) of each weight of ``ws`` (no leading axis for one weight, as
    ``q``) over its sampled rows, scaled by rows / sampled rows to estimate the whole sums."""
    rows = slice(None, None, ERROR_ROW_STRIDE)
    if isinstance(ws, _StackRange):  # a slice of a held stack, its sampled rows read in place
        w, n = ws.whole()[..., rows, :], ws.array.shape[1]
    else:
        sampled = [x[rows] for x in ws]
        # only the sampled rows are stacked (copied); a mesh's result has a leading axis even for one weight
        w = jnp.stack(sampled) if q.weight.ndim > ws[0].ndim else sampled[0]
        n = ws[0].shape[0]
    sample = numerics.NVFP4Tensor(q.weight[..., rows, :], q.weight_scale[..., rows, :], q.weight_scale_2)
    err, norm = numerics.squared_error(w, sample)
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


def _position_hessians(hessians, batch: _Batch) -> list:
    """Per member position, the batch's hessians for local-hessian (an all-zero one, plain mse,
    where a weight has none); None per position for the other modes."""
    if hessians is None:
        return [None] * len(batch.positions)
    out = []
    for j, p in enumerate(batch.positions):
        kb = (p.array if isinstance(p, _StackRange) else p[0]).shape[-1] // numerics.BLOCK
        zero = jnp.zeros((kb, numerics.BLOCK, numerics.BLOCK), jnp.float32)
        out.append(tuple(hessians.get(g[j], zero) for g in batch.groups))
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


def _quantize_batch(batch: _Batch, opts: dict):
    """(quantized per position, amax) of one batch, dispatched (nothing read back, but the mesh
    path's amax)."""
    positions = batch.positions
    if opts["mode"] != "max":
        return _batch_search(positions, _position_hessians(opts["hessians"], batch), opts["mode"])
    if not opts["sharded"]:
        return _batch_quantize(positions)
    from nvfp4_jax import sharding

    amax = _batch_amax(positions)
    shared = np.max(np.asarray(jax.device_get(amax), np.float32), axis=0)
    return [sharding.quantize_sharded(list(p), np.atleast_1d(shared), opts["mesh"], check=False)
            for p in positions], amax


def quantize_layer(weights: Mapping[str, jax.Array] | LayerWeights, groups: Sequence[Sequence[str]] = (), *,
                   mesh=None, max_chunk_bytes: Optional[int] = None, mode: str = "max",
                   hessians: Optional[Mapping[str, jax.Array]] = None) -> QuantizedLayer:
    """Quantize every weight of ``weights`` (module name -> ``[N, K]`` array, or a
    :class:`LayerWeights` whose stacks are read in slices); members of each fused group in
    ``groups`` (only those present are used) share one amax. ``mode``: the block-scale rule
    (:data:`nvfp4_jax.weight_scales.MODES`); ``hessians`` (``local-hessian`` only): module -> f32
    ``[K/16, 16, 16]`` input second moments, a module without one is searched as ``mse``.
    ``max_chunk_bytes``: bytes of weight per jitted call (default :func:`chunk_bytes`). With a
    multi-device ``mesh`` the stacked batches of ``max`` are split over its devices (the searches
    run on the default device; stacks are taken apart into separate weights first)."""
    _check_mode(mode, hessians)
    if mode == "local-hessian" and hessians is None:
        hessians = {}
    if not isinstance(weights, LayerWeights):
        weights = LayerWeights(weights)
    modules = weights.modules()
    if not modules:
        return QuantizedLayer({}, [])
    sharded = mode == "max" and mesh is not None and mesh.size > 1
    if sharded and weights.stacks:  # sharding.quantize_sharded splits a list of separate weights
        weights = LayerWeights(weights.as_arrays())
    if max_chunk_bytes is not None:
        bound = max_chunk_bytes
    else:  # a mesh splits stacked batches over its devices: accelerator-sized batches on any backend
        bound = ACCELERATOR_CHUNK_BYTES if sharded else chunk_bytes()
    grouped = fused_groups(modules, groups)
    batches = _layer_batches(weights, grouped, bound)
    opts = {"mode": mode, "hessians": hessians, "sharded": sharded, "mesh": mesh}
    results = []
    for batch in batches:
        qs, amax = _quantize_batch(batch, opts)
        errors = [_batch_error(p, q) for p, q in zip(batch.positions, qs)]
        results.append((qs, errors, amax))
    results = jax.device_get(results)  # one transfer for the whole layer

    per_module = {}
    for (batch, _), (qs, errors, amax) in zip(batches, results):
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


__all__ = ["LayerQuantError", "QuantizedLayer", "LayerWeights", "WeightStack", "quantize_layer", "input_scales",
           "chunk_bytes", "sampled_rows", "fused_groups", "fused_batches",
           "ACCELERATOR_CHUNK_BYTES", "CPU_CHUNK_BYTES", "ERROR_ROW_STRIDE"]
