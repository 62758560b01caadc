"""convert(): source HF checkpoint -> ModelOpt NVFP4 checkpoint, layer by layer (ARCHITECTURE.md).

The plan (:mod:`nvfp4_jax.plan`) fixes every output tensor first. Then for each decoder layer:
read its tensors (decoded to bf16), push the calibration hidden states through it (recording the
input amax of every linear, per expert for MoE), quantize its linears, hand its tensors to the
writer, free it. Memory is one layer plus the calibration activations. A coordinator
(:mod:`nvfp4_jax.coordinator`) says which batches and tensors are this process's and merges the
statistics, so one process and many run the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import (__version__, calib_data, compile_cache, expert_parallel, fingerprint, guards, interrupts,
                       numerics, resources, sharding, weight_scales)
from nvfp4_jax.output_lock import output_lock
from nvfp4_jax.overlap import LAYERS_IN_FLIGHT, WriteBehind, read_ahead
from nvfp4_jax.finite import check_finite
from nvfp4_jax.layer_quant import ERROR_ROW_STRIDE, LayerWeights, WeightStack, input_scales, quantize_layer
from nvfp4_jax.models.moe import PROJECTIONS, LayerTensors
from nvfp4_jax.progress import Progress
from nvfp4_jax.calibration import (
    CalibrationError, CalibStats, LayerHessians, MOE_POLICIES, calibrate_layer, collect_hessians,
    constant_input_amax, coverage_report, expert_input_amax, room_for_expert_stacks, unify_groups,
)
from nvfp4_jax.checkpoint.formats import output_config
from nvfp4_jax.checkpoint.reader import CheckpointReader
from nvfp4_jax.checkpoint.safetensors_io import DTYPES
from nvfp4_jax.checkpoint.writer import PlannedWriter, WriterOptions
from nvfp4_jax.coordinator import Coordinator, LocalCoordinator
from nvfp4_jax.errors import NVFP4Error, UsageError
from nvfp4_jax.plan import ConversionPlan, UnitPlan, build_plan

PRODUCER_VERSION = f"nvfp4_jax-{__version__}"
_PHASES = ("read", "calibrate", "quantize", "write")


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
    inputs: tuple = ()  # other files the run reads (the calibration file): OUT may not overlap them
    weight_scales: str = "max"  # block-scale rule: max | mse | four-over-six | local-hessian (SPEC section 10)
    overlap: bool = True  # read layer L+1 and write layer L-1 while layer L computes (nvfp4_jax.overlap)
    # auto: MoE layers' routed experts split over the devices for the calibration forward (same bytes)
    expert_parallel: str = expert_parallel.DEFAULT_MODE


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Timer:
    """Seconds spent per phase of the run: ``with timer("read"): ...``."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(_PHASES, 0.0)
        self._lock = threading.Lock()  # read-ahead and write-behind threads time their phases too

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[phase] += time.perf_counter() - t

    def rounded(self, with_total: bool = False) -> dict:
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        if with_total:
            out["total"] = round(time.perf_counter() - self.start, 3)
        return out


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


class ConversionError(NVFP4Error, RuntimeError):
    """The conversion cannot proceed; the message names the tensor or layer."""


@dataclasses.dataclass
class _Run:
    """The state one conversion shares between its steps."""

    src: object
    out: object
    opt: ConvertOptions
    reader: CheckpointReader
    plan: ConversionPlan
    coordinator: Coordinator
    samples: list
    writer: Optional[PlannedWriter] = None
    timer: _Timer = dataclasses.field(default_factory=_Timer)
    owned: frozenset = frozenset()  # source tensors this process quantizes and writes
    resumed_units: set = dataclasses.field(default_factory=set)  # finished by the interrupted run
    family: object = None  # the model family; None for a calibration-free run
    mesh: object = None  # all local devices: calibration samples and stacked experts split over them
    expert_mesh: object = None  # --expert-parallel: MoE layers' routed experts split over these devices
    expert_parallel_layers: list = dataclasses.field(default_factory=list)  # the layers that ran so
    monitor: resources.ResourceMonitor = dataclasses.field(default_factory=resources.ResourceMonitor)
    resources: list = dataclasses.field(default_factory=list)  # every process's ResourceMonitor.report()
    replicated_blocks: list = dataclasses.field(default_factory=list)  # across processes: per hidden entry
    foreign: frozenset = frozenset()  # across processes: routed experts held (and read) by other processes

    @property
    def dtype(self):
        return jnp.dtype(self.opt.compute_dtype)


