"""Calibration statistics (SPEC.md sections 3-5).

:func:`calibrate_layer` runs one decoder layer over the calibration batches; the layer forward
(``nvfp4_jax.models``) returns a :class:`~nvfp4_jax.models.stats.LayerStats` per batch, which
:class:`CalibStats` accumulates (max for amax, sum for token counts). The functions below resolve
the input amax of every quantized linear with the MoE back-fill policy, unify fused groups, and
report expert coverage.

Weight amax is never stored here: it is a property of the weight and is computed from it when the
weight is quantized (the lazy rule of SPEC section 5).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import sharding
from nvfp4_jax.checkpoint.layout import natural_key
from nvfp4_jax.errors import NVFP4Error
from nvfp4_jax.models.stats import LayerStats

MOE_POLICIES = ("layer-max", "per-expert")


class CalibrationError(NVFP4Error, ValueError):
    """Calibration cannot give a valid scale (e.g. no expert of a MoE layer saw a token)."""


def _max(a: float, b: float) -> float:
    """max that keeps NaN (Python's ``max(0.0, nan)`` is 0.0, which would hide a broken forward)."""
    return float(np.maximum(np.float64(a), np.float64(b)))


@dataclasses.dataclass
class ExpertStats:
    """Per routed-expert statistics of one MoE layer (index = expert id)."""

    gate_up_input_amax: np.ndarray  # float32 [E], 0 where the expert saw no token
    down_input_amax: np.ndarray  # float32 [E]
    tokens_per_expert: np.ndarray  # int64 [E]

    def merge(self, other: "ExpertStats") -> "ExpertStats":
        return ExpertStats(
            np.maximum(self.gate_up_input_amax, other.gate_up_input_amax),
            np.maximum(self.down_input_amax, other.down_input_amax),
            self.tokens_per_expert + other.tokens_per_expert,
        )


@dataclasses.dataclass
class CalibStats:
    """amax statistics of a calibration run: ``input_amax[module]`` for non-routed linears and
    ``experts[prefix]`` (``model.layers.{l}.mlp.experts``) for routed experts."""

    input_amax: dict[str, float] = dataclasses.field(default_factory=dict)
    experts: dict[str, ExpertStats] = dataclasses.field(default_factory=dict)

    def observe(self, layer_stats: LayerStats) -> None:
        """Merge one batch's ``LayerStats`` (from ``family.layer_forward`` or
        ``sharding.forward_sharded``) into these statistics."""
        for name, amax in layer_stats.input_amax.items():
            self.input_amax[name] = _max(self.input_amax.get(name, 0.0), float(np.asarray(amax, np.float32)))
        ex = layer_stats.experts
        if ex is not None:
            new = ExpertStats(
                np.asarray(ex.gate_up_input_amax, np.float32),
                np.asarray(ex.down_input_amax, np.float32),
                np.asarray(ex.tokens_per_expert, np.int64),
            )
            prev = self.experts.get(ex.prefix)
            self.experts[ex.prefix] = new if prev is None else prev.merge(new)

    def merge(self, other: "CalibStats") -> "CalibStats":
        """Max-merge with statistics from another host or run."""
        out = CalibStats(dict(self.input_amax), dict(self.experts))
        for k, v in other.input_amax.items():
            out.input_amax[k] = _max(out.input_amax.get(k, 0.0), v)
        for k, v in other.experts.items():
            out.experts[k] = v if k not in out.experts else out.experts[k].merge(v)
        return out

    def to_json(self) -> dict:
        return {
            "input_amax": dict(self.input_amax),
            "experts": {
                k: {
                    "gate_up_input_amax": v.gate_up_input_amax.tolist(),
                    "down_input_amax": v.down_input_amax.tolist(),
                    "tokens_per_expert": v.tokens_per_expert.tolist(),
                }
                for k, v in self.experts.items()
            },
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "CalibStats":
        return cls(
            {k: float(v) for k, v in d.get("input_amax", {}).items()},
            {
                k: ExpertStats(
                    np.asarray(v["gate_up_input_amax"], np.float32),
                    np.asarray(v["down_input_amax"], np.float32),
                    np.asarray(v["tokens_per_expert"], np.int64),
                )
                for k, v in d.get("experts", {}).items()
            },
        )


def calibrate_layer(family, layer: int, params: Mapping[str, jax.Array], hidden: Sequence[jax.Array], *,
                    dtype, mesh=None) -> tuple[list[jax.Array], CalibStats]:
    """Run decoder ``layer`` over every calibration batch of ``hidden`` (``[b, S, H]`` arrays) ->
    (the layer's outputs, one per batch, ready; the layer's statistics over all batches).

    With ``mesh`` (a ``jax.sharding.Mesh``) every batch is split over its devices
    (``sharding.forward_sharded``); with an expert mesh (``expert_parallel.expert_mesh``, axis
    ``experts``) a MoE layer runs expert parallel (``expert_parallel.forward``: each device its
    block of routed experts, ``params`` placed by ``expert_parallel.read_layer``) and a dense layer
    as with a mesh; otherwise batches run one by one on the default device, a MoE layer's routed
    experts stacked once for all of them (:func:`_layer_stacks`)."""
    from nvfp4_jax import expert_parallel

    stats = CalibStats()
    if mesh is not None and tuple(mesh.axis_names) == (expert_parallel.AXIS,) and family.is_moe_layer(layer):
        out, merged = expert_parallel.forward(family, layer, params, hidden, dtype, mesh)
        stats.observe(merged)
    elif mesh is not None:
        out, merged = sharding.forward_sharded(family, layer, params, hidden, dtype, mesh)
        stats.observe(merged)
    else:
        out = []
        stacks = _layer_stacks(family, layer, params, dtype)
        for h in hidden:
            h, s = family.layer_forward(layer, params, h, dtype=dtype, experts=stacks)
            stats.observe(jax.device_get(s))
            out.append(h)
        del stacks
    jax.block_until_ready(out)
    return list(out), stats


# the layers the conversion may hold on the device beside the stacks: the one calibrating and the
# next, read ahead (overlap.read_ahead)
LAYERS_ON_DEVICE = 2
STACK_HEADROOM = 0.15  # of the device's memory, kept free beside them for activations and autotuning


def stacks_fit(stack_bytes: int, bytes_limit: int | None) -> bool:
    """Whether a layer's expert stacks (one more copy of its routed experts, ``stack_bytes``) may be
    built on a device of ``bytes_limit`` (None: no allocator limit known, e.g. CPU, whose host
    memory the read-ahead bound covers): LAYERS_ON_DEVICE layers of those experts plus the stacks
    plus STACK_HEADROOM of the memory must fit. Otherwise each batch stacks its chunks inside its
    programs (slower, no extra copy). Decided from sizes alone, not from the memory in use at that
    moment, so a run does not change path with the read-ahead's timing."""
    if not bytes_limit:
        return True
    return (LAYERS_ON_DEVICE + 1) * stack_bytes <= (1.0 - STACK_HEADROOM) * bytes_limit


def room_for_expert_stacks(family, layer: int, params: Mapping[str, jax.Array], dtype) -> bool:
    """Whether MoE layer ``layer``'s routed experts (per-expert arrays in ``params``) may be
    stacked on this process's device (:func:`stacks_fit`); False for a dense layer."""
    if not family.is_moe_layer(layer):
        return False
    prefix = family.layer_prefix(layer, params) + "mlp.experts."
    itemsize = jnp.dtype(dtype).itemsize
    stack_bytes = sum(int(np.prod(v.shape)) * itemsize for k, v in params.items()
                      if k.startswith(prefix) and k.endswith(".weight"))
    stats = jax.local_devices()[0].memory_stats() or {}  # this process's device: the one the batches run on
    return stacks_fit(stack_bytes, stats.get("bytes_limit"))


def _layer_stacks(family, layer: int, params: Mapping[str, jax.Array], dtype):
    """The routed-expert stacks a MoE layer's batches read: those ``params`` holds
    (``moe.LayerTensors``, kept by the pipeline for the quantize phase), else stacked once here
    where the device has room for the copy (dropped by the caller after its batches), else None
    (each batch stacks its chunks inside its programs)."""
    held = getattr(params, "expert_stacks", None)
    if held is not None:
        return held
    return family.expert_stacks(layer, params, dtype) if room_for_expert_stacks(family, layer, params, dtype) else None


@dataclasses.dataclass
class LayerHessians:
    """The local-hessian statistic of one layer (SPEC section 10.4): ``hessian[module]`` is the
    mean block second moment ``H / tokens`` of the linear's input, f32 ``[K/16, 16, 16]`` on
    device (gate/up of an expert share one array); ``without_tokens`` lists the routed-expert
    linears no token reached (all-zero H: searched as mse)."""

    hessian: dict[str, jax.Array]
    without_tokens: list[str]


def _add(total, value):
    return value if total is None else total + value


def collect_hessians(family, layer: int, params: Mapping[str, jax.Array], hidden: Sequence[jax.Array],
                     input_amax: Mapping[str, float], *, dtype) -> LayerHessians:
    """The second pass of local-hessian calibration over the layer's input batches ``hidden``:
    the linears in ``input_amax`` (the max-calibrated amax of the quantized linears) get their
    inputs NVFP4 fake-quantized, weights stay unquantized, and every linear's block second moments
    are accumulated on device. Batches run one by one on this process's first device."""
    device = jax.local_devices()[0]
    sums: dict[str, jax.Array] = {}
    rows: dict[str, jax.Array] = {}
    gate_up = down = tokens = None
    prefix = None
    stacks = _layer_stacks(family, layer, params, dtype)
    for h in hidden:
        _, s = family.layer_forward(layer, params, jax.device_put(h, device), dtype=dtype, input_amax=input_amax,
                                    collect_hessian=True, experts=stacks)
        for m, v in s.hessian.items():
            sums[m], rows[m] = _add(sums.get(m), v), _add(rows.get(m), s.hessian_rows[m])
        if s.experts is not None:
            prefix = s.experts.prefix
            gate_up, down = _add(gate_up, s.experts.gate_up_hessian), _add(down, s.experts.down_hessian)
            tokens = _add(tokens, s.experts.tokens_per_expert)
    del stacks
    hessian = {m: sums[m] / rows[m].astype(jnp.float32) for m in sums}
    without = []
    if prefix is not None:
        counts = np.asarray(jax.device_get(tokens))
        denom = jnp.maximum(tokens, 1).astype(jnp.float32)[:, None, None, None]
        gate_up, down = gate_up / denom, down / denom
        for e in range(len(counts)):
            mods = [f"{prefix}.{e}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
            hessian.update({mods[0]: gate_up[e], mods[1]: gate_up[e], mods[2]: down[e]})
            if counts[e] == 0:
                without += mods
    return LayerHessians(hessian, without)


def backfill_expert_amax(stats: ExpertStats, policy: str, layer_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Input amax for every routed expert of one layer (SPEC section 5).

    ``layer-max``: every expert gets the layer's max, per projection. ``per-expert``: experts keep
    their own amax; experts that saw no token get the layer max. Raises if no expert saw a token.
    """
    if policy not in MOE_POLICIES:
        raise ValueError(f"unknown MoE policy {policy!r}; choose one of {MOE_POLICIES}")
    seen = stats.tokens_per_expert > 0
    if not seen.any():
        raise CalibrationError(
            f"no routed expert of {layer_name} received a calibration token; use more or longer "
            "calibration samples, or --input-scale-constant for a calibration-free run")
    gate_up_max = float(stats.gate_up_input_amax[seen].max())
    down_max = float(stats.down_input_amax[seen].max())
    for label, v in (("gate/up", gate_up_max), ("down", down_max)):
        if not v > 0:
            raise CalibrationError(f"{layer_name}: routed experts saw tokens but their {label} input amax is 0")
    n = len(seen)
    if policy == "layer-max":
        return np.full(n, gate_up_max, np.float32), np.full(n, down_max, np.float32)
    gate_up = np.where(seen & (stats.gate_up_input_amax > 0), stats.gate_up_input_amax, gate_up_max)
    down = np.where(seen & (stats.down_input_amax > 0), stats.down_input_amax, down_max)
    return gate_up.astype(np.float32), down.astype(np.float32)


def expert_input_amax(stats: CalibStats, policy: str) -> dict[str, float]:
    """``{expert linear module: input amax}`` for every routed expert of every MoE layer."""
    out: dict[str, float] = {}
    for prefix, ex in stats.experts.items():
        gate_up, down = backfill_expert_amax(ex, policy, prefix.rsplit(".experts", 1)[0])
        for e in range(len(gate_up)):
            out[f"{prefix}.{e}.gate_proj"] = float(gate_up[e])
            out[f"{prefix}.{e}.up_proj"] = float(gate_up[e])
            out[f"{prefix}.{e}.down_proj"] = float(down[e])
    return out


def unify_groups(amax: Mapping[str, float], groups: Iterable[tuple[str, ...]]) -> dict[str, float]:
    """Every member of a fused group gets the group's max (SPEC section 4). Members missing from
    ``amax`` are ignored; the result has the same keys as ``amax``."""
    out = dict(amax)
    for group in groups:
        present = [m for m in group if m in out]
        if present:
            top = max(out[m] for m in present)
            for m in present:
                out[m] = top
    return out


def coverage_report(stats: CalibStats) -> dict[str, dict]:
    """Per MoE layer: experts without tokens and a token-count histogram."""
    report = {}
    for prefix, ex in sorted(stats.experts.items(), key=lambda kv: natural_key(kv[0])):
        counts = ex.tokens_per_expert
        edges = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10**9]
        hist = {}
        for lo, hi in zip(edges[:-1], edges[1:]):
            n = int(((counts >= lo) & (counts < hi)).sum())
            if n:
                hist[f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}"] = n
        report[prefix.rsplit(".mlp.experts", 1)[0]] = {
            "num_experts": int(len(counts)),
            "experts_without_tokens": int((counts == 0).sum()),
            "experts_without_tokens_ids": [int(i) for i in np.flatnonzero(counts == 0)],
            "tokens_min": int(counts.min()),
            "tokens_max": int(counts.max()),
            "tokens_total": int(counts.sum()),
            "histogram": hist,
        }
    return report


def constant_input_amax(value_input_scale: float = 1.0) -> float:
    """Input amax that gives ``input_scale == value_input_scale`` (calibration-free runs)."""
    return float(np.float32(value_input_scale) * np.float32(2688.0))


__all__ = [
    "MOE_POLICIES", "CalibrationError", "ExpertStats", "CalibStats", "calibrate_layer", "room_for_expert_stacks",
    "stacks_fit", "LayerHessians",
    "collect_hessians", "backfill_expert_amax",
    "expert_input_amax", "unify_groups", "coverage_report", "constant_input_amax",
]
