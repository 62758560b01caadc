"""convert(): source HF checkpoint -> ModelOpt NVFP4 checkpoint, layer by layer (ARCHITECTURE.md).

For each decoder layer: read its tensors (decoded to bf16), push the calibration hidden states
through it (recording the input amax of every linear, per expert for MoE), quantize its linears,
hand every tensor to the writer, free it. Memory is one layer plus the calibration activations.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import __version__, numerics, sharding
from nvfp4_jax.calibration import (
    CalibrationError, CalibStats, MOE_POLICIES, constant_input_amax, coverage_report,
    expert_input_amax, unify_groups,
)
from nvfp4_jax.checkpoint import formats
from nvfp4_jax.checkpoint.layout import default_preset, get_layout
from nvfp4_jax.checkpoint.reader import CheckpointReader
from nvfp4_jax.checkpoint.writer import open_planned_writer
from nvfp4_jax.errors import NVFP4Error, UsageError

PRODUCER_VERSION = f"nvfp4_jax-{__version__}"
_EXPERT_CHUNK = 64  # experts quantized per jitted call (bounds the stacked copy)


@dataclasses.dataclass
class ConvertOptions:
    """Options of :func:`convert` (the CLI flags of ``nvfp4-jax convert``)."""

    calib_tokens: Optional[Sequence[Sequence[int]]] = None  # token-id lists, one sample each
    num_samples: Optional[int] = None  # keep the first N samples
    seq_len: Optional[int] = None  # truncate samples to this many tokens
    batch_size: int = 8
    preset: Optional[str] = None  # all | mlp_only | experts_only; None: the family default
    moe_policy: str = "layer-max"
    input_scale_constant: Optional[float] = None  # calibration-free: every input_scale = this
    fmt: str = "modelopt"
    shard_size: float = 5e9
    resume: bool = False
    overwrite: bool = False
    compute_dtype: str = "bfloat16"
    progress: bool = True


class _Progress:
    """One line on stderr with a bar and an ETA over layers."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start, self.done = total, enabled, time.perf_counter(), 0

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        el = time.perf_counter() - self.start
        eta = el / self.done * (self.total - self.done)
        width = 28
        fill = int(width * self.done / max(self.total, 1))
        sys.stderr.write(
            f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {label:<14} "
            f"elapsed {el:6.1f}s  eta {eta:6.1f}s")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _batches(tokens: Sequence[Sequence[int]], batch_size: int) -> list[np.ndarray]:
    """Equal-length samples batched together (no padding: pad tokens would change the amax)."""
    by_len: dict[int, list] = {}
    for t in tokens:
        by_len.setdefault(len(t), []).append(list(t))
    out = []
    for length in sorted(by_len):
        rows = by_len[length]
        for i in range(0, len(rows), batch_size):
            out.append(np.asarray(rows[i:i + batch_size], np.int32))
    return out


def _layer_of(name: str) -> Optional[int]:
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


class ConversionError(NVFP4Error, RuntimeError):
    """The conversion cannot proceed; the message names the tensor or layer."""