def convert(src, out, options: Optional[ConvertOptions] = None,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr), *,
            coordinator: Optional[Coordinator] = None) -> Optional[dict]:
    """Convert the HF checkpoint ``src`` into a ModelOpt NVFP4 checkpoint at ``out``; returns the
    run report (also written to ``out/nvfp4_report.json``).

    coordinator: the processes of the run (default: this one alone); with a
    :class:`nvfp4_jax.distributed.ProcessGroup` this is one process of a multi-process run, which
    returns the report on process 0 and None on the others.
    """
    opt = options or ConvertOptions()
    _check_options(opt)
    guards.check_output_path(out, [src, *opt.inputs])
    coordinator = coordinator or LocalCoordinator()
    if opt.weight_scales == "local-hessian" and coordinator.num_processes > 1:
        raise UsageError("--weight-scales local-hessian runs in one process only (its input statistics are "
                         "not exchanged between processes)")
    with contextlib.ExitStack() as cleanup:
        if coordinator.process_id == 0:  # one run at a time into OUT (nvfp4_jax.output_lock)
            cleanup.enter_context(output_lock(out, log))
        monitor = resources.ResourceMonitor()  # bytes read are counted from here
        reader = CheckpointReader(src)  # validates every file before anything is written
        cleanup.callback(reader.close)
        samples = _calibration_samples(opt, reader.config)
        run = _Run(src, out, opt, reader, build_plan(reader, opt), coordinator, samples, monitor=monitor)
        run.family = _family(reader.config) if samples else None
        settings = fingerprint.run_fingerprint(reader, samples, run.plan.settings)
        run.writer = cleanup.enter_context(coordinator.open_writer(
            out, run.plan, _writer_options(opt, run.plan, settings), fingerprint.digest(settings)))
        log(_start_line(run))
        if opt.resume and not run.writer.resumed:
            log(f"--resume: no interrupted run in {Path(out).name}.partial to continue; starting a new conversion")
        run.mesh = sharding.device_mesh() if len(jax.local_devices()) > 1 else None
        _set_expert_mesh(run)
        run.owned = coordinator.owned(run.plan, _pinned_owners(run))
        stats = _convert_units(run, _embed(run))
        run.monitor.sample()
        # every process's figures, before the finalizing process writes the report
        figures = run.monitor.report()
        if figures["bytes_read"] is not None:  # beside the OS's count, the reader's own
            figures["bytes_read"]["reader"] = reader.bytes_read
        run.resources = coordinator.gather_json("resources", figures)
        interrupts.raise_pending()  # a signal whose exception a library swallowed: OUT is not made final
        return coordinator.finish(run.writer, lambda units, manifests: _write_outputs(run, stats, units, manifests))


def _set_expert_mesh(run: _Run) -> None:
    """--expert-parallel auto with several devices (of this process, or of all processes of a
    calibrated multi-process run): the mesh MoE layers' routed experts are split over."""
    if run.opt.expert_parallel == "off" or run.family is None or run.opt.weight_scales == "local-hessian":
        return
    if run.coordinator.num_processes > 1:
        if run.opt.expert_parallel != "processes":
            return  # auto: one process's devices only
        if any(run.family.is_moe_layer(layer) for layer in range(run.family.num_layers())):
            run.expert_mesh = expert_parallel.expert_mesh(jax.devices())
    elif run.mesh is not None:
        run.expert_mesh = expert_parallel.expert_mesh(jax.local_devices())


def _across_processes(run: _Run) -> bool:
    """The expert mesh spans processes: every process runs every batch's collective programs."""
    return expert_parallel.spans_processes(run.expert_mesh)


def _pinned_owners(run: _Run) -> Optional[dict]:
    """Across processes, each routed expert tensor is quantized and written by the process whose
    device holds it (it is the only process that reads it)."""
    if not _across_processes(run):
        return None
    pinned = {}
    for unit in run.plan.units:
        if _expert_parallel(run, unit):
            pinned.update(expert_parallel.expert_owners(run.family, unit.layer, unit.source_names(), run.expert_mesh))
    run.foreign = frozenset(n for n, p in pinned.items() if p != run.coordinator.process_id)
    return pinned


