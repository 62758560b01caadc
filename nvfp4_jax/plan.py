"""The conversion plan: every decision about the output, made once before any tensor is computed.

:func:`build_plan` reads only names, shapes and configs (the reader, the family layout and the
options) and returns a frozen :class:`ConversionPlan`: which linears are quantized, the fused
groups, the exclude list, the linears left out (K not a multiple of 16, or with their fused group),
the layer ids, and every output tensor (stored name, dtype, shape, bytes) per unit in the order the
writer lays them out. It is the single source for the writer, the run report and every process of
a multi-process run (:meth:`ConversionPlan.owners`).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from nvfp4_jax import numerics
from nvfp4_jax.checkpoint.formats import OutputFormat, get_format
from nvfp4_jax.checkpoint.layout import default_preset, get_layout
from nvfp4_jax.checkpoint.safetensors_io import DTYPES

NON_LAYER = "non_layer"
# options that change the bytes of the output: a resume must use the same values
OUTPUT_SETTINGS = ("preset", "moe_policy", "input_scale_constant", "fmt", "shard_size", "compute_dtype",
                   "batch_size", "num_samples", "seq_len", "weight_scales")


def layer_unit(layer: int) -> str:
    return f"layer.{layer}"


class StoredTensor(NamedTuple):
    """One tensor as the writer stores it."""

    name: str
    dtype: str  # safetensors dtype
    shape: tuple
    nbytes: int


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    """One resumable unit (a decoder layer, or the non-layer tensors): its source tensors in add
    order, each with the stored tensors it becomes."""

    name: str
    layer: Optional[int]
    sources: tuple[tuple[str, tuple[StoredTensor, ...]], ...]

    def source_names(self) -> list[str]:
        return [n for n, _ in self.sources]


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    family: str
    model_type: str
    preset: str
    fmt: OutputFormat
    all_linear: tuple[str, ...]
    quantized: frozenset
    groups: tuple[tuple[str, ...], ...]  # fused groups of quantized linears (share their amax)
    exclude: tuple[str, ...]  # exclude_modules / ignore of the output configs
    not_multiple_16: tuple[str, ...]  # wanted by the preset, left bf16: K % 16 != 0
    dropped_with_group: tuple[str, ...]  # wanted, left bf16 with a fused-group member
    layer_ids: tuple[int, ...]
    num_layers: int  # decoder layers of the config; layers past it (MTP) are not calibrated
    non_layer_names: tuple[str, ...]
    units: tuple[UnitPlan, ...]
    settings: Mapping  # every option that changes the output bytes (resume refuses a change)

    def writer_units(self) -> list[tuple[str, list[StoredTensor]]]:
        """The units as :class:`nvfp4_jax.checkpoint.writer.PlannedWriter` takes them."""
        return [(u.name, [s for _, specs in u.sources for s in specs]) for u in self.units]

    def owners(self, num_processes: int, pinned: Optional[Mapping[str, int]] = None) -> dict[str, int]:
        """Which process quantizes and writes each source tensor (:func:`assign_owners`);
        ``pinned``: tensors whose process is fixed (routed experts held by a process's devices)."""
        return assign_owners(self.units, self.groups, num_processes, pinned)


def build_plan(reader, options) -> ConversionPlan:
    """The plan of converting the checkpoint of ``reader`` with ``options`` (a ConvertOptions)."""
    config = reader.config
    layout = get_layout(config)
    fmt = get_format(options.fmt)
    preset = options.preset or default_preset(config)
    names = reader.names()
    all_linear = layout.linear_modules(names)
    wanted = layout.quantized(all_linear, preset)
    not_multiple_16 = sorted(m for m in wanted if reader.info(f"{m}.weight").shape[-1] % numerics.BLOCK)
    quantized = layout.close_groups(wanted - set(not_multiple_16), all_linear)
    exclude = layout.exclude_modules(all_linear, quantized, layout.routers(names),
                                     extra=layout.embeddings(names) + layout.passthrough_entries(names))
    layer_of = {n: layout.spec.layer_index(n) for n in names}
    layer_ids = sorted({i for i in layer_of.values() if i is not None})
    non_layer = [n for n in names if layer_of[n] is None]
    settings = {k: getattr(options, k) for k in OUTPUT_SETTINGS}
    settings["preset"] = preset
    return ConversionPlan(
        family=layout.family, model_type=layout.model_type, preset=preset, fmt=fmt,
        all_linear=tuple(all_linear), quantized=frozenset(quantized),
        groups=tuple(layout.fused_groups(sorted(quantized))), exclude=tuple(exclude),
        not_multiple_16=tuple(not_multiple_16), dropped_with_group=tuple(sorted(wanted - set(not_multiple_16) - quantized)),
        layer_ids=tuple(layer_ids), num_layers=int(layout.num_hidden_layers if layout.num_hidden_layers is not None else len(layer_ids)),
        non_layer_names=tuple(non_layer), units=tuple(_units(reader, layer_of, non_layer, quantized, fmt)),
        settings=MappingProxyType(settings))


def _units(reader, layer_of: Mapping[str, Optional[int]], non_layer, quantized, fmt: OutputFormat) -> list[UnitPlan]:
    """Every tensor convert() hands to the writer, in add order: units layer by layer, then
    ``non_layer``; names sorted within a unit; a quantized linear's ``.weight`` expands to weight,
    weight_scale, weight_scale_2, input_scale (stored under the format's names)."""
    by_layer: dict[int, list[str]] = {}
    for n, layer in layer_of.items():
        if layer is not None:
            by_layer.setdefault(layer, []).append(n)
    todo = [(layer_unit(i), i, by_layer[i]) for i in sorted(by_layer)] + [(NON_LAYER, None, list(non_layer))]
    units = []
    for unit, layer, unit_names in todo:
        sources = []
        for n in sorted(unit_names):
            mod = n[: -len(".weight")] if n.endswith(".weight") else None
            logical = _quantized_specs(mod, reader.info(n).shape) if mod in quantized else [(n, *unquantized_spec(reader, n))]
            sources.append((n, tuple(_stored(fmt, *spec) for spec in logical)))
        units.append(UnitPlan(unit, layer, tuple(sources)))
    return units


def _quantized_specs(mod: str, shape) -> list[tuple[str, str, tuple]]:
    """(logical name, dtype, shape) of the four tensors of a quantized linear of weight ``shape``."""
    shape = tuple(shape)
    k = shape[-1]
    return [(f"{mod}.weight", "U8", shape[:-1] + (k // 2,)),
            (f"{mod}.weight_scale", "F8_E4M3", shape[:-1] + (k // numerics.BLOCK,)),
            (f"{mod}.weight_scale_2", "F32", ()),
            (f"{mod}.input_scale", "F32", ())]


def unquantized_spec(reader, name: str) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype, shape) of a tensor that stays unquantized: plain tensors keep their
    source dtype; FP8/INT4 sources become bf16 (SPEC section 6)."""
    info = reader.info(name)
    if info.encoding == "plain":
        e = reader.entry(info.parts["weight"])
        return e.dtype, tuple(e.shape)
    return "BF16", tuple(info.shape)


def _stored(fmt: OutputFormat, name: str, dtype: str, shape: tuple) -> StoredTensor:
    name, dtype, shape = fmt.stored_spec(name, dtype, shape)
    return StoredTensor(name, dtype, tuple(shape), int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize)


def assign_owners(units: Sequence[UnitPlan], groups, num_processes: int,
                  pinned: Optional[Mapping[str, int]] = None) -> dict[str, int]:
    """Which process quantizes and writes each source tensor: the members of a fused group go
    together (their shared amax needs every member's weight), and work items are dealt largest
    first to the least loaded process (loads carried over from unit to unit), so every process gets
    about the same number of bytes in every layer. A work item with a ``pinned`` member goes to that
    process (counted in its load before the others are dealt). Deterministic."""
    pinned = pinned or {}
    group_of = {f"{m}.weight": tuple(f"{x}.weight" for x in g) for g in groups for m in g}
    loads = [0] * num_processes
    owner: dict[str, int] = {}
    for unit in units:
        cost = {n: sum(s.nbytes for s in specs) for n, specs in unit.sources}
        work, seen = [], set()
        for n, _ in unit.sources:
            if n in seen:
                continue
            members = tuple(m for m in group_of.get(n, (n,)) if m in cost)
            seen.update(members)
            work.append((sum(cost[m] for m in members), members))
        fixed = [(c, members, pinned[m]) for c, members in work for m in members[:1] if m in pinned]
        for c, members, p in fixed:
            loads[p] += c
            for m in members:
                owner[m] = p
        work = [(c, members) for c, members in work if members[0] not in pinned]
        for c, members in sorted(work, key=lambda w: (-w[0], w[1])):
            p = min(range(num_processes), key=lambda i: (loads[i], i))
            loads[p] += c
            for m in members:
                owner[m] = p
    return owner


__all__ = ["ConversionPlan", "UnitPlan", "StoredTensor", "build_plan", "assign_owners", "unquantized_spec",
           "NON_LAYER", "OUTPUT_SETTINGS", "layer_unit"]
