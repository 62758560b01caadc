"""Routed experts: dispatch sorted by expert, grouped matmuls a chunk of experts at a time,
per-expert statistics, and the weighted combine, with the roundings of transformers' MoE blocks."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .exact_jit import exact_jit
from .hessian import expert_block_second_moment_sum
from .ops import ModelConfigError, Params, activation, input_fake_quant_rows

EXPERT_STACK_BYTES = 2 << 30  # default bound on the experts stacked at once for one grouped matmul
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Dispatch(NamedTuple):
    """(token, k) assignments sorted by expert id (see `sort_by_expert`)."""

    x_sorted: jax.Array  # [T*k, H] the token row of each sorted assignment
    expert_sorted: jax.Array  # int32 [T*k]
    order: jax.Array  # [T*k] assignment index t*k+j of each sorted row
    group_sizes: jax.Array  # int32 [E]
    gate_up_input_amax: jax.Array  # f32 [E], 0 for experts without tokens


class ExpertWeights(NamedTuple):
    """Per-expert checkpoint tensors of a run of experts, one list per projection."""

    gate: Sequence[jax.Array]  # [I, H] each
    up: Sequence[jax.Array]  # [I, H] each
    down: Sequence[jax.Array]  # [H, I] each

    def chunk(self, start: int, stop: int) -> "ExpertWeights":
        return ExpertWeights(self.gate[start:stop], self.up[start:stop], self.down[start:stop])


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

    def weights(self, params: Params) -> ExpertWeights:
        """The routed experts' weights from checkpoint-named `params`."""
        lists = []
        for proj_name in PROJECTIONS:
            lst = []
            for e in range(self.num_experts):
                key = self.module(e, proj_name) + ".weight"
                if key not in params:
                    raise ModelConfigError(
                        f"routed expert tensor {key!r} is missing "
                        "(routed experts must be given per expert, checkpoint layout)")
                lst.append(params[key])
            lists.append(lst)
        return ExpertWeights(*lists)

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


def _stack_experts(weights: ExpertWeights, dtype):
    """Per-expert checkpoint tensors -> ragged_dot operands [C+1, H, 2I] and [C+1, I, H].

    Group 0 is an all-zero expert that absorbs the rows of experts before this chunk, so a chunk
    can be run on the full sorted row array (rows after the chunk are not covered: output 0).
    """
    g = jnp.stack([w.astype(dtype) for w in weights.gate])   # [C, I, H]
    u = jnp.stack([w.astype(dtype) for w in weights.up])
    d = jnp.stack([w.astype(dtype) for w in weights.down])   # [C, H, I]
    gu = jnp.concatenate([g, u], axis=1).swapaxes(1, 2)  # [C, H, 2I]
    dn = d.swapaxes(1, 2)  # [C, I, H]
    gu = jnp.concatenate([jnp.zeros((1,) + gu.shape[1:], dtype), gu], axis=0)
    dn = jnp.concatenate([jnp.zeros((1,) + dn.shape[1:], dtype), dn], axis=0)
    return gu, dn


def experts_chunk(dispatch: Dispatch, start, weights: ExpertWeights, in_amax: ExpertInputAmax | None = None,
                  *, act_name: str, collect_hessian: bool = False):
    """Run experts [start, start+C) on their rows of the expert-sorted assignments.

    in_amax (evaluation hook, [C] each): fake-quantize each row's gate/up resp. down input with
    its expert's input amax.
    Returns (y_sorted [T*k, H] with zeros outside the chunk's rows, down_input_amax f32 [C]), and
    with collect_hessian the block second-moment sums of the down inputs f32 [C, I/16, 16, 16].
    """
    x_sorted, expert_sorted, group_sizes = dispatch.x_sorted, dispatch.expert_sorted, dispatch.group_sizes
    dtype = x_sorted.dtype
    c = len(weights.gate)
    act = activation(act_name)
    gu_w, dn_w = _stack_experts(weights, dtype)
    num_experts = group_sizes.shape[0]
    before = jnp.sum(jnp.where(jnp.arange(num_experts) < start, group_sizes, 0)).astype(jnp.int32)
    chunk_sizes = jax.lax.dynamic_slice(group_sizes, (start,), (c,))
    sizes = jnp.concatenate([before[None], chunk_sizes]).astype(jnp.int32)
    local = expert_sorted - start  # out-of-chunk ids fall outside [0, C) and are dropped
    row_expert = jnp.clip(local, 0, c - 1)  # rows outside the chunk: any amax, their output is unused
    x_in = x_sorted
    if in_amax is not None:
        x_in = input_fake_quant_rows(x_sorted, in_amax.gate_up[row_expert])
    gu = jax.lax.ragged_dot(x_in, gu_w, sizes, preferred_element_type=jnp.float32).astype(dtype)
    inter = gu.shape[-1] // 2
    h = act(gu[:, :inter]) * gu[:, inter:]
    row_amax = jnp.max(jnp.abs(h), axis=-1).astype(jnp.float32)
    down_amax = jax.ops.segment_max(row_amax, local, num_segments=c, indices_are_sorted=True)
    down_amax = jnp.where(chunk_sizes > 0, down_amax, 0.0).astype(jnp.float32)
    down_hessian = expert_block_second_moment_sum(h, local, c) if collect_hessian else None
    if in_amax is not None:
        h = input_fake_quant_rows(h, in_amax.down[row_expert])
    y = jax.lax.ragged_dot(h, dn_w, sizes, preferred_element_type=jnp.float32).astype(dtype)
    return (y, down_amax) if down_hessian is None else (y, down_amax, down_hessian)