def _check_options(opt: ConvertOptions) -> None:
    calib_data.check_one_source(calib_tokens=opt.calib_tokens, input_scale_constant=opt.input_scale_constant)
    calib_data.check_sizes(opt.num_samples, opt.seq_len, opt.batch_size)
    if opt.weight_scales not in weight_scales.MODES:
        raise UsageError(f"unknown --weight-scales {opt.weight_scales!r}; choose one of {weight_scales.MODES}")
    if opt.weight_scales == "local-hessian" and opt.input_scale_constant is not None:
        raise UsageError("--weight-scales local-hessian needs calibration data (the second moments of the "
                         "linears' inputs); it cannot run with --input-scale-constant")
    if opt.expert_parallel not in expert_parallel.MODES:
        raise UsageError(f"unknown --expert-parallel {opt.expert_parallel!r}; choose one of {expert_parallel.MODES}")
    if opt.moe_policy not in MOE_POLICIES:
        raise UsageError(f"unknown --moe-policy {opt.moe_policy!r}; choose one of {MOE_POLICIES}")
    if opt.input_scale_constant is None and not opt.calib_tokens:
        raise UsageError("no calibration data: pass calibration text/tokens, or --input-scale-constant "
                         "1.0 for a calibration-free run (SPEC section 3)")
    if opt.input_scale_constant is not None and not (opt.input_scale_constant > 0
                                                      and np.isfinite(opt.input_scale_constant)):
        raise UsageError(f"--input-scale-constant must be finite and > 0, got {opt.input_scale_constant}")
    jnp.dtype(opt.compute_dtype)


def _calibration_samples(opt: ConvertOptions, config: dict) -> list[list[int]]:
    """The calibration token lists after --num-samples/--seq-len (empty for a calibration-free run)."""
    if opt.input_scale_constant is not None:
        return []
    vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size", 0))
    calib_data.check_token_ids(opt.calib_tokens, vocab or None, where="calibration tokens")
    samples = [[int(t) for t in s] for s in opt.calib_tokens]
    if opt.num_samples:
        samples = samples[:opt.num_samples]
    if opt.seq_len:
        samples = [s[:opt.seq_len] for s in samples]
    return samples


def _family(config: dict):
    from nvfp4_jax.models import get_family

    return get_family(config)


def _writer_options(opt: ConvertOptions, plan: ConversionPlan, settings) -> WriterOptions:
    """settings: the run fingerprint (source, calibration tokens, output-changing options)."""
    return WriterOptions(shard_size=opt.shard_size, fmt=plan.fmt.name, resume=opt.resume, overwrite=opt.overwrite,
                         settings=settings)


def _start_line(run: _Run) -> str:
    p, opt = run.plan, run.opt
    calib = (f"calibration {len(run.samples)} samples" if run.samples
             else f"input_scale constant {opt.input_scale_constant}")
    return (f"nvfp4-jax convert: {run.src} -> {run.out}  ({p.family}/{p.model_type}, {len(p.layer_ids)} layers, "
            f"preset {p.preset}, {len(p.quantized)} of {len(p.all_linear)} linears quantized, {calib})")


def _embed(run: _Run) -> list:
    """The embedded calibration batches of this process (none for a calibration-free run)."""
    if run.family is None:
        return []
    with run.timer("read"):
        embed_params = run.reader.get_many(run.family.embed_param_names(run.reader.names()), run.dtype)
        check_finite(embed_params)
    if _across_processes(run):
        return _embed_across_processes(run, embed_params)
    with run.timer("calibrate"):
        batches = run.coordinator.batches(_batches(run.samples, run.opt.batch_size))
        hidden = [run.family.embed(embed_params, jnp.asarray(b)) for b in batches]
        if run.mesh is not None:  # every local device gets a one-device batch worth of rows
            hidden = sharding.regroup_batches(hidden, run.opt.batch_size * run.mesh.size)
    return hidden


@dataclasses.dataclass
class _LoadedUnit:
    """What the read-ahead thread prepared for a unit: whether an interrupted run finished it, its
    sampled source CRC, and its tensors (None where the unit needs none: non-layer units, finished
    uncalibrated layers)."""

    done: bool
    source_crc: str
    params: Optional[dict]


def _load_unit(run: _Run, unit: UnitPlan) -> _LoadedUnit:
    done = run.writer.is_done(unit.name)  # only an interrupted run's units are done before their turn
    source_crc = _check_same_source(run, unit, done)
    needed = unit.layer is not None and (not done or _calibrates(run, unit))
    return _LoadedUnit(done, source_crc, _read_layer(run, unit) if needed else None)