def convert(src, out, options: Optional[ConvertOptions] = None,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr), *, group=None) -> Optional[dict]:
    """Convert the HF checkpoint ``src`` into a ModelOpt NVFP4 checkpoint at ``out``; returns the
    run report (also written to ``out/nvfp4_report.json``).

    group: a :class:`nvfp4_jax.distributed.ProcessGroup` when this is one process of a multi-process
    run: the calibration batches are split across processes and the statistics max-merged after
    every layer; each process quantizes and writes only the tensors :func:`assign_owners` gives it,
    at the places :func:`output_plan` fixes; process 0 writes the rest and returns the report, the
    others return None.
    """
    opt = options or ConvertOptions()
    t_start = time.perf_counter()
    phase = {"read": 0.0, "calibrate": 0.0, "quantize": 0.0, "write": 0.0}
    if opt.moe_policy not in MOE_POLICIES:
        raise UsageError(f"unknown --moe-policy {opt.moe_policy!r}; choose one of {MOE_POLICIES}")
    calibrated = opt.input_scale_constant is None
    if calibrated and not opt.calib_tokens:
        raise UsageError("no calibration data: pass calibration text/tokens, or --input-scale-constant "
                         "1.0 for a calibration-free run (SPEC section 3)")
    if opt.input_scale_constant is not None and not (opt.input_scale_constant > 0
                                                      and np.isfinite(opt.input_scale_constant)):
        raise UsageError(f"--input-scale-constant must be finite and > 0, got {opt.input_scale_constant}")
    dtype = jnp.dtype(opt.compute_dtype)

    reader = CheckpointReader(src)  # validates every file before anything is written
    config = reader.config
    layout = get_layout(config)
    preset = opt.preset or default_preset(config)
    names = reader.names()
    all_linear = layout.linear_modules(names)
    routers = layout.routers(names)
    wanted = layout.quantized(all_linear, preset)
    not_multiple_16 = sorted(m for m in wanted if reader.info(f"{m}.weight").shape[-1] % numerics.BLOCK)
    quantized = layout.close_groups(wanted - set(not_multiple_16), all_linear)
    dropped_with_group = sorted(wanted - set(not_multiple_16) - quantized)
    exclude = layout.exclude_modules(all_linear, quantized, routers, extra=layout.embeddings(names))
    groups = layout.fused_groups(sorted(quantized))

    family = None
    samples = []
    if calibrated:
        from nvfp4_jax.models import get_family

        family = get_family(config)
        samples = [list(s) for s in opt.calib_tokens]
        if opt.num_samples:
            samples = samples[:opt.num_samples]
        if opt.seq_len:
            samples = [s[:opt.seq_len] for s in samples]
        samples = [s for s in samples if s]
        if not samples:
            raise UsageError("calibration data is empty after --num-samples/--seq-len")
        vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size", 0))
        if vocab and max(max(s) for s in samples) >= vocab:
            raise UsageError(f"calibration token id {max(max(s) for s in samples)} >= vocab_size {vocab}")

    layer_ids = sorted({i for i in (_layer_of(n) for n in names) if i is not None})
    n_layers = int(config.get("num_hidden_layers", len(layer_ids)))
    other_names = [n for n in names if _layer_of(n) is None]
    owned = None  # source tensors this process quantizes and writes (None: all)
    plan = output_plan(reader, layer_ids, other_names, quantized, opt.fmt)
    if group is None:  # the layout is known up front: every tensor is written once, in place
        writer = open_planned_writer(out, plan_units(plan), shard_size=opt.shard_size, fmt=opt.fmt,
                                     resume=opt.resume, overwrite=opt.overwrite)
    else:
        owners = assign_owners(plan, groups, group.num_processes)
        owned = {n for n, p in owners.items() if p == group.process_id}
        run = {k: v for k, v in dataclasses.asdict(opt).items() if k not in ("calib_tokens", "progress")}
        writer = group.open_writer(out, plan, opt, fingerprint={"samples": samples, "preset": preset, "options": run})
    log(f"nvfp4-jax convert: {src} -> {out}  ({layout.family}/{layout.model_type}, {len(layer_ids)} layers, "
        f"preset {preset}, {len(quantized)} of {len(all_linear)} linears quantized, "
        f"{'calibration ' + str(len(samples)) + ' samples' if calibrated else 'input_scale constant ' + str(opt.input_scale_constant)})")

    stats = CalibStats()
    hidden = []
    # all local devices: calibration samples and stacked experts are split over them
    mesh = sharding.device_mesh() if len(jax.local_devices()) > 1 else None
    if calibrated:
        t = time.perf_counter()
        embed_params = reader.get_many(family.embed_param_names(names), dtype)
        phase["read"] += time.perf_counter() - t
        t = time.perf_counter()
        batches = _batches(samples, opt.batch_size)
        if group is not None:  # whole batches per process: each batch's forward is the one-process one
            batches = batches[group.process_id::group.num_processes]
        hidden = [family.embed(embed_params, jnp.asarray(b)) for b in batches]
        if mesh is not None:  # every local device gets a one-device batch worth of rows
            hidden = sharding.regroup_batches(hidden, opt.batch_size * mesh.size)
        del embed_params
        phase["calibrate"] += time.perf_counter() - t

    progress = _Progress(len(layer_ids) + 1, opt.progress)
    layer_reports = []
    for layer in layer_ids:
        unit = f"layer.{layer}"
        calib_layer = calibrated and layer < n_layers  # MTP layers are passed through uncalibrated
        done = writer.is_done(unit)
        if done and not calib_layer:
            progress.step(f"{unit} (done)")
            continue
        layer_names = [n for n in names if _layer_of(n) == layer]
        t = time.perf_counter()
        if family is not None:  # routers keep float32 where the forward needs it
            params = family.read_layer(reader, layer, dtype=dtype, names=layer_names)
        elif owned is None:
            params = reader.get_many(layer_names, dtype)
        else:  # calibration-free, one of several processes: only the weights it quantizes
            params = reader.get_many([n for n in layer_names if n in owned and n.endswith(".weight")
                                      and n[: -len(".weight")] in quantized], dtype)
        phase["read"] += time.perf_counter() - t
        layer_stats = CalibStats()
        if calib_layer:
            t = time.perf_counter()
            if mesh is not None:  # samples split over the local devices; stats merged exactly
                hidden, s = sharding.forward_sharded(family, layer, params, hidden, dtype, mesh)
                layer_stats.observe(s)
            else:
                new_hidden = []
                for h in hidden:
                    h, s = family.layer_forward(layer, params, h, dtype=dtype)
                    layer_stats.observe(jax.device_get(s))
                    new_hidden.append(h)
                hidden = new_hidden
            jax.block_until_ready(hidden)
            if group is not None:  # max of every amax, sum of token counts, over all processes
                layer_stats = group.allreduce_stats(unit, layer_stats)
            phase["calibrate"] += time.perf_counter() - t
            stats = stats.merge(layer_stats)
        if done:  # resumed: the forward above only advanced the calibration activations
            progress.step(f"{unit} (done)")
            continue
        info = _quantize_and_write(layer, layer_names, params, reader, writer, layout, quantized, groups,
                                   layer_stats, opt, phase, owned=owned, mesh=mesh)
        writer.finish_unit(unit, info)
        layer_reports.append({"layer": layer, **info})
        del params
        progress.step(unit)

    # non-layer tensors (embeddings, final norm, lm_head): never quantized
    if not writer.is_done("non_layer"):
        t = time.perf_counter()
        mine = [n for n in sorted(other_names) if owned is None or n in owned]
        for n in mine:
            writer.add(n, _unquantized(reader, n))
        phase["write"] += time.perf_counter() - t
        writer.finish_unit("non_layer", {"tensors": len(mine)})
    progress.step("non-layer")

    # the report and config files
    manifests = None
    if group is not None:
        manifests = group.gather_manifests(writer)  # None on every process but 0
        if manifests is None:
            writer.close()
            reader.close()
            group.wait_finalized()
            return None
        unit_info = merge_unit_info([m["units"] for m in manifests], writer.unit_order)
    else:
        unit_info = writer.unit_info()
    coverage = coverage_report(stats) if calibrated else {}
    producer = {"name": "modelopt", "version": PRODUCER_VERSION}
    if opt.fmt == "modelopt":
        qcfg, hf_quant = formats.modelopt_configs(exclude, PRODUCER_VERSION)
    else:
        qcfg, hf_quant = formats.compressed_tensors_config(exclude), None
    if not calibrated:
        note = f"calibration-free: input_scale = {opt.input_scale_constant} for every quantized linear"
        for d in (qcfg.get("producer"), (hf_quant or {}).get("producer")):
            if d is not None:
                d["calibration"] = note
    report = {
        "source": str(src),
        "output": str(out),
        "producer": producer,
        "family": layout.family,
        "model_type": layout.model_type,
        "preset": preset,
        "format": opt.fmt,
        "moe_policy": opt.moe_policy,
        "calibration": (
            {"samples": len(samples), "tokens": int(sum(len(s) for s in samples)), "batch_size": opt.batch_size}
            if calibrated else {"input_scale_constant": opt.input_scale_constant}),
        "layers": len(layer_ids),
        "linears_total": len(all_linear),
        "linears_quantized": len(quantized),
        "linears_excluded": len(all_linear) - len(quantized),
        "excluded_k_not_multiple_of_16": not_multiple_16,
        "excluded_with_their_fused_group": dropped_with_group,
        "exclude_modules": exclude,
        "zero_weight_amax_modules": sorted(m for u in unit_info.values() for m in u.get("zero_weight_amax", [])),
        "moe_coverage": coverage,
        "calibration_stats": stats.to_json() if calibrated else None,
        "experts_without_tokens": {k: v["experts_without_tokens"] for k, v in coverage.items()},
        "time_s": {**{k: round(v, 3) for k, v in phase.items()}},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "resumed": bool(opt.resume),
    }
    if group is not None:
        report["processes"] = group.num_processes
    t = time.perf_counter()
    config_out = dict(config)
    config_out["quantization_config"] = qcfg
    if group is None:
        writer.finalize(config_out, hf_quant, reader.extra_files(), report)
    else:
        writer.finalize(config_out, hf_quant, reader.extra_files(), report, manifests=manifests, units=unit_info)
    phase["write"] += time.perf_counter() - t
    report["time_s"] = {**{k: round(v, 3) for k, v in phase.items()},
                        "total": round(time.perf_counter() - t_start, 3)}
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    (Path(out) / "nvfp4_report.json").write_text(json.dumps(report, indent=2))
    reader.close()
    if group is not None:
        group.announce_finalized()
    return report