experts_chunk_jit = exact_jit(experts_chunk, static_argnames=("act_name", "collect_hessian"))


def _stack_experts_padded(weights: ExpertWeights, dtype):
    """Per-expert checkpoint tensors -> batched-matmul operands [C, H, 2I] and [C, I, H]."""
    g = jnp.stack([w.astype(dtype) for w in weights.gate])   # [C, I, H]
    u = jnp.stack([w.astype(dtype) for w in weights.up])
    d = jnp.stack([w.astype(dtype) for w in weights.down])   # [C, H, I]
    return jnp.concatenate([g, u], axis=1).swapaxes(1, 2), d.swapaxes(1, 2)


def experts_chunk_padded(dispatch: Dispatch, start, weights: ExpertWeights, in_amax: ExpertInputAmax | None = None,
                         *, act_name: str, capacity: int, collect_hessian: bool = False):
    """:func:`experts_chunk` as one batched matmul: each expert of the chunk gets its rows gathered
    into a ``[capacity, H]`` slab (zero rows after its last one; capacity at least its row count),
    so the matmuls cover C x capacity rows instead of the whole sorted row array. Same results and
    roundings per row (bf16 operands, float32 accumulation, bf16 result); padded rows are left out
    of every statistic and of the output."""
    x_sorted, group_sizes = dispatch.x_sorted, dispatch.group_sizes
    dtype = x_sorted.dtype
    c = len(weights.gate)
    act = activation(act_name)
    gu_w, dn_w = _stack_experts_padded(weights, dtype)
    offsets = jnp.cumsum(group_sizes) - group_sizes  # first sorted row of each expert
    chunk_sizes = jax.lax.dynamic_slice(group_sizes, (start,), (c,))
    chunk_offsets = jax.lax.dynamic_slice(offsets, (start,), (c,))
    slot = jnp.arange(capacity, dtype=jnp.int32)
    valid = slot[None, :] < chunk_sizes[:, None]  # [C, cap]
    num_rows = x_sorted.shape[0]
    rows = jnp.where(valid, chunk_offsets[:, None] + slot[None, :], num_rows)  # padded: out of range
    x = jnp.where(valid[..., None], x_sorted[jnp.minimum(rows, num_rows - 1)], jnp.zeros((), dtype))
    if in_amax is not None:
        x = input_fake_quant_rows(x.reshape(c * capacity, -1),
                                  jnp.repeat(in_amax.gate_up, capacity)).reshape(x.shape)
    gu = jnp.einsum("crh,chn->crn", x, gu_w, preferred_element_type=jnp.float32).astype(dtype)
    inter = gu.shape[-1] // 2
    h = act(gu[..., :inter]) * gu[..., inter:]
    h = jnp.where(valid[..., None], h, jnp.zeros((), dtype))
    row_amax = jnp.max(jnp.abs(h), axis=-1).astype(jnp.float32)
    down_amax = jnp.where(chunk_sizes > 0, jnp.max(jnp.where(valid, row_amax, 0.0), axis=-1), 0.0)
    down_amax = down_amax.astype(jnp.float32)
    down_hessian = None
    if collect_hessian:
        ids = jnp.where(valid, jnp.arange(c, dtype=jnp.int32)[:, None], c)  # padded rows: no expert
        down_hessian = expert_block_second_moment_sum(h.reshape(c * capacity, -1), ids.reshape(-1), c)
    if in_amax is not None:
        h = input_fake_quant_rows(h.reshape(c * capacity, -1),
                                  jnp.repeat(in_amax.down, capacity)).reshape(h.shape)
    y = jnp.einsum("cri,cin->crn", h, dn_w, preferred_element_type=jnp.float32).astype(dtype)
    y_sorted = jnp.zeros((num_rows, y.shape[-1]), dtype).at[rows.reshape(-1)].set(
        y.reshape(c * capacity, -1), mode="drop")
    return (y_sorted, down_amax) if down_hessian is None else (y_sorted, down_amax, down_hessian)