def _calibrates(run: _Run, unit: UnitPlan) -> bool:
    return run.family is not None and unit.layer < run.plan.num_layers  # MTP layers: not calibrated


def _embed_across_processes(run: _Run, embed_params) -> list:
    """The calibration rows of this process when the expert mesh spans processes: every batch is
    regrouped into global batches of batch_size rows per device of the run; this process keeps its
    block of each (the rows of its devices) and, in full, rows past the last multiple of the device
    count (replicated on every process, counted once; ``run.replicated_blocks``)."""
    d, n, p = run.expert_mesh.size, run.coordinator.num_processes, run.coordinator.process_id
    with run.timer("calibrate"):
        tokens = [jnp.asarray(b) for b in _batches(run.samples, run.opt.batch_size)]
        hidden, run.replicated_blocks = [], []
        for g in sharding.regroup_batches(tokens, run.opt.batch_size * d):
            main = g.shape[0] // d * d
            if main:
                share = main // n
                hidden.append(run.family.embed(embed_params, g[p * share:(p + 1) * share]))
                run.replicated_blocks.append(False)
            if main < g.shape[0]:
                hidden.append(run.family.embed(embed_params, g[main:]))
                run.replicated_blocks.append(True)
    return hidden


def _calibrate_across_processes(run: _Run, layer: int, params: dict, hidden: list) -> tuple[list, CalibStats]:
    """One layer over this process's calibration rows when the expert mesh spans processes: MoE
    layers through the collective expert-parallel programs, dense layers locally; this process's
    share of the statistics (replicated rows counted by process 0 only)."""
    blocks = list(zip(hidden, run.replicated_blocks))
    stats = CalibStats()
    if run.family.is_moe_layer(layer):
        across = expert_parallel.Across(run.expert_mesh, lambda: run.coordinator.barrier(f"experts/layer.{layer}"))
        try:
            outs, merged = expert_parallel.forward_across_processes(run.family, layer, params, blocks, run.dtype,
                                                                    across)
        except jax.errors.JaxRuntimeError as e:  # raises the lost or failed peer's error when that is the cause
            run.coordinator.explain_failure(e, f"the collectives of layer {layer}")
            raise
        if merged is not None:
            stats.observe(merged)
        jax.block_until_ready(outs)
        return outs, stats
    outs = []
    for h, replicated in blocks:
        if run.mesh is not None and not replicated:
            (out,), s = sharding.forward_sharded(run.family, layer, params, [h], run.dtype, run.mesh)
        else:
            out, s = run.family.layer_forward(layer, params, h, dtype=run.dtype)
            s = jax.device_get(s)
        if not replicated or run.coordinator.process_id == 0:
            stats.observe(s)
        outs.append(out)
    jax.block_until_ready(outs)
    return outs, stats


def _convert_units(run: _Run, hidden: list) -> CalibStats:
    """Calibrate, quantize and write every layer, then the non-layer tensors; the run's statistics.
    With ``overlap``, the next unit is read and the previous one written meanwhile (at most
    LAYERS_IN_FLIGHT layers on the host), in the serial order (nvfp4_jax.overlap)."""
    stats = CalibStats()
    with Progress(len(run.plan.units), run.opt.progress) as progress, WriteBehind(enabled=run.opt.overlap) as writes:
        for unit, loaded in read_ahead(run.plan.units, lambda u: _load_unit(run, u), enabled=run.opt.overlap):
            stats = _convert_unit(run, unit, loaded, hidden, stats, writes)
            interrupts.raise_pending()
            loaded = None  # noqa: F841 - the layer's tensors are freed before the next one is taken
            progress.step(f"{unit.name} (done)" if unit.name in run.resumed_units else unit.name)
    return stats