def _unquantized(reader: CheckpointReader, name: str):
    """A tensor that stays unquantized: plain tensors keep their source bytes and dtype; FP8/INT4
    sources are written back as bf16 (SPEC section 6)."""
    info = reader.info(name)
    if info.encoding == "plain":
        return np.asarray(reader.read_raw(info.parts["weight"]))
    return np.asarray(reader.get(name, jnp.bfloat16))


def _quantize_and_write(layer, layer_names, params, reader, writer, layout, quantized, groups,
                        layer_stats: CalibStats, opt: ConvertOptions, phase, owned=None, mesh=None) -> dict:
    """Quantize the layer's linears and hand every tensor of the layer to the writer, in sorted
    name order; with ``owned`` (a multi-process run) only the tensors named in it."""
    t0 = time.perf_counter()
    mods = sorted({n[: -len(".weight")] for n in layer_names if n.endswith(".weight")} & quantized)
    layer_groups = [g for g in groups if g[0] in mods]
    # input amax: constant, or calibrated (MoE back-fill), then unified over fused groups
    if opt.input_scale_constant is not None:
        in_amax = {m: constant_input_amax(opt.input_scale_constant) for m in mods}
    else:
        in_amax = dict(layer_stats.input_amax)
        try:
            in_amax.update(expert_input_amax(layer_stats, opt.moe_policy))
        except CalibrationError as e:
            raise ConversionError(str(e)) from None
        missing = [m for m in mods if m not in in_amax]
        if missing:
            raise ConversionError(f"layer {layer}: calibration recorded no input amax for {missing[:5]}")
        in_amax = {m: in_amax[m] for m in mods}
    in_amax = unify_groups(in_amax, layer_groups)
    if owned is not None:  # fused groups are owned whole (assign_owners), so unification is complete
        mods = [m for m in mods if f"{m}.weight" in owned]
        layer_groups = [g for g in layer_groups if g[0] in mods]
    # weight amax: lazily from the weight (SPEC section 5), unified over fused groups
    w_amax = {m: float(numerics.tensor_amax(params[f"{m}.weight"])) for m in mods}
    zero_amax = sorted(m for m, a in w_amax.items() if a == 0.0)
    w_amax = unify_groups(w_amax, layer_groups)

    # quantize same-shaped weights together: one jitted call per shape and chunk
    by_shape: dict[tuple, list[str]] = {}
    for m in mods:
        by_shape.setdefault(tuple(params[f"{m}.weight"].shape), []).append(m)
    results: dict[str, numerics.NVFP4Tensor] = {}
    for shape, ms in by_shape.items():
        for i in range(0, len(ms), _EXPERT_CHUNK):
            chunk = ms[i:i + _EXPERT_CHUNK]
            amax = jnp.asarray([w_amax[m] for m in chunk], jnp.float32)
            try:
                if mesh is not None:  # stacked (expert) axis split over the local devices
                    q = sharding.quantize_sharded([params[f"{m}.weight"] for m in chunk], amax, mesh)
                else:
                    q = numerics.quantize(jnp.stack([params[f"{m}.weight"] for m in chunk]), amax)
            except (ValueError, TypeError) as e:
                bad = [m for m in chunk if not bool(jnp.all(jnp.isfinite(params[f"{m}.weight"].astype(jnp.float32))))]
                raise ConversionError(f"cannot quantize {bad[0] if bad else chunk[0]}.weight: {e}") from None
            q = jax.device_get(q)
            for j, m in enumerate(chunk):
                results[m] = numerics.NVFP4Tensor(q.weight[j], q.weight_scale[j], q.weight_scale_2[j])
    in_scale = {m: np.asarray(numerics.scale_from_amax(in_amax[m]), np.float32) for m in mods}
    t1 = time.perf_counter()
    phase["quantize"] += t1 - t0

    for n in sorted(layer_names):
        if owned is not None and n not in owned:
            continue
        mod = n[: -len(".weight")] if n.endswith(".weight") else None
        if mod in results:
            r = results[mod]
            writer.add(f"{mod}.weight", np.asarray(r.weight))
            writer.add(f"{mod}.weight_scale", np.asarray(r.weight_scale))
            writer.add(f"{mod}.weight_scale_2", np.asarray(r.weight_scale_2, np.float32).reshape(()))
            writer.add(f"{mod}.input_scale", in_scale[mod].reshape(()))
        else:
            writer.add(n, _unquantized(reader, n))
    phase["write"] += time.perf_counter() - t1
    ex = layer_stats.experts
    tensors = len(layer_names) if owned is None else sum(n in owned for n in layer_names)
    info = {"quantized": len(mods), "tensors": tensors, "zero_weight_amax": zero_amax}
    if ex:
        (prefix, e), = ex.items()
        info["experts_without_tokens"] = int((e.tokens_per_expert == 0).sum())
    return info


