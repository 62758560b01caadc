"""All quantized linears of one layer, on device, in a few jitted calls.

A MoE layer of Kimi-K2 has over a thousand linears. Handling them one by one costs a host sync per
module (the weight amax read back to decide the group amax) and a device-to-host copy per tensor,
which on a GPU is far more than the kernels themselves. Here the work is three steps:

1. weight amax: one jitted reduction per chunk of same-shaped weights (an integer max over the
   magnitude bits, :func:`numerics.abs_max_or_nan`: NaN/Inf come back NaN), then one small read of
   every amax of the layer, which both finds bad weights and zero weights;
2. fused groups (SPEC section 4) take the max of their members' amax, on the host (a few numbers);
3. quantize: one jitted call per chunk of same-shaped weights that also returns each weight's
   squared reconstruction error (:func:`numerics.squared_error`, fused into the same program),
   then a single ``device_get`` of every result of the layer.

Chunks are bounded in bytes of source weight (:func:`chunk_bytes`): on an accelerator a chunk of
up to 64 Kimi experts is stacked inside the jit (few launches, the stack is cheap there); on CPU
every weight is its own call: no stacked copy, one compilation per weight shape, and only one
weight's temporaries live at a time (XLA:CPU allocates every buffer over 32 MB freshly, which
costs page faults in proportion to its size).

Weights already held stacked (a MoE layer's routed experts, held as ``moe.ExpertStacks`` from the
read through calibration, given as :class:`WeightStack` in a :class:`LayerWeights`) are quantized
from contiguous slices of their stack taken inside the jitted calls: no per-weight array and no
re-stacked copy, the same chunk bound and the same bytes.

With the default mode ``max``, bytes equal :func:`nvfp4_jax.numerics.quantize` of each weight with
its group amax; another ``--weight-scales`` mode gives the bytes of
:func:`nvfp4_jax.weight_scales.quantize_with_mode` of each weight with its group amax (and, for
``local-hessian``, its input's block second moments). Every mode also reports each weight's squared
reconstruction error against the weight it was given.
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
    """The weights of a layer to quantize: ``arrays`` (module -> ``[N, K]``) and ``stacks``, weights
    quantized from slices of their stack (no module in both)."""

    arrays: Mapping[str, jax.Array]
    stacks: tuple[WeightStack, ...] = ()

    def modules(self) -> list[str]:
        return sorted(self.arrays) + [m for s in self.stacks for m in s.modules]

    def as_arrays(self) -> dict[str, jax.Array]:
        """Every weight as its own array (copies of the stacks' slices, for the paths without stacks)."""
        out = dict(self.arrays)
        for s in self.stacks:
            out.update({m: s.array[i] for i, m in enumerate(s.modules)})
        return out


@functools.partial(jax.tree_util.register_dataclass, data_fields=["array", "start"], meta_fields=["size"])
@dataclasses.dataclass(frozen=True)
class _StackRange:
    """A chunk read from a stack inside the jitted call: weights ``[start, start + size)`` of
    ``array``. ``start`` is traced, so a stack compiles once per chunk size, not once per chunk."""

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


@jax.jit
def _chunk_amax(ws):
    """max |w| per weight of the chunk ``[len(ws)]``, NaN where a weight holds NaN or Inf."""
    return jnp.stack([numerics.abs_max_or_nan(w) for w in (ws.each() if isinstance(ws, _StackRange) else ws)])


def _stacked(ws):
    """The chunk's weights as one array; a chunk of one weight has no leading axis (a scalar amax)."""
    if isinstance(ws, _StackRange):
        return ws.whole()
    return ws[0] if len(ws) == 1 else jnp.stack(ws)  # one weight: no copy


@jax.jit
def _chunk_quantize(ws, amax):
    """(quantized, (squared error, squared norm)) of the chunk; one weight: no leading axis."""
    w = _stacked(ws)
    q = numerics.quantize(w, amax, check=False)
    return q, numerics.squared_error(w, q)


@functools.partial(jax.jit, static_argnames=("mode",))
def _chunk_search(ws, amax, hessians, mode):
    w = _stacked(ws)
    h = None if hessians is None else _stacked(hessians)
    q = weight_scales.quantize_with_mode(w, mode, amax, h, check=False)
    return q, numerics.squared_error(w, q)


@jax.jit
def _chunk_error(ws, q):
    """Per weight of a stacked result ``q`` (the mesh path): (squared error, squared norm)."""
    return numerics.squared_error(jnp.stack(ws), q)


def _even_split(ms: Sequence, one_bytes: int, max_bytes: int) -> list:
    """``ms`` in consecutive batches of at most ``max_bytes`` (``one_bytes`` each, at least one a
    batch), split evenly, so they have one or two sizes (each size is a compilation)."""
    per = max(1, max_bytes // max(one_bytes, 1))
    n = -(-len(ms) // per)
    size, extra = divmod(len(ms), n)
    out, lo = [], 0
    for i in range(n):
        hi = lo + size + (i < extra)
        out.append(ms[lo:hi])
        lo = hi
    return out


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _chunks(weights: Mapping[str, jax.Array], modules: Sequence[str], max_bytes: int) -> list[list[str]]:
    """Modules batched by (shape, dtype), in sorted order, each batch of at most ``max_bytes`` of
    weight (at least one weight); the batches of a kind are split evenly."""
    by_kind: dict[tuple, list[str]] = {}
    for m in sorted(modules):
        w = weights[m]
        by_kind.setdefault((tuple(w.shape), str(w.dtype)), []).append(m)
    return [b for (shape, dtype), ms in by_kind.items() for b in _even_split(ms, _nbytes(shape, dtype), max_bytes)]


class _Chunk(NamedTuple):
    """One jitted call's weights: their modules and what the call reads (a tuple of arrays or a
    range of a stack)."""

    modules: list[str]
    source: object  # tuple[jax.Array, ...] | _StackRange


def _layer_chunks(weights: LayerWeights, max_bytes: int) -> list[_Chunk]:
    """The chunks of the separate arrays (:func:`_chunks`), then each stack's in consecutive ranges
    under the same bound."""
    out = [_Chunk(b, tuple(weights.arrays[m] for m in b))
           for b in _chunks(weights.arrays, sorted(weights.arrays), max_bytes)]
    for s in weights.stacks:
        starts = {m: i for i, m in enumerate(s.modules)}
        for b in _even_split(list(s.modules), _nbytes(s.array.shape[1:], s.array.dtype), max_bytes):
            out.append(_Chunk(b, _StackRange(s.array, jnp.int32(starts[b[0]]), len(b))))
    return out


def _group_max(amax: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    shared = np.full(amax.shape, -np.inf, np.float32)
    np.maximum.at(shared, group_ids, amax)
    return shared[group_ids]


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


def _chunk_hessians(hessians, chunk: _Chunk):
    """The chunk's per-weight hessians for local-hessian; an all-zero one (plain mse) where a weight
    has none."""
    source, batch = chunk.source, chunk.modules
    k = (source.array if isinstance(source, _StackRange) else source[0]).shape[-1]
    kb = k // numerics.BLOCK
    zero = jnp.zeros((kb, numerics.BLOCK, numerics.BLOCK), jnp.float32)
    return tuple(hessians.get(m, zero) for m in batch)


def quantize_layer(weights: Mapping[str, jax.Array] | LayerWeights, groups: Sequence[Sequence[str]] = (), *,
                   mesh=None, max_chunk_bytes: Optional[int] = None, mode: str = "max",
                   hessians: Optional[Mapping[str, jax.Array]] = None) -> QuantizedLayer:
    """Quantize every weight of ``weights`` (module name -> ``[N, K]`` array, or a
    :class:`LayerWeights` whose stacks are read in slices); members of each fused group in
    ``groups`` (only those present are used) share one amax. ``mode``: the block-scale rule
    (:data:`nvfp4_jax.weight_scales.MODES`); ``hessians`` (``local-hessian`` only): module -> f32
    ``[K/16, 16, 16]`` input second moments, a module without one is searched as ``mse``.
    ``max_chunk_bytes``: bytes of weight per jitted call (default :func:`chunk_bytes`). With a
    multi-device ``mesh`` the stacked chunks of ``max`` are split over its devices (the searches
    run on the default device; stacks are sliced into separate weights first)."""
    _check_mode(mode, hessians)
    if mode == "local-hessian" and hessians is None:
        hessians = {}
    if not isinstance(weights, LayerWeights):
        weights = LayerWeights(weights)
    if not weights.modules():
        return QuantizedLayer({}, [])
    sharded = mode == "max" and mesh is not None and mesh.size > 1
    if sharded and weights.stacks:  # quantize_sharded splits a list of weights over the mesh
        weights = LayerWeights(weights.as_arrays())
    if max_chunk_bytes is not None:
        bound = max_chunk_bytes
    else:  # a mesh splits stacked chunks over its devices: accelerator-sized chunks on any backend
        bound = ACCELERATOR_CHUNK_BYTES if sharded else chunk_bytes()
    chunks = _layer_chunks(weights, bound)
    batches = [c.modules for c in chunks]
    order = [m for b in batches for m in b]
    pos = {m: i for i, m in enumerate(order)}
    amax = [_chunk_amax(c.source) for c in chunks]
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
    for chunk in chunks:
        b, ws = chunk
        lo = pos[b[0]]
        a = shared[lo:lo + len(b)] if len(b) > 1 else shared[lo]
        if mode != "max":
            h = _chunk_hessians(hessians, chunk) if mode == "local-hessian" else None
            results.append(_chunk_search(ws, a, h, mode))
        elif sharded:
            from nvfp4_jax import sharding

            q = sharding.quantize_sharded(list(ws), np.atleast_1d(a), mesh, check=False)
            results.append((q, _chunk_error(ws, q)))
        else:
            results.append(_chunk_quantize(ws, a))
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


__all__ = ["LayerQuantError", "QuantizedLayer", "LayerWeights", "WeightStack", "quantize_layer", "input_scales",
           "chunk_bytes", "ACCELERATOR_CHUNK_BYTES", "CPU_CHUNK_BYTES"]