def _convert_unit(run: _Run, unit: UnitPlan, loaded: _LoadedUnit, hidden: list, stats: CalibStats,
                  writes: WriteBehind) -> CalibStats:
    """One unit: a layer (calibrate, quantize, then its writes handed to ``writes``) or the non-layer
    tensors. ``hidden`` is advanced in place for the next layer; the run's statistics with this
    layer's merged in."""
    done, source_crc, params = loaded.done, loaded.source_crc, loaded.params
    loaded.params = None
    if done:
        run.resumed_units.add(unit.name)
    if unit.layer is None:  # embeddings, final norm, lm_head: never quantized
        if not done:
            writes.submit(lambda: _write_unquantized(run, unit, source_crc))
        return stats
    calibrate = _calibrates(run, unit)
    if done and not calibrate:
        return stats
    layer_stats = CalibStats()
    layer_input = list(hidden)  # local-hessian's second pass runs over the same input
    if calibrate:
        with run.timer("calibrate"):
            if _across_processes(run):
                hidden[:], layer_stats = _calibrate_across_processes(run, unit.layer, params, hidden)
            else:
                hidden[:], layer_stats = calibrate_layer(
                    run.family, unit.layer, params, hidden, dtype=run.dtype,
                    mesh=run.expert_mesh if _expert_parallel(run, unit) else run.mesh)
            run.monitor.sample()  # the layer and its activations are live here
        if run.coordinator.num_processes > 1:
            # the previous layer is durable before this process waits on the others: a process
            # killed or stopped at the exchange keeps every layer it got past
            writes.wait()
        with run.timer("calibrate"):
            layer_stats = run.coordinator.allreduce_stats(unit.name, layer_stats)
        stats = stats.merge(layer_stats)
    if not done:  # a resumed unit only advanced the calibration activations
        info, write = _quantize_and_write(run, unit, params, layer_stats, layer_input if calibrate else [])
        del params

        def write_unit():
            write()
            run.writer.finish_unit(unit.name, {**info, "source_sample_crc32": source_crc})

        writes.submit(write_unit)
    return stats


def _check_same_source(run: _Run, unit: UnitPlan, done: bool) -> str:
    """The sampled CRC of the unit's source tensors; for a unit finished by the interrupted run, it
    must be the value that run recorded (the source may not change under a resume)."""
    # across processes: only the tensors this process reads (a resume compares with its own manifest)
    crc = fingerprint.source_sample_crc(run.reader, [n for n in unit.source_names() if n not in run.foreign])
    if done:
        recorded = run.writer.unit_info().get(unit.name, {}).get("source_sample_crc32")
        if recorded != crc:
            raise ConversionError(
                f"cannot resume: the source tensors of {unit.name} in {run.src} are not those the interrupted "
                f"run converted (sampled CRC-32 {recorded} then, {crc} now); start over with --overwrite")
    return crc


def _expert_parallel(run: _Run, unit: UnitPlan) -> bool:
    """Whether the unit's calibration forward runs expert parallel (--expert-parallel, a MoE layer,
    several devices); local-hessian's second forward needs the whole layer on one device."""
    return (run.expert_mesh is not None and run.family is not None and run.opt.weight_scales != "local-hessian"
            and unit.layer is not None and unit.layer < run.plan.num_layers
            and expert_parallel.enabled(run.opt.expert_parallel, run.family, unit.layer, run.expert_mesh.size))


def _read_layer(run: _Run, unit: UnitPlan) -> dict:
    """The layer's tensors: all of them for the calibration forward (routers keep float32 where the
    forward needs it; expert parallel: each routed expert decoded on the device that holds it), else
    only the weights this process quantizes."""
    names = unit.source_names()
    with run.timer("read"):
        if _expert_parallel(run, unit):
            run.expert_parallel_layers.append(unit.layer)
            params = expert_parallel.read_layer(run.family, run.reader, unit.layer, names, run.expert_mesh,
                                                run.dtype)
        elif run.family is not None:
            params = run.family.read_layer(run.reader, unit.layer, dtype=run.dtype, names=names)
        else:
            params = run.reader.get_many([n for n in names if n in run.owned and _module(n) in run.plan.quantized],
                                         run.dtype)
        check_finite(params, f"layer {unit.layer}")  # per expert, so a bad value is named
        if _holds_expert_stacks(run, unit, params):
            params = LayerTensors(params)
            run.family.move_experts_into_stacks(unit.layer, params, run.dtype)
        jax.block_until_ready(params)  # the decode runs here (the read-ahead thread), not in the forward
    return params