# -- the output plan: every tensor handed to the writer, known before any is computed --------


def _unquantized_spec(reader: CheckpointReader, name: str) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype, shape) that :func:`_unquantized` gives ``name``."""
    info = reader.info(name)
    if info.encoding == "plain":
        e = reader.entry(info.parts["weight"])
        return e.dtype, tuple(e.shape)
    return "BF16", tuple(info.shape)


def _specs(name: str, dtype: str, shape: tuple, fmt: str) -> list[tuple]:
    """One added tensor as the writer stores it (formats.to_compressed_tensors renames and turns
    the tensor scales into [1]-shaped inverses)."""
    from nvfp4_jax.checkpoint.safetensors_io import DTYPES

    if fmt == "compressed-tensors":
        mod, _, param = name.rpartition(".")
        if param == "weight" and dtype == "U8":
            name = f"{mod}.weight_packed"
        elif param in ("weight_scale_2", "input_scale"):
            name, shape = f"{mod}.{'weight' if param == 'weight_scale_2' else 'input'}_global_scale", (1,)
    nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
    return [(name, dtype, tuple(shape), nbytes)]


def output_plan(reader: CheckpointReader, layer_ids, other_names, quantized, fmt: str) -> list:
    """Every tensor :func:`convert` hands to the writer, before any is computed:
    ``[(unit, [(source name, [(name, dtype, shape, nbytes), ...]), ...]), ...]`` in add order
    (units layer by layer, then ``non_layer``; names sorted within a unit; a quantized linear's
    ``.weight`` expands to weight, weight_scale, weight_scale_2, input_scale)."""
    plan = []
    by_layer: dict[int, list[str]] = {}
    for n in reader.names():
        layer = _layer_of(n)
        if layer is not None:
            by_layer.setdefault(layer, []).append(n)
    for unit, unit_names in [(f"layer.{i}", by_layer.get(i, [])) for i in layer_ids] + [("non_layer", list(other_names))]:
        items = []
        for n in sorted(unit_names):
            mod = n[: -len(".weight")] if n.endswith(".weight") else None
            if mod in quantized:
                shape = tuple(reader.info(n).shape)
                k = shape[-1]
                specs = (_specs(f"{mod}.weight", "U8", shape[:-1] + (k // 2,), fmt)
                         + _specs(f"{mod}.weight_scale", "F8_E4M3", shape[:-1] + (k // numerics.BLOCK,), fmt)
                         + _specs(f"{mod}.weight_scale_2", "F32", (), fmt)
                         + _specs(f"{mod}.input_scale", "F32", (), fmt))
            else:
                specs = _specs(n, *_unquantized_spec(reader, n), fmt)
            items.append((n, specs))
        plan.append((unit, items))
    return plan


def plan_units(plan) -> list:
    """``output_plan(...)`` as the writer's units: ``[(unit, [(name, dtype, shape, nbytes), ...]), ...]``."""
    return [(unit, [spec for _, specs in items for spec in specs]) for unit, items in plan]