experts_chunk_padded_jit = exact_jit(experts_chunk_padded, static_argnames=("act_name", "capacity", "collect_hessian"))

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


def chunk_matmul_plan(group_sizes: np.ndarray, starts: Sequence[int], chunk: int, num_rows: int) -> list:
    """Per chunk, the capacity of its padded batched matmul, or None for ragged_dot.

    The rule: padded when ``C x capacity <= PADDED_ROWS_FACTOR x num_rows``, num_rows being the
    rows one ragged_dot call is given (the whole expert-sorted row array: rows outside the chunk
    are absorbed or dropped, not skipped), so padded slabs never exceed 4x the sorted row array
    and padded runs where it was measured cheaper (see PADDED_ROWS_FACTOR); a routing so skewed
    that one expert's rows times C exceed that falls back to ragged_dot.
    ``NVFP4_MOE_MATMUL=padded|ragged`` forces one path.
    """
    import os

    force = os.environ.get(MOE_MATMUL_ENV, "auto")
    plan = []
    for start in starts:
        sizes = group_sizes[start:start + chunk]
        cap = padded_capacity(int(sizes.max(initial=0)))
        fits = len(sizes) * cap <= PADDED_ROWS_FACTOR * num_rows
        plan.append(None if force == "ragged" or (force != "padded" and not fits) else cap)
    return plan


def auto_chunk(weights: ExpertWeights) -> int:
    """The most experts whose stacked weights fit EXPERT_STACK_BYTES (at least 1)."""
    per_expert = sum(int(np.prod(lst[0].shape)) * jnp.dtype(lst[0].dtype).itemsize for lst in weights)
    num_experts = len(weights.gate)
    return max(1, min(num_experts, EXPERT_STACK_BYTES // max(per_expert, 1)))


def run_experts(dispatch: Dispatch, weights: ExpertWeights, in_amax: ExpertInputAmax | None, *,
                act_name: str, chunk_size: int | None = None, collect_hessian: bool = False):
    """Every routed expert on its rows, `chunk_size` experts stacked at a time (default:
    auto_chunk) -> (y_sorted [T*k, H], down_input_amax f32 [E]), and with collect_hessian the
    down inputs' block second-moment sums f32 [E, I/16, 16, 16] third."""
    num_experts = len(weights.gate)
    chunk = chunk_size or auto_chunk(weights)
    starts = list(range(0, num_experts, chunk))
    if isinstance(dispatch.group_sizes, jax.core.Tracer):  # traced by a caller's jit: sizes unknown, ragged_dot
        caps = [None] * len(starts)
    else:  # one small read of the routing per layer: the capacities are compile-time shapes
        caps = chunk_matmul_plan(np.asarray(jax.device_get(dispatch.group_sizes)), starts, chunk,
                                 int(dispatch.x_sorted.shape[0]))
    y_sorted = None
    down_amax, down_hessian = [], []
    for start, cap in zip(starts, caps):
        stop = min(start + chunk, num_experts)
        hook = None if in_amax is None else in_amax.chunk(start, stop)
        if cap is None:
            y, d, *h = experts_chunk_jit(dispatch, jnp.int32(start), weights.chunk(start, stop), hook,
                                         act_name=act_name, collect_hessian=collect_hessian)
        else:
            y, d, *h = experts_chunk_padded_jit(dispatch, jnp.int32(start), weights.chunk(start, stop), hook,
                                                act_name=act_name, capacity=cap, collect_hessian=collect_hessian)
        y_sorted = y if y_sorted is None else y_sorted + y
        down_amax.append(d)
        down_hessian += h
    if collect_hessian:
        return y_sorted, jnp.concatenate(down_amax), jnp.concatenate(down_hessian)
    return y_sorted, jnp.concatenate(down_amax)


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