def _holds_expert_stacks(run: _Run, unit: UnitPlan, params: dict) -> bool:
    """Whether a MoE layer's routed experts are held as stacks only, from its read to its quantize
    (``moe.LayerTensors``: one copy of the experts, read by the calibration forward and the quantize
    phase, instead of the per-expert arrays plus stacks built for calibration). Only on the
    one-device path (no data-parallel mesh, not expert parallel), for a calibrated layer whose
    routed experts this process quantizes, every one of them (so nothing reads the per-expert
    arrays after the read: not the writer, which writes quantized results only), and where the
    stacks fit the device (``calibration.stacks_fit``); otherwise the layer keeps its per-expert
    arrays and calibration stacks them for its batches alone, as before."""
    if (run.family is None or run.mesh is not None or _expert_parallel(run, unit) or _across_processes(run)
            or not _calibrates(run, unit)):
        return False
    names = run.family.routed_experts(unit.layer, params)
    if names is None:
        return False
    experts = [n for proj in PROJECTIONS for n in names.weight_names(proj)]
    if not all(n in run.owned and _module(n) in run.plan.quantized for n in experts):
        return False
    return room_for_expert_stacks(run.family, unit.layer, params, run.dtype)


def _weights_to_quantize(run: _Run, unit: UnitPlan, params: dict, mods: list) -> LayerWeights:
    """The weights of ``mods``: held expert stacks as :class:`layer_quant.WeightStack` (quantized
    from slices of them), every other weight as its array."""
    stacks = getattr(params, "expert_stacks", None)
    if stacks is None:
        return LayerWeights({m: params[f"{m}.weight"] for m in mods})
    names = run.family.routed_experts(unit.layer, params)
    held = tuple(WeightStack(a, tuple(names.module(e, proj) for e in range(names.num_experts)))
                 for a, proj in zip(stacks, PROJECTIONS))
    stacked = {m for s in held for m in s.modules}
    if not stacked <= set(mods):  # _holds_expert_stacks admits only layers whose experts are all quantized here
        raise ConversionError(f"layer {unit.layer}: routed experts held stacked but not all of them quantized here")
    return LayerWeights({m: params[f"{m}.weight"] for m in mods if m not in stacked}, held)


def _module(name: str) -> Optional[str]:
    return name[: -len(".weight")] if name.endswith(".weight") else None


def _unquantized(reader: CheckpointReader, name: str, decoded=None):
    """A tensor that stays unquantized: plain tensors keep their source bytes and dtype; FP8/INT4
    sources are written back as bf16 (SPEC section 6). Never NaN or Inf (checked here: nothing
    downstream would notice in a tensor that is not quantized). ``decoded``: the copy read for the
    calibration forward, used instead of a second read when it holds the source bytes (a plain
    tensor decoded to its own dtype, or a decoded one in bfloat16)."""
    info = reader.info(name)
    if info.encoding == "plain":
        e = reader.entry(info.parts["weight"])
        if (decoded is not None and np.dtype(decoded.dtype) == np.dtype(DTYPES[e.dtype])
                and tuple(decoded.shape) == tuple(e.shape)):
            a = np.asarray(decoded)
        else:
            a = np.asarray(reader.read_raw(info.parts["weight"]))
    elif decoded is not None and decoded.dtype == jnp.bfloat16:  # reader.get(name, bfloat16) already
        a = np.asarray(decoded)
    else:
        a = np.asarray(reader.get(name, jnp.bfloat16))
    check_finite({name: a})
    return a


def _write_unquantized(run: _Run, unit: UnitPlan, source_crc: str) -> None:
    mine = [n for n in unit.source_names() if n in run.owned]
    with run.timer("write"):
        for n in mine:
            run.writer.add(n, _unquantized(run.reader, n))
    run.writer.finish_unit(unit.name, {"tensors": len(mine), "source_sample_crc32": source_crc})