def assign_owners(plan, groups, num_processes: int) -> dict[str, int]:
    """Which process quantizes and writes each source tensor of ``plan``: the members of a fused
    group go together (their shared amax needs every member's weight), and work items are dealt
    largest first to the least loaded process (loads carried over from unit to unit), so every
    process gets about the same number of bytes in every layer. Deterministic."""
    group_of = {f"{m}.weight": tuple(f"{x}.weight" for x in g) for g in groups for m in g}
    loads = [0] * num_processes
    owner: dict[str, int] = {}
    for _, items in plan:
        cost = {n: sum(s[3] for s in specs) for n, specs in items}
        work, seen = [], set()
        for n, _ in items:
            if n in seen:
                continue
            members = tuple(m for m in group_of.get(n, (n,)) if m in cost)
            seen.update(members)
            work.append((sum(cost[m] for m in members), members))
        for c, members in sorted(work, key=lambda w: (-w[0], w[1])):
            p = min(range(num_processes), key=lambda i: (loads[i], i))
            loads[p] += c
            for m in members:
                owner[m] = p
    return owner


def merge_unit_info(per_process: Sequence[dict], unit_order: Sequence[str]) -> dict[str, dict]:
    """The unit info of a multi-process run, from every process's share: counts summed, module
    lists joined, the rest (the same on every process) taken once."""
    out: dict[str, dict] = {}
    for unit in unit_order:
        merged: dict = {}
        for units in per_process:
            for k, v in units.get(unit, {}).items():
                if k in ("quantized", "tensors"):
                    merged[k] = merged.get(k, 0) + v
                elif isinstance(v, list):
                    merged[k] = sorted(set(merged.get(k, [])) | set(v))
                else:
                    merged.setdefault(k, v)
        out[unit] = merged
    return out


__all__ = ["ConvertOptions", "ConversionError", "convert", "PRODUCER_VERSION", "output_plan", "assign_owners"]
