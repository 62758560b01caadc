"""Routed experts: dispatch sorted by expert, the layer's experts stacked once, grouped matmuls a
chunk of experts at a time, per-expert statistics, and the weighted combine, with the roundings of
transformers' MoE blocks."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .exact_jit import exact_jit
from .hessian import expert_block_second_moment_sum
from .ops import ModelConfigError, Params, activation, input_fake_quant_rows

EXPERT_STACK_BYTES = 2 << 30  # default bound on the expert weights one chunk's program copies from the stacks
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Dispatch(NamedTuple):
    """(token, k) assignments sorted by expert id (see `sort_by_expert`)."""

    x_sorted: jax.Array  # [T*k, H] the token row of each sorted assignment
    expert_sorted: jax.Array  # int32 [T*k]
    order: jax.Array  # [T*k] assignment index t*k+j of each sorted row
    group_sizes: jax.Array  # int32 [E]
    gate_up_input_amax: jax.Array  # f32 [E], 0 for experts without tokens


class ExpertStacks(NamedTuple):
    """The routed experts of a MoE layer (or of one device's block of them) stacked along a
    leading expert axis, in checkpoint orientation and the compute dtype. Built once per layer
    (:meth:`ExpertNames.stacks`) and read by every calibration batch: the matmuls contract these
    arrays as they are, no per-call re-stack or transpose."""

    gate: jax.Array  # [E, I, H]
    up: jax.Array  # [E, I, H]
    down: jax.Array  # [E, H, I]

    @property
    def num_experts(self) -> int:
        return int(self.gate.shape[0])

    def nbytes_per_expert(self) -> int:
        return sum(int(np.prod(a.shape[1:])) * jnp.dtype(a.dtype).itemsize for a in self)


def _stack(ws, dtype):
    return jnp.stack([w.astype(dtype) for w in ws])


_stack_jit = jax.jit(_stack, static_argnames=("dtype",))  # one projection's stack per call


class LayerTensors(dict):
    """A layer's checkpoint-named tensors whose routed experts may be held stacked: after
    :meth:`ExpertNames.move_into_stacks` they are only in ``expert_stacks`` (their per-expert
    entries removed), so the layer holds one copy of its experts instead of two; the forward
    (``Family.layer_forward``) and the quantize phase (``layer_quant.WeightStack``) read the
    stacks as they are. A pytree like a dict, with the stacks as one more child."""

    def __init__(self, tensors=(), expert_stacks: ExpertStacks | None = None):
        super().__init__(tensors)
        self.expert_stacks = expert_stacks


jax.tree_util.register_pytree_node(
    LayerTensors, lambda t: ((dict(t), t.expert_stacks), None), lambda _, children: LayerTensors(*children))


class ExpertInputAmax(NamedTuple):
    """Evaluation hook: per-expert input amax of the gate/up input and of the down input."""

    gate_up: jax.Array  # f32 [E]
    down: jax.Array  # f32 [E]

    def chunk(self, start: int, stop: int) -> "ExpertInputAmax":
        return ExpertInputAmax(self.gate_up[start:stop], self.down[start:stop])


@dataclasses.dataclass(frozen=True)
class ExpertNames:
    """Checkpoint names of one MoE layer's routed experts."""

    prefix: str  # "model.layers.{l}.mlp.experts"
    num_experts: int

    def module(self, e: int, proj_name: str) -> str:
        return f"{self.prefix}.{e}.{proj_name}"

    def weight_names(self, proj_name: str) -> list[str]:
        return [self.module(e, proj_name) + ".weight" for e in range(self.num_experts)]

    def _per_expert(self, params: Params, proj_name: str) -> list[jax.Array]:
        missing = [k for k in self.weight_names(proj_name) if k not in params]
        if missing:
            raise ModelConfigError(f"routed expert tensor {missing[0]!r} is missing "
                                   "(routed experts must be given per expert, checkpoint layout)")
        return [params[k] for k in self.weight_names(proj_name)]

    def stacks(self, params: Params, dtype) -> ExpertStacks:
        """The routed experts' checkpoint-named tensors of `params` stacked once, in `dtype` (one
        extra copy of the layer's routed experts while the stacks live beside the per-expert
        arrays); `params`' own stacks where it holds them (:class:`LayerTensors`)."""
        held = getattr(params, "expert_stacks", None)
        if held is not None:
            return held
        dtype = jnp.dtype(dtype)
        return ExpertStacks(*(_stack_jit(self._per_expert(params, pn), dtype=dtype) for pn in PROJECTIONS))

    def move_into_stacks(self, params: LayerTensors, dtype) -> None:
        """Stack the routed experts of `params` (in `dtype`) into ``params.expert_stacks`` and remove
        their per-expert entries, one projection at a time as its stack is built, so at most a
        third of the layer's experts is held twice at any moment."""
        stacked = []
        for proj_name in PROJECTIONS:
            stacked.append(_stack_jit(self._per_expert(params, proj_name), dtype=jnp.dtype(dtype)))
            for k in self.weight_names(proj_name):
                del params[k]
            # computed before the next projection's is dispatched: its inputs are freed by then, so
            # asynchronous dispatch cannot have every stack and every per-expert array alive at once
            jax.block_until_ready(stacked[-1])
        params.expert_stacks = ExpertStacks(*stacked)

    def input_amax(self, input_amax: Params) -> ExpertInputAmax | None:
        """The evaluation hook's amaxes when `input_amax` (module name -> f32[]) covers the routed
        experts, else None. gate and up share one input, so they get the max of their two amaxes
        (equal in a checkpoint that unifies fused groups)."""
        modules = [self.module(e, pn) for e in range(self.num_experts) for pn in PROJECTIONS]
        stray = sorted(set(k for k in input_amax if k.startswith(self.prefix + ".")) - set(modules))
        if stray:
            raise ModelConfigError(f"input_amax names {stray[0]!r}, which is no routed expert linear")
        present = [m in input_amax for m in modules]
        if not any(present):
            return None
        if not all(present):
            raise ModelConfigError(f"input_amax is given for some but not all routed experts of {self.prefix}")
        gu = jnp.stack([jnp.maximum(input_amax[self.module(e, "gate_proj")], input_amax[self.module(e, "up_proj")])
                        for e in range(self.num_experts)]).astype(jnp.float32)
        dn = jnp.stack([input_amax[self.module(e, "down_proj")]
                        for e in range(self.num_experts)]).astype(jnp.float32)
        return ExpertInputAmax(gu, dn)


def sort_by_expert(x_tokens: jax.Array, topk_ids: jax.Array, num_experts: int) -> Dispatch:
    """Flatten (token, k) assignments [T, k] and sort them by expert id."""
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    expert_sorted = flat[order]
    x_sorted = x_tokens[order // k]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    row_amax = jnp.max(jnp.abs(x_sorted), axis=-1).astype(jnp.float32)
    gu_amax = jax.ops.segment_max(row_amax, expert_sorted, num_segments=num_experts,
                                  indices_are_sorted=True)
    gu_amax = jnp.where(group_sizes > 0, gu_amax, 0.0).astype(jnp.float32)
    return Dispatch(x_sorted, expert_sorted, order, group_sizes, gu_amax)


# one ragged_dot contraction in checkpoint orientation: rows x [M, K] against each expert's
# weight [N, K] (the stack [C, N, K]), contracting K with K, groups along the stack's axis 0
_RAGGED_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _ragged_matmul(x, w, sizes, dtype):
    return jax.lax.ragged_dot_general(x, w, sizes, _RAGGED_DIMS, preferred_element_type=jnp.float32).astype(dtype)


def _padded_matmul(x, w, dtype):
    """Slabs x [C, R, K] times their expert's weight w [C, N, K] (checkpoint orientation) ->
    [C, R, N]: bf16 operands, float32 accumulation, rounded to dtype."""
    return jnp.einsum("crk,cnk->crn", x, w, preferred_element_type=jnp.float32).astype(dtype)


def experts_chunk(dispatch: Dispatch, start, stacks: ExpertStacks, in_amax: ExpertInputAmax | None = None, *,
                  act_name: str):
    """Run experts [start, start+C) (`stacks`: those C experts, e.g. one device's block) on their
    rows of the expert-sorted assignments with ragged_dot over every sorted row.

    Rows of other experts are given to the chunk's first (rows before the chunk) and last (rows
    after) expert, so the group sizes cover the row array and no zero weight is needed, and are
    zeroed in the results. in_amax (evaluation hook, [C] each): fake-quantize each row's gate/up
    resp. down input with its expert's input amax.
    Returns (y_sorted [T*k, H] with zeros outside the chunk's rows, down_input_amax f32 [C], the
    down inputs [T*k, I] before their fake quant with zeros outside the chunk's rows).
    """
    x_sorted, expert_sorted, group_sizes = dispatch.x_sorted, dispatch.expert_sorted, dispatch.group_sizes
    dtype = x_sorted.dtype
    c = stacks.num_experts
    num_rows = x_sorted.shape[0]
    act = activation(act_name)
    num_experts = group_sizes.shape[0]
    before = jnp.sum(jnp.where(jnp.arange(num_experts) < start, group_sizes, 0)).astype(jnp.int32)
    chunk_sizes = jax.lax.dynamic_slice(group_sizes, (start,), (c,)).astype(jnp.int32)
    after = (num_rows - before - jnp.sum(chunk_sizes)).astype(jnp.int32)
    sizes = chunk_sizes.at[0].add(before).at[c - 1].add(after)
    local = expert_sorted - start  # out-of-chunk ids fall outside [0, C) and are dropped
    in_chunk = ((local >= 0) & (local < c))[:, None]
    row_expert = jnp.clip(local, 0, c - 1)  # rows outside the chunk: any amax, their output is unused
    x_in = x_sorted
    if in_amax is not None:
        x_in = input_fake_quant_rows(x_sorted, in_amax.gate_up[row_expert])
    g = _ragged_matmul(x_in, stacks.gate, sizes, dtype)
    u = _ragged_matmul(x_in, stacks.up, sizes, dtype)
    h = jnp.where(in_chunk, act(g) * u, jnp.zeros((), dtype))
    row_amax = jnp.max(jnp.abs(h), axis=-1).astype(jnp.float32)
    down_amax = jax.ops.segment_max(row_amax, local, num_segments=c, indices_are_sorted=True)
    down_amax = jnp.where(chunk_sizes > 0, down_amax, 0.0).astype(jnp.float32)
    h_in = h if in_amax is None else input_fake_quant_rows(h, in_amax.down[row_expert])
    y = jnp.where(in_chunk, _ragged_matmul(h_in, stacks.down, sizes, dtype), jnp.zeros((), dtype))
    return y, down_amax, h


experts_chunk_jit = exact_jit(experts_chunk, static_argnames=("act_name",))


class ChunkShape(NamedTuple):
    """The static part of one chunk program (part of its compile key): the activation, and the
    chunk's expert count (ragged range) or slab capacity (padded)."""

    act_name: str
    rows: int


def _experts_range(dispatch: Dispatch, start, stacks: ExpertStacks, in_amax: ExpertInputAmax | None, acc,
                   shape: ChunkShape):
    """:func:`experts_chunk` of experts [start, start + shape.rows) sliced from the layer's stacks inside
    the program, its rows added into the accumulators ``acc = (y_sorted, down inputs | None)``
    (donated: updated in place; rows of different chunks are disjoint, so the adds are exact)."""
    def cut(a):
        return jax.lax.dynamic_slice_in_dim(a, start, shape.rows)

    hook = None if in_amax is None else ExpertInputAmax(*map(cut, in_amax))
    y, down_amax, h = experts_chunk(dispatch, start, ExpertStacks(*map(cut, stacks)), hook, act_name=shape.act_name)
    y_acc, h_acc = acc
    return (y_acc + y, None if h_acc is None else h_acc + h), down_amax


_experts_range_jit = exact_jit(_experts_range, static_argnames=("shape",), donate_argnames=("acc",))


class SlabRows(NamedTuple):
    """Which rows a padded program takes: rows ``[skip, skip + capacity)`` of each of ``experts``
    (int32 [C]; None: every expert of the stacks). Both traced: not part of the compile key."""

    experts: jax.Array | None
    skip: jax.Array  # int32 []


def experts_chunk_padded(dispatch: Dispatch, slab_rows: SlabRows, stacks: ExpertStacks,
                         in_amax: ExpertInputAmax | None, acc, shape: ChunkShape):
    """Experts as one batched matmul: each gets rows ``[skip, skip + capacity)`` of its own
    gathered into a ``[capacity, H]`` slab (zero rows past its last one), so the matmuls cover C x
    capacity rows. ``experts``: int32 [C], any C experts of the layer (e.g. of similar row counts),
    their weights gathered from the layer's stacks inside the program (a copy of C experts, bounded
    by EXPERT_STACK_BYTES through C); or None: every expert, the stacks used as they are (no copy).
    Weights are contracted in checkpoint orientation. Results are written into the accumulators
    ``acc = (y_sorted [T*k, H], down inputs [T*k, I] | None)`` (donated: updated in place, no
    full-size temporary per chunk). Same results and roundings per row as :func:`experts_chunk`
    (bf16 operands, float32 accumulation, bf16 result); padded rows are left out of every
    statistic and of the output. ``shape.rows`` is the capacity. Returns (acc, down_input_amax f32
    [C] over these rows)."""
    x_sorted, group_sizes = dispatch.x_sorted, dispatch.group_sizes
    dtype = x_sorted.dtype
    act = activation(shape.act_name)
    capacity, experts = shape.rows, slab_rows.experts
    if experts is None:
        experts = jnp.arange(stacks.num_experts, dtype=jnp.int32)
        gate, up, down = stacks
    else:
        gate, up, down = (a[experts] for a in stacks)
    c = experts.shape[0]
    offsets = jnp.cumsum(group_sizes) - group_sizes  # first sorted row of each expert
    chunk_sizes, chunk_offsets = group_sizes[experts], offsets[experts]
    slot = slab_rows.skip + jnp.arange(capacity, dtype=jnp.int32)
    valid = slot[None, :] < chunk_sizes[:, None]  # [C, cap]
    num_rows = x_sorted.shape[0]
    rows = jnp.where(valid, chunk_offsets[:, None] + slot[None, :], num_rows)  # padded: out of range
    x = jnp.where(valid[..., None], x_sorted[jnp.minimum(rows, num_rows - 1)], jnp.zeros((), dtype))
    if in_amax is not None:
        x = input_fake_quant_rows(x.reshape(c * capacity, -1),
                                  jnp.repeat(in_amax.gate_up[experts], capacity)).reshape(x.shape)
    h = act(_padded_matmul(x, gate, dtype)) * _padded_matmul(x, up, dtype)
    h = jnp.where(valid[..., None], h, jnp.zeros((), dtype))
    row_amax = jnp.max(jnp.abs(h), axis=-1).astype(jnp.float32)
    down_amax = jnp.max(jnp.where(valid, row_amax, 0.0), axis=-1)
    y_acc, h_acc = acc
    flat_rows = rows.reshape(-1)
    if h_acc is not None:
        h_acc = h_acc.at[flat_rows].set(h.reshape(c * capacity, -1), mode="drop")
    if in_amax is not None:
        h = input_fake_quant_rows(h.reshape(c * capacity, -1),
                                  jnp.repeat(in_amax.down[experts], capacity)).reshape(h.shape)
    y = _padded_matmul(h, down, dtype)
    y_acc = y_acc.at[flat_rows].set(y.reshape(c * capacity, -1), mode="drop")
    return (y_acc, h_acc), down_amax.astype(jnp.float32)


experts_chunk_padded_jit = exact_jit(experts_chunk_padded, static_argnames=("shape",), donate_argnames=("acc",))

MOE_MATMUL_ENV = "NVFP4_MOE_MATMUL"  # auto (default) | padded | ragged: forces one path (benchmarks)
# padded slabs may hold up to this many times the sorted rows: measured on an H200 (2026-12-02, a
# Kimi-K2 MoE layer, 4096 tokens x 8, 24 experts a chunk) ragged_dot took 95 ms a chunk against
# 13 ms for padded slabs of 1.1x the rows, about 7x more per row; 4 keeps padded the cheaper with
# room and bounds its slabs (bf16 input, float32 gate/up result) to 4x the sorted row array
PADDED_ROWS_FACTOR = 4


def padded_capacity(rows: int) -> int:
    """The capacity a chunk's largest expert of ``rows`` rows gets: the next of 16, 24, 32, 48,
    64, 96, ... (powers of two and 1.5 times them), so few capacities (compilations) serve a run
    while at most a third of a slab's rows are padding."""
    cap = 16
    while cap < rows:
        cap = cap * 3 // 2 if cap & (cap - 1) == 0 else cap * 4 // 3  # 16, 24, 32, 48, 64, ...
    return cap


class PaddedStep(NamedTuple):
    """One padded program of a batch: rows ``[skip, skip + capacity)`` of each of ``experts``
    (int32 [C], weights gathered from the stacks), or of every expert (``experts`` None: the
    stacks as they are)."""

    experts: np.ndarray | None
    capacity: int
    skip: int


def gather_cost_rows() -> int:
    """What gathering one expert's weights costs, in rows of its matmuls: a copy reads and writes
    its 2P bytes, a row of its matmuls is 2P FLOPs, so about 2 x FLOP rate / memory bandwidth.
    GPU and TPU: about 2 x 700 TFLOP/s / 4.8 TB/s (H200), some 300. This CPU (2 vCPUs with AVX-512
    bf16) measured the same order: batched expert matmuls at about 0.7 TFLOP/s, and a gathered
    Kimi-K2 expert (88 MB into a fresh buffer) about 25 ms, some 200 rows; a plan priced at 16 rows
    a gather (an earlier guess) gathered 24 of 32 experts and ran 1.5x slower than padding them all.
    So one figure for every backend."""
    return 256


def _needed_capacity(rows: int) -> int:
    return padded_capacity(rows) if rows else 0


def _hot_chunks(sizes: np.ndarray, skip: int, chunk: int, num_rows: int, force: str) -> list | None:
    """Padded steps for the rows past ``skip`` of every expert that has some: those experts in
    descending count of such rows, each step's capacity that of its first (largest). A step takes
    ``chunk`` experts, or the largest power of two below it whose middle expert needs at least half
    that capacity (so one busy expert is not padded with many smaller ones: a skewed routing's
    busiest experts run alone or in small steps); a step may run past the last such expert into
    experts without rows there (padding), so the compiled shapes stay (power of two or chunk,
    capacity) pairs. None when a step exceeds the padded-rows rule."""
    over = np.maximum(sizes - skip, 0)
    order = np.argsort(-over, kind="stable").astype(np.int32)
    hot = int(np.count_nonzero(over))
    counts = [chunk] + [1 << b for b in range(chunk.bit_length() - 1, -1, -1) if 1 << b < chunk]
    steps = []
    i = 0
    while i < hot:
        cap = padded_capacity(int(over[order[i]]))
        n = next(n for n in counts if n <= len(order) - i
                 and (n == 1 or cap <= 2 * _needed_capacity(int(over[order[i + n // 2]]))))
        if force != "padded" and n * cap > PADDED_ROWS_FACTOR * num_rows:
            return None
        steps.append(PaddedStep(order[i:i + n], cap, skip))
        i += n
    return steps


def _steps_rows(steps: list, num_experts: int, gather_rows: int) -> int:
    """A plan's cost in matmul rows: its slabs plus gathered experts at gather_rows each."""
    return sum((num_experts if s.experts is None else len(s.experts)) * s.capacity
               + (0 if s.experts is None else gather_rows * len(s.experts)) for s in steps)


def expert_matmul_plan(group_sizes: np.ndarray, chunk: int, num_rows: int,
                       gather_rows: int | None = None) -> list | None:
    """The padded batched matmuls of a batch (:class:`PaddedStep` list), or None for ragged_dot
    over contiguous chunks of ``chunk`` experts.

    Two tiers: first every expert's rows up to a common capacity c1 in one program on the stacks
    as they are (no weight copy), then the rows past c1 of the busier experts (:func:`_hot_chunks`,
    their weights gathered, at most ``chunk`` a program, experts of similar counts together), so a
    skewed routing pads only the programs of its busiest experts. c1 is the ladder capacity
    (`padded_capacity`) of least cost in rows (slab rows plus ``gather_rows`` per gathered expert,
    default :func:`gather_cost_rows`), 0 being no first tier (every expert with rows gathered);
    capacities on the ladder keep the compiled shapes few across batches. Padded steps must each
    have ``C x capacity <= PADDED_ROWS_FACTOR x num_rows``, num_rows being the rows one ragged_dot
    call is given (the whole expert-sorted row array), else ragged_dot is used.
    ``NVFP4_MOE_MATMUL=padded|ragged`` forces one path.
    """
    import os

    force = os.environ.get(MOE_MATMUL_ENV, "auto")
    if force == "ragged":
        return None
    sizes = np.asarray(group_sizes).astype(np.int64)
    num_experts = len(sizes)
    gather_rows = gather_cost_rows() if gather_rows is None else gather_rows
    largest = int(sizes.max(initial=0))
    if largest == 0:
        return []
    best = None
    candidates = [0]
    while candidates[-1] < largest:
        candidates.append(padded_capacity(candidates[-1] + 1))
    for c1 in candidates:
        steps = [] if c1 == 0 else [PaddedStep(None, c1, 0)]
        if c1 and force != "padded" and num_experts * c1 > PADDED_ROWS_FACTOR * num_rows:
            break  # larger c1 only grow the first tier
        hot = _hot_chunks(sizes, c1, chunk, num_rows, force) if c1 < largest else []
        if hot is None:
            continue
        steps += hot
        cost = _steps_rows(steps, num_experts, gather_rows)
        if best is None or cost < best[0]:
            best = (cost, steps)
    return None if best is None else best[1]


def auto_chunk(stacks: ExpertStacks) -> int:
    """The most experts whose weights fit EXPERT_STACK_BYTES (at least 1): the copy one chunk's
    program takes of its experts' weights."""
    num_experts = stacks.num_experts
    return max(1, min(num_experts, EXPERT_STACK_BYTES // max(stacks.nbytes_per_expert(), 1)))


_down_hessian_jit = jax.jit(expert_block_second_moment_sum, static_argnames=("num_experts",))


def run_experts(dispatch: Dispatch, stacks: ExpertStacks, in_amax: ExpertInputAmax | None, *,
                act_name: str, chunk_size: int | None = None, collect_hessian: bool = False):
    """Every routed expert on its rows, from the layer's stacks, `chunk_size` experts a program
    (default: auto_chunk) -> (y_sorted [T*k, H], down_input_amax f32 [E]), and with
    collect_hessian the down inputs' block second-moment sums f32 [E, I/16, 16, 16] third (taken
    once over every sorted row, so they do not depend on the chunking or the matmul path)."""
    num_experts = stacks.num_experts
    chunk = chunk_size or auto_chunk(stacks)
    x_sorted = dispatch.x_sorted
    num_rows = int(x_sorted.shape[0])
    if isinstance(dispatch.group_sizes, jax.core.Tracer):  # traced by a caller's jit: sizes unknown, ragged_dot
        plan = None
    else:  # one small read of the routing per batch: the capacities are compile-time shapes
        plan = expert_matmul_plan(np.asarray(jax.device_get(dispatch.group_sizes)), chunk, num_rows)
    inter = int(stacks.gate.shape[1])
    acc = (jnp.zeros_like(x_sorted), jnp.zeros((num_rows, inter), x_sorted.dtype) if collect_hessian else None)
    if plan is None:
        down_amax = []
        for start in range(0, num_experts, chunk):
            acc, d = _experts_range_jit(dispatch, jnp.int32(start), stacks, in_amax, acc,
                                        shape=ChunkShape(act_name, min(chunk, num_experts - start)))
            down_amax.append(d)
        down_amax = jnp.concatenate(down_amax)
    else:
        down_amax = jnp.zeros((num_experts,), jnp.float32)  # experts without rows keep 0
        for step in plan:
            experts = None if step.experts is None else jnp.asarray(step.experts)
            acc, d = experts_chunk_padded_jit(dispatch, SlabRows(experts, jnp.int32(step.skip)), stacks, in_amax,
                                              acc, shape=ChunkShape(act_name, step.capacity))
            # an expert's rows may span both tiers: its down input amax is the max of the two (exact)
            down_amax = down_amax.at[np.arange(num_experts) if experts is None else experts].max(d)
    y_sorted, down_inputs = acc
    if collect_hessian:
        return y_sorted, down_amax, _down_hessian_jit(down_inputs, dispatch.expert_sorted, num_experts=num_experts)
    return y_sorted, down_amax


def combine_experts(y_sorted, order, topk_ids, topk_weights, dtype):
    """Weighted sum of each token's expert outputs -> [T, H].

    As transformers does: each output times its routing weight (promoted dtype), rounded to the
    compute dtype, then added into a compute-dtype accumulator in ascending expert id.
    """
    t, k = topk_ids.shape
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, -1)
    contrib = (y * topk_weights[..., None]).astype(dtype)
    perm = jnp.argsort(topk_ids, axis=-1)
    contrib = jnp.take_along_axis(contrib, perm[..., None], axis=1)
    acc = jnp.zeros((t, y.shape[-1]), dtype)
    for j in range(k):
        acc = (acc + contrib[:, j]).astype(dtype)
    return acc