def _quantize_and_write(run: _Run, unit: UnitPlan, params: dict, layer_stats: CalibStats,
                        layer_input: list) -> tuple[dict, Callable[[], None]]:
    """Quantize this process's linears of the layer: the unit's info for the manifest and report,
    and the job that hands its tensors to the writer in add order (run now or by the write-behind
    thread; it holds the quantized numpy results, not the layer's weights). ``layer_input``: the
    calibration batches that entered the layer (local-hessian's statistics pass; empty for an
    uncalibrated layer)."""
    mods = sorted({_module(n) for n in unit.source_names()} & run.plan.quantized)
    groups = [g for g in run.plan.groups if g[0] in mods]
    with run.timer("quantize"):
        in_amax = unify_groups(_input_amax(run, unit.layer, mods, layer_stats), groups)
        # fused groups are owned whole (ConversionPlan.owners), so the unification above is complete
        mods = [m for m in mods if f"{m}.weight" in run.owned]
        groups = [g for g in groups if g[0] in mods]
        hess = _hessians(run, unit.layer, params, layer_input, in_amax)
        # weight amax: lazily from the weight (SPEC section 5), unified over fused groups, on device
        weights = _weights_to_quantize(run, unit, params, mods)
        if _expert_parallel(run, unit):  # each routed expert on the device that holds it (never stacked here)
            quantized = expert_parallel.quantize_on_owner_devices(weights.arrays, groups, run.opt.weight_scales)
        else:
            quantized = quantize_layer(weights, groups, mesh=run.mesh, mode=run.opt.weight_scales,
                                       hessians=None if hess is None else hess.hessian)
        run.monitor.sample()
        results, zero_amax = quantized.tensors, quantized.zero_weight_amax
        in_scale = input_scales({m: in_amax[m] for m in mods})
    mine = [n for n in unit.source_names() if n in run.owned]
    # the copies read for the forward of the tensors written unquantized (not the quantized weights)
    decoded = {n: params[n] for n in mine if _module(n) not in results and n in params}

    def write():
        with run.timer("write"):
            for n in mine:
                if _module(n) in results:
                    _add_quantized(run.writer, _module(n), results[_module(n)], in_scale[_module(n)])
                else:
                    run.writer.add(n, _unquantized(run.reader, n, decoded.get(n)))
    info = {"quantized": len(mods), "tensors": len(mine), "zero_weight_amax": zero_amax,
            "weight_squared_error": sum(quantized.squared_error.values()),
            "weight_squared_norm": sum(quantized.squared_norm.values())}
    if hess is not None:  # linears searched as mse for want of a statistic (no token, not calibrated)
        info["hessian_mse_fallback"] = sorted(m for m in mods if m not in hess.hessian or m in hess.without_tokens)
    if layer_stats.experts:
        (e,) = layer_stats.experts.values()
        info["experts_without_tokens"] = int((e.tokens_per_expert == 0).sum())
    return info, write


def _hessians(run: _Run, layer: int, params: dict, layer_input: list, in_amax: dict):
    """local-hessian's statistics of the layer (None for the other modes): a second forward over
    the layer's calibration input with the quantized linears' inputs fake-quantized with their
    max-calibrated amax (SPEC section 10.4)."""
    if run.opt.weight_scales != "local-hessian":
        return None
    if not layer_input:
        return LayerHessians({}, [])
    with run.timer("calibrate"):
        return collect_hessians(run.family, layer, params, layer_input,
                                {m: np.float32(a) for m, a in in_amax.items()}, dtype=run.dtype)


def _input_amax(run: _Run, layer: int, mods: list, layer_stats: CalibStats) -> dict[str, float]:
    """Every quantized linear's input amax: the constant, or calibrated (MoE back-fill)."""
    if run.opt.input_scale_constant is not None:
        return {m: constant_input_amax(run.opt.input_scale_constant) for m in mods}
    in_amax = dict(layer_stats.input_amax)
    try:
        in_amax.update(expert_input_amax(layer_stats, run.opt.moe_policy))
    except CalibrationError as e:
        raise ConversionError(str(e)) from None
    missing = [m for m in mods if m not in in_amax]
    if missing:
        raise ConversionError(f"layer {layer}: calibration recorded no input amax for {missing[:5]}")
    bad = [m for m in mods if not np.isfinite(in_amax[m])]
    if bad:
        raise ConversionError(f"layer {layer}: the calibration forward gave a non-finite input amax "
                              f"({in_amax[bad[0]]}) for {bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}: "
                              "the activations overflowed; check the source weights and the compute dtype")
    return {m: in_amax[m] for m in mods}


def _add_quantized(writer: PlannedWriter, mod: str, r: numerics.NVFP4Tensor, input_scale: np.ndarray) -> None:
    writer.add(f"{mod}.weight", np.asarray(r.weight))
    writer.add(f"{mod}.weight_scale", np.asarray(r.weight_scale))
    writer.add(f"{mod}.weight_scale_2", np.asarray(r.weight_scale_2, np.float32).reshape(()))
    writer.add(f"{mod}.input_scale", input_scale.reshape(()))


