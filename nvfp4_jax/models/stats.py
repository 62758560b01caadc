"""The calibration statistics a layer forward returns, as pytrees (valid jit / shard_map outputs).

Names are static: the routed experts' `prefix` is pytree metadata, not a leaf, so the statistics
pass through `jax.jit`, `nnx.jit` and `jax.shard_map` unchanged; `input_amax` is keyed by module
name (checkpoint name without ".weight").
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import flax.struct
import jax
import numpy as np


@flax.struct.dataclass
class RoutedExpertStats:
    """Per routed-expert statistics of one MoE layer (index = expert id)."""

    prefix: str = flax.struct.field(pytree_node=False)  # "model.layers.{l}.mlp.experts"
    gate_up_input_amax: jax.Array  # f32 [E]: max |x| of the tokens routed to expert e; 0 where none
    down_input_amax: jax.Array  # f32 [E]
    tokens_per_expert: jax.Array  # int [E]
    topk_ids: Optional[jax.Array] = None  # int32 [T, k] the routing, ascending per token (not merged)
    # local-hessian only (collect_hessian): block second-moment sums of each expert's inputs,
    # f32 [E, K/16, 16, 16] (models.hessian), tokens_per_expert counting their rows; not merged here
    gate_up_hessian: Optional[jax.Array] = None
    down_hessian: Optional[jax.Array] = None


@flax.struct.dataclass
class LayerStats:
    """What one decoder layer forward observed: the input amax of every non-routed linear and,
    for a MoE layer, its routed experts' statistics."""

    input_amax: Mapping[str, jax.Array]  # module -> f32[]
    experts: Optional[RoutedExpertStats] = None
    # local-hessian only (collect_hessian): module -> f32 [K/16, 16, 16] block second-moment sum of
    # the linear's input, and module -> int32 [] its number of rows; not merged by merge_layer_stats
    hessian: Optional[Mapping[str, jax.Array]] = None
    hessian_rows: Optional[Mapping[str, jax.Array]] = None


def merge_layer_stats(stats: Sequence[LayerStats]) -> LayerStats:
    """One LayerStats (numpy values) from the statistics of several batches or devices of one
    layer: every amax by max, token counts by sum in int64; leading axes (one row per device, as
    `jax.shard_map` returns them) are reduced the same way. Both merges are exact, so the result
    does not depend on how the tokens were split. topk_ids are not merged."""
    input_amax: dict[str, np.float32] = {}
    prefix, gate_up, down, tokens = None, [], [], []
    for s in stats:
        for k, v in s.input_amax.items():
            v = np.max(np.asarray(jax.device_get(v), np.float32))
            input_amax[k] = np.float32(max(input_amax.get(k, np.float32(0)), v))
        ex = s.experts
        if ex is None:
            continue
        if prefix is not None and ex.prefix != prefix:
            raise ValueError(f"merge_layer_stats: statistics of {ex.prefix} and {prefix}")
        prefix = ex.prefix
        e = np.shape(ex.gate_up_input_amax)[-1]
        gate_up.append(np.asarray(jax.device_get(ex.gate_up_input_amax), np.float32).reshape(-1, e))
        down.append(np.asarray(jax.device_get(ex.down_input_amax), np.float32).reshape(-1, e))
        tokens.append(np.asarray(jax.device_get(ex.tokens_per_expert), np.int64).reshape(-1, e))
    experts = None
    if prefix is not None:
        experts = RoutedExpertStats(prefix, np.concatenate(gate_up).max(axis=0),
                                    np.concatenate(down).max(axis=0), np.concatenate(tokens).sum(axis=0))
    return LayerStats(input_amax, experts)