def _write_outputs(run: _Run, stats: CalibStats, units: dict, manifests: Optional[list]) -> dict:
    """Configs, index and report (the finalizing process); the report."""
    qcfg, hf_quant = run.plan.fmt.configs(list(run.plan.exclude), PRODUCER_VERSION)
    if run.family is None:
        note = f"calibration-free: input_scale = {run.opt.input_scale_constant} for every quantized linear"
        for d in (qcfg.get("producer"), (hf_quant or {}).get("producer")):
            if d is not None:
                d["calibration"] = note
    report = _report(run, stats, units)
    config_out = output_config(run.reader.config, qcfg)
    with run.timer("write"):
        run.writer.finalize(config_out, hf_quant, run.reader.extra_files(), report, manifests=manifests, units=units)
    report["time_s"] = run.timer.rounded(with_total=True)
    report["overlap"] = _overlap_report(run.opt.overlap, report["time_s"])
    report["compile_cache"] = compile_cache.report()
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    (Path(run.out) / "nvfp4_report.json").write_text(json.dumps(report, indent=2))
    return report


def _overlap_report(enabled: bool, time_s: dict) -> dict:
    """Whether phases overlapped, the host-memory bound in layers, and the seconds by which the
    phases' sum exceeds the run's total (the time overlap saved, give or take unphased work)."""
    phase_sum = sum(time_s[p] for p in _PHASES)
    return {"enabled": bool(enabled), "layers_in_flight": LAYERS_IN_FLIGHT if enabled else 1,
            "phase_sum_minus_total_s": round(phase_sum - time_s["total"], 3)}


def _weight_scales_report(mode: str, units: dict) -> dict:
    """The mode, the weights' relative squared reconstruction error over every quantized linear
    (``sum (w - dequant)^2 / sum w^2``, over the rows layer_quant samples), and local-hessian's mse
    fallbacks."""
    err = sum(u.get("weight_squared_error", 0.0) for u in units.values())
    norm = sum(u.get("weight_squared_norm", 0.0) for u in units.values())
    out = {"mode": mode, "relative_squared_error": err / norm if norm > 0 else 0.0,
           "error_rows": f"every {ERROR_ROW_STRIDE}th output row of each linear, scaled to its rows"}
    if mode == "local-hessian":
        fallback = sorted(m for u in units.values() for m in u.get("hessian_mse_fallback", []))
        out["mse_fallback_linears"] = len(fallback)
        out["mse_fallback_modules"] = fallback
    return out


def _report(run: _Run, stats: CalibStats, units: dict) -> dict:
    p, opt, calibrated = run.plan, run.opt, run.family is not None
    coverage = coverage_report(stats) if calibrated else {}
    return {
        "source": str(run.src),
        "output": str(run.out),
        "producer": {"name": "modelopt", "version": PRODUCER_VERSION},
        "family": p.family,
        "model_type": p.model_type,
        "preset": p.preset,
        "format": p.fmt.name,
        "moe_policy": opt.moe_policy,
        "weight_scales": _weight_scales_report(opt.weight_scales, units),
        "calibration": (
            {"samples": len(run.samples), "tokens": int(sum(len(s) for s in run.samples)),
             "batch_size": opt.batch_size}
            if calibrated else {"input_scale_constant": opt.input_scale_constant}),
        "layers": len(p.layer_ids),
        "linears_total": len(p.all_linear),
        "linears_quantized": len(p.quantized),
        "linears_excluded": len(p.all_linear) - len(p.quantized),
        "excluded_k_not_multiple_of_16": list(p.not_multiple_16),
        "excluded_with_their_fused_group": list(p.dropped_with_group),
        "exclude_modules": list(p.exclude),
        "zero_weight_amax_modules": sorted(m for u in units.values() for m in u.get("zero_weight_amax", [])),
        "moe_coverage": coverage,
        "calibration_stats": stats.to_json() if calibrated else None,
        "experts_without_tokens": {k: v["experts_without_tokens"] for k, v in coverage.items()},
        "time_s": run.timer.rounded(),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "resumed": bool(run.writer.resumed),
        "expert_parallel": {"mode": opt.expert_parallel,
                            "devices": run.expert_mesh.size if run.expert_mesh is not None else 1,
                            "layers": sorted(set(run.expert_parallel_layers))},
        "source_tensors": len(run.reader.names()),
        "dropped_tensors": {},  # every source tensor is written, quantized or as it was
        "resources": run.resources,  # per process: bytes read (OS counter), peak RSS, peak device memory
        **run.coordinator.report_fields(),
    }


__all__ = ["ConvertOptions", "ConversionError", "convert", "PRODUCER_VERSION"]
