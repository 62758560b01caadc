"""Benchmarks behind ``nvfp4-jax bench`` (figures go to BENCHMARKS.md as ratios, never into tests).

``bench quantize``: NVFP4 quantization throughput of the JAX path on the default JAX device, the
torch_bridge reference on the same host (CUDA when available), and a copy baseline in the same
process: a jitted kernel that reads the same bf16 input and writes an output of the quantized size.

``bench convert``: whole kimi-k2-shaped conversions against ``cp`` of the same files, the marginal
cost of a MoE layer and a projection for the full Kimi-K2-Thinking (see :func:`bench_convert`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import numerics
from nvfp4_jax.errors import NVFP4Error, UsageError

KIMI_SHAPES = [(2048, 7168), (7168, 2048), (18432, 7168)]


def _time(fn, repeats: int) -> float:
    """Best of ``repeats`` timings of ``fn`` (which must wait for its result). Short calls are
    timed in batches (enough back-to-back calls for about 20 ms, one wait at the end) so that
    launch and host overhead do not dominate on an accelerator."""
    out = fn()  # warm-up / compile
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    once = max(time.perf_counter() - t, 1e-6)
    inner = max(1, min(1000, int(0.02 / once)))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / inner)
    return best


@jax.jit
def _copy_kernel(x):
    """Reads every input byte once and writes N*K/2 bytes (about the quantized size)."""
    u = jax.lax.bitcast_convert_type(x, jnp.uint16)
    u = u.reshape(*u.shape[:-1], u.shape[-1] // 4, 4)
    return u[..., 0] ^ u[..., 1] ^ u[..., 2] ^ u[..., 3]


@jax.jit
def _quantize_kernel(x):
    """The lazy rule: tensor amax from the weight itself (taken from the block maxima, same pass)."""
    return numerics.quantize(x, check=False)


@jax.jit
def _quantize_given_amax_kernel(x, amax):
    """A caller's (group) amax: no pass over the tensor for it."""
    return numerics.quantize(x, amax, check=False)


def _sync(tree):
    return tree  # _time waits for the last result


def machine() -> str:
    dev = jax.devices()[0]
    return f"{platform.node()} {platform.machine()} jax {jax.__version__} {dev.platform}:{dev.device_kind}"


def bench_quantize(repeats: int = 3, torch_ref: bool = True, shapes=None) -> list[dict]:
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in shapes] if shapes else KIMI_SHAPES
    print(f"machine: {machine()}")
    rows = []
    rng = np.random.default_rng(0)
    for n, k in shapes:
        x = jnp.asarray((rng.standard_normal((n, k), dtype=np.float32) * 0.02)).astype(jnp.bfloat16)
        x = jax.device_put(x)
        elems = n * k
        in_bytes = elems * 2
        out_bytes = elems // 2 + elems // 16 + 4
        t_copy = _time(lambda: _sync(_copy_kernel(x)), repeats)
        t_jax = _time(lambda: _sync(_quantize_kernel(x)), repeats)
        amax = jax.block_until_ready(numerics.tensor_amax(x))
        t_jax_amax = _time(lambda: _quantize_given_amax_kernel(x, amax), repeats)
        row = {"shape": f"{n}x{k}", "elements": elems,
               "copy_s": t_copy, "copy_GBps": (in_bytes + elems // 2) / t_copy / 1e9,
               "jax_s": t_jax, "jax_Gelem_s": elems / t_jax / 1e9, "jax_in_GBps": in_bytes / t_jax / 1e9,
               "jax_rw_GBps": (in_bytes + out_bytes) / t_jax / 1e9, "jax_over_copy": t_jax / t_copy,
               "jax_given_amax_s": t_jax_amax, "jax_given_amax_over_copy": t_jax_amax / t_copy,
               "jax_rw_fraction_of_copy": ((in_bytes + out_bytes) / t_jax) / ((in_bytes + elems // 2) / t_copy),
               "jax_given_amax_rw_fraction_of_copy": ((in_bytes + out_bytes) / t_jax_amax) / ((in_bytes + elems // 2) / t_copy)}
        if torch_ref:
            import torch

            from torch_bridge import reference

            dev = "cuda" if torch.cuda.is_available() else "cpu"
            xt = torch.from_numpy(np.array(x.astype(jnp.float32))).to(torch.bfloat16).to(dev)

            def run_torch():
                reference.quantize(xt)
                if dev == "cuda":
                    torch.cuda.synchronize()
                return None

            t_torch = _time(run_torch, repeats)
            row.update({"torch_device": dev, "torch_s": t_torch, "torch_Gelem_s": elems / t_torch / 1e9,
                        "jax_speedup_vs_torch": t_torch / t_jax})
        rows.append(row)
        msg = (f"{row['shape']:>11}  copy {t_copy * 1e3:8.3f} ms ({row['copy_GBps']:6.1f} GB/s r+w)  "
               f"jax {t_jax * 1e3:8.3f} ms ({row['jax_Gelem_s']:6.3f} Gelem/s, {row['jax_in_GBps']:6.2f} GB/s in, "
               f"{row['jax_rw_GBps']:6.2f} GB/s r+w) = {row['jax_over_copy']:.2f}x copy "
               f"({row['jax_rw_fraction_of_copy']:.0%} of copy r+w bandwidth); given amax "
               f"{t_jax_amax * 1e3:8.3f} ms = {row['jax_given_amax_over_copy']:.2f}x copy "
               f"({row['jax_given_amax_rw_fraction_of_copy']:.0%})")
        if torch_ref:
            msg += f"  torch[{row['torch_device']}] {row['torch_s'] * 1e3:8.2f} ms -> jax {row['jax_speedup_vs_torch']:.2f}x faster"
        print(msg, flush=True)
    print(json.dumps(rows, indent=1))
    return rows


# Kimi-K2-Thinking: layers (layer 0 dense, the rest MoE), routed experts per MoE layer, vocabulary
KIMI_K2_THINKING = (61, 384, 163840)


def bench_convert(layers=(1, 2), experts: int = 384, calib=(8, 64), workdir=None, keep: bool = False,
                  compile_cache: str = "off") -> list[dict]:
    """Convert kimi-k2-shaped checkpoints of each L in ``layers`` (layer 0 dense, L - 1 MoE layers
    of ``experts`` experts) with ``calib`` = (samples, tokens per sample) of calibration, each in a
    fresh process (so peak RSS is per run), and measure in the same command the ``cp`` of the same
    files (then ``sync``) and a second read pass (``cat`` to /dev/null: its rate shows whether the
    source sits in the page cache). With several L: the marginal cost of a MoE layer (an L-layer
    run minus the smallest run, per extra layer). Then a projection for the whole Kimi-K2-Thinking.
    Returns the rows printed as JSON: one per run (``kind`` "run"), per marginal and the projection.
    Sources and outputs live in ``workdir`` (default: a new temporary directory) and are removed
    after each run unless ``keep``; a source kept there by an earlier run is reused."""
    if not layers or min(layers) < 1 or experts < 1 or min(calib) < 1:
        raise UsageError(f"bench convert: --layers (got {list(layers)}), --experts (got {experts}), --calib-samples "
                         f"and --calib-seq-len (got {calib[0]}, {calib[1]}) must be >= 1")
    work = Path(workdir or tempfile.mkdtemp(prefix="nvfp4-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}  workdir {work}  experts {experts}  calibration {calib[0]}x{calib[1]} tokens",
          flush=True)
    os.environ[_CACHE_ENV] = str(compile_cache)  # read by each conversion's child process
    if str(compile_cache) != "off":
        _warm_up(work, max(layers), experts, calib)
    runs = []
    for nl in sorted(set(layers)):
        runs.append(_bench_run(work, nl, experts, calib, keep))
        print(_run_line(runs[-1]), flush=True)
    marginals = marginal_rows(runs)
    for m in marginals:
        print(_marginal_line(m), flush=True)
    proj = projection_row(runs, marginals, _kimi_thinking_bytes())
    print(_projection_line(proj), flush=True)
    if workdir is None and not keep:
        shutil.rmtree(work, ignore_errors=True)
    rows = runs + marginals + [proj]
    print(json.dumps(rows, indent=1))
    return rows


WEIGHT_SCALE_SHAPES = ["2048x7168", "7168x2048", "64x2048x7168"]


def bench_weight_scales(mode: str, repeats: int = 3, shapes=None) -> list[dict]:
    """``bench quantize --weight-scales MODE``: ``weight_scales.quantize_with_mode(w, MODE)`` against
    ``max`` on the same bf16 tensors (``[E, N, K]`` shapes: one tensor scale per expert), with the
    squared reconstruction error of each. ``local-hessian`` gets the second moments of random
    inputs with unequal column scales."""
    from nvfp4_jax import weight_scales

    print(f"machine: {machine()}  mode {mode}")
    rng = np.random.default_rng(0)
    rows = []
    for spec in shapes or WEIGHT_SCALE_SHAPES:
        shape = tuple(int(v) for v in spec.lower().split("x"))
        x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(jnp.bfloat16)
        amax = numerics.tensor_amax(x, per_leading=True)
        hessian = None
        if mode == "local-hessian":
            k = shape[-1]
            xs = rng.standard_normal((256, k), dtype=np.float32) * rng.uniform(0.1, 3.0, k).astype(np.float32)
            xs = xs.reshape(256, k // 16, 16)
            hessian = jnp.asarray(np.einsum("tki,tkj->kij", xs, xs) / 256)
        fn_max = jax.jit(lambda w, a: weight_scales.quantize_with_mode(w, "max", a, check=False))
        fn_mode = jax.jit(lambda w, a, h: weight_scales.quantize_with_mode(w, mode, a, h, check=False))
        t_max = _time(lambda: fn_max(x, amax), repeats)
        t_mode = _time(lambda: fn_mode(x, amax, hessian), repeats)
        e_max = float(weight_scales.squared_error(x, fn_max(x, amax)))
        e_mode = float(weight_scales.squared_error(x, fn_mode(x, amax, hessian)))
        row = {"shape": spec, "mode": mode, "max_s": t_max, "mode_s": t_mode, "mode_over_max": t_mode / t_max,
               "sq_error_max": e_max, "sq_error_mode": e_mode, "error_ratio": e_mode / e_max}
        rows.append(row)
        print(f"{spec:>13}  max {t_max * 1e3:9.3f} ms  {mode} {t_mode * 1e3:9.3f} ms = {row['mode_over_max']:6.1f}x max;"
              f"  squared error {mode}/max {row['error_ratio']:.4f}", flush=True)
    print(json.dumps(rows, indent=1))
    return rows


def _warm_up(work: Path, nl: int, experts: int, calib) -> None:
    """An untimed conversion of the largest checkpoint, so that every timed run finds every
    program it compiles in the cache (the MoE programs' shapes follow each layer's routing, so a
    smaller warm-up would leave the extra layers cold; a cold first run would make the marginal
    layer look cheaper than it is, or negative). Its source stays for the timed run; its output
    is removed."""
    row = _bench_run(work, nl, experts, calib, keep=True)
    shutil.rmtree(work / f"out-L{nl}-E{experts}", ignore_errors=True)
    cache = row.get("compile_cache") or {}
    print(f"warm-up (untimed): L={nl} convert {row['wall_s']:.2f} s, compile cache {json.dumps(cache)}", flush=True)


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def _bench_run(work: Path, nl: int, experts: int, calib, keep: bool) -> dict:
    from nvfp4_jax.examples import build_kimi_k2_shaped

    src, out, cp_dst = work / f"src-L{nl}-E{experts}", work / f"out-L{nl}-E{experts}", work / f"cp-L{nl}-E{experts}"
    build_s = None
    if not src.is_dir():  # built aside and renamed: a directory there is complete
        partial = src.with_name(src.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        t = time.perf_counter()
        build_kimi_k2_shaped(partial, layers=nl, experts=experts)
        build_s = time.perf_counter() - t
        partial.rename(src)
    files = sorted(str(p) for p in src.iterdir() if p.is_file())
    src_bytes = sum(Path(f).stat().st_size for f in files)
    shutil.rmtree(cp_dst, ignore_errors=True)
    subprocess.run(["sync"], check=False)  # the build's own writes are not the copy's to flush
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(cp_dst)], check=True)
    subprocess.run(["sync"], check=False)
    cp_s = time.perf_counter() - t
    shutil.rmtree(cp_dst, ignore_errors=True)
    cat_s = _timed(["cat", *files])
    wall, report = _convert_in_child(src, out, calib)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    phases = report["time_s"]
    overlap = report.get("overlap", phases.get("overlap"))
    phase_sum = sum(v for k, v in phases.items() if k not in ("total", "overlap") and isinstance(v, (int, float)))
    gb = src_bytes / 1e9
    return {"kind": "run", "layers": nl, "moe_layers": nl - 1, "experts": experts,
            "calib_samples": calib[0], "calib_seq_len": calib[1], "source_GB": gb,
            "build_s": build_s, "build_GBps": gb / build_s if build_s else None,
            "cp_s": cp_s, "cp_GBps": gb / cp_s, "cat_s": cat_s, "cat_GBps": gb / cat_s,
            "wall_s": wall, "source_GBps": gb / wall, "wall_over_cp": wall / cp_s,
            "phases_s": phases, "phase_sum_s": phase_sum, "overlap": overlap, "peak_rss_MB": report["peak_rss_mb"],
            "compile_cache": report.get("compile_cache"), "baselines": report.get("baselines", {}),
            "phase_over_baseline": baseline_ratios(phases, report.get("baselines", {}))}


def _convert_in_child(src: Path, out: Path, calib) -> tuple[float, dict]:
    """Wall time (interpreter start included, the baselines run after the conversion in the same
    process not) and run report of a conversion in a new process."""
    code = "import sys; from nvfp4_jax.bench import _convert_child; _convert_child(sys.argv[1:])"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, str(src), str(out), str(calib[0]), str(calib[1])],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0 or "REPORT" not in p.stdout:
        tail = " | ".join(p.stderr.strip().splitlines()[-5:])
        raise NVFP4Error(f"bench convert: converting {src} failed (exit {p.returncode}): {tail}")
    report = json.loads(p.stdout.split("REPORT", 1)[1])
    return wall - report.get("baselines_wall_s", 0.0), report


_CACHE_ENV = "NVFP4_BENCH_COMPILE_CACHE"
NO_OVERLAP_ENV = "NVFP4_BENCH_NO_OVERLAP"  # 1: the timed conversions run with --no-overlap (phases alone)


def _convert_child(argv: list[str]) -> None:
    """The conversion of one bench run: ``argv`` = src, out, samples, tokens per sample; the
    compile cache from the bench's --compile-cache (off: every run compiles from scratch). Then,
    in the same process, every baseline of CHILD_BASELINES (the report's ``baselines``)."""
    from nvfp4_jax import compile_cache
    from nvfp4_jax.examples import calibration_samples
    from nvfp4_jax.pipeline import ConvertOptions, convert

    compile_cache.enable(os.environ.get(_CACHE_ENV, "off"))

    src, out, samples, seq_len = argv
    tokens = calibration_samples(src, int(samples), int(seq_len))
    overlap = os.environ.get(NO_OVERLAP_ENV, "") in ("", "0")
    report = convert(src, out, ConvertOptions(calib_tokens=tokens, overwrite=True, progress=False, overlap=overlap),
                     log=lambda m: None)
    t = time.perf_counter()
    report["baselines"] = {name: fn(Path(src), Path(out)) for name, fn in CHILD_BASELINES.items()}
    report["baselines_wall_s"] = time.perf_counter() - t  # not part of the conversion's wall
    print("REPORT" + json.dumps(report))


def _quantized_modules_by_layer(out: Path) -> dict[int, list[str]]:
    """The modules the conversion quantized (those with a weight_scale_2 in ``out``), per layer."""
    import re

    from nvfp4_jax.checkpoint.safetensors_io import scan_checkpoint

    by_layer: dict[int, list[str]] = {}
    for name in scan_checkpoint(out).tensors:
        if name.endswith(".weight_scale_2"):
            m = name[: -len(".weight_scale_2")]
            layer = re.search(r"layers\.(\d+)\.", m)
            by_layer.setdefault(int(layer.group(1)) if layer else -1, []).append(m)
    return {k: sorted(v) for k, v in sorted(by_layer.items())}


def _quantized_weights_per_layer(src: Path, out: Path):
    """(modules, {module: weight}) per layer of the weights the conversion quantized, decoded from
    ``src`` as the conversion reads them (bf16), ready on device."""
    from nvfp4_jax.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(src)
    try:
        for mods in _quantized_modules_by_layer(out).values():
            weights = {m: reader.get(f"{m}.weight", jnp.bfloat16) for m in mods}
            yield mods, jax.block_until_ready(weights)
    finally:
        reader.close()


def quantize_kernels_baseline(src: Path, out: Path) -> dict:
    """The quantize phase's kernels alone, on the weights the conversion quantized: per layer, the
    weights (read untimed), their amax (untimed), then :func:`numerics.quantize` with that amax,
    jitted afresh (one compilation per weight shape and batch size, timed), batched as the phase
    batches lone weights (:func:`layer_quant.fused_batches`, stacked inside the jit where a batch
    has several), until every result is ready."""
    from nvfp4_jax import layer_quant

    jax.clear_caches()  # the conversion's compilations are not the baseline's

    @jax.jit
    def kernel(ws, amax):
        return numerics.quantize(ws[0] if len(ws) == 1 else jnp.stack(ws), amax, check=False)

    seconds, count = 0.0, 0
    for mods, weights in _quantized_weights_per_layer(src, out):
        batches = layer_quant.fused_batches(weights, layer_quant.fused_groups(mods), layer_quant.chunk_bytes())
        chunks = [tuple(weights[m] for (m,) in b) for b in batches]
        amax = [np.asarray(jax.device_get(layer_quant._batch_amax((ws,))))[0] for ws in chunks]  # [G] per batch
        t = time.perf_counter()
        results = [kernel(ws, a if len(ws) > 1 else a[0]) for ws, a in zip(chunks, amax)]
        jax.block_until_ready(results)
        seconds += time.perf_counter() - t
        count += len(mods)
    return {"phase": "quantize", "seconds": seconds, "weights": count,
            "what": "numerics.quantize per batch of the phase, compilation included"}


def quantize_layer_baseline(src: Path, out: Path) -> dict:
    """:func:`layer_quant.quantize_layer` alone (amax, quantize, squared error, the transfer) on the
    same weights and fused groups, compilations included: the phase without the pipeline around
    it (input scales, the read-ahead thread competing for the cores)."""
    from nvfp4_jax import layer_quant
    from nvfp4_jax.checkpoint.layout import get_layout

    layout = get_layout(json.loads((Path(src) / "config.json").read_text()))

    jax.clear_caches()
    seconds, count = 0.0, 0
    for mods, weights in _quantized_weights_per_layer(src, out):
        t = time.perf_counter()
        layer_quant.quantize_layer(weights, layout.fused_groups(mods))  # the groups the conversion uses
        seconds += time.perf_counter() - t
        count += len(mods)
    return {"phase": "quantize", "seconds": seconds, "weights": count,
            "what": "layer_quant.quantize_layer per layer, compilation included"}


#: measurements taken in a bench run's child process after its conversion, on the same files:
#: name -> fn(src, out) -> {"phase": the report phase it is the baseline of, "seconds": ..., ...}
CHILD_BASELINES = {"quantize_kernels": quantize_kernels_baseline, "quantize_layer": quantize_layer_baseline}


def baseline_ratios(phases: dict, baselines: dict) -> dict:
    """Per baseline: its phase's seconds over the baseline's seconds."""
    return {name: phases[b["phase"]] / b["seconds"] for name, b in baselines.items()
            if b.get("seconds") and isinstance(phases.get(b.get("phase")), (int, float))}


def _numeric(d: dict) -> dict:
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def marginal_rows(runs: list[dict]) -> list[dict]:
    """Per extra MoE layer, for every run against the run with the fewest layers: the difference
    of source bytes, wall, ``cp``, ``cat`` and each phase, divided by the extra layers."""
    base = min(runs, key=lambda r: r["layers"])
    out = []
    for r in sorted(runs, key=lambda r: r["layers"]):
        extra = r["layers"] - base["layers"]
        if extra <= 0:
            continue
        per = {k: (r[k] - base[k]) / extra for k in ("source_GB", "wall_s", "cp_s", "cat_s")}
        b_phases, r_phases = _numeric(base["phases_s"]), _numeric(r["phases_s"])
        per["phases_s"] = {k: (r_phases[k] - b_phases[k]) / extra for k in r_phases if k in b_phases}
        out.append({"kind": "marginal", "from_layers": base["layers"], "to_layers": r["layers"],
                    "experts": r["experts"], "per_moe_layer": per,
                    "wall_over_cp": per["wall_s"] / per["cp_s"] if per["cp_s"] > 0 else None,
                    "source_GBps": per["source_GB"] / per["wall_s"] if per["wall_s"] > 0 else None})
    return out


def projection_row(runs: list[dict], marginals: list[dict], full_bytes: int) -> dict:
    """Kimi-K2-Thinking (``full_bytes`` of source) from the measured figures: the smallest run
    plus the rest of the model's bytes at the marginal seconds per byte of the widest marginal
    (so a MoE layer of 384 experts counts 384/E of a measured one, by its bytes, and the real
    vocabulary's embeddings at the same rate); with a single run, that run scaled by bytes (its
    fixed costs scaled too: an overestimate)."""
    base = min(runs, key=lambda r: r["layers"])
    base_bytes = base["source_GB"] * 1e9
    if marginals:
        m = max(marginals, key=lambda m: m["to_layers"])
        per, per_bytes = m["per_moe_layer"], m["per_moe_layer"]["source_GB"] * 1e9
        extra = full_bytes - base_bytes

        def project(at_base: float, marginal: float) -> float:
            return at_base + extra * marginal / per_bytes

        basis = (f"L={base['layers']} run + the other {extra / 1e9:.1f} GB at the marginal s/GB of "
                 f"L={m['from_layers']}->{m['to_layers']}")
        phases = {k: project(v, per["phases_s"][k]) for k, v in _numeric(base["phases_s"]).items()
                  if k in per["phases_s"]}
        wall, cp = project(base["wall_s"], per["wall_s"]), project(base["cp_s"], per["cp_s"])
    else:
        scale = full_bytes / base_bytes
        basis = f"the L={base['layers']} run scaled by bytes x{scale:.1f} (fixed costs scaled too)"
        phases = {k: v * scale for k, v in _numeric(base["phases_s"]).items()}
        wall, cp = base["wall_s"] * scale, base["cp_s"] * scale
    layers, experts, _ = KIMI_K2_THINKING
    if base["experts"] != experts:
        basis += (f"; measured at {base['experts']} experts, not {experts}: per-byte scaling carries that "
                  "layer's fixed costs, a rough upper figure")
    return {"kind": "projection", "model": "Kimi-K2-Thinking", "layers": layers, "moe_layers": layers - 1,
            "experts": experts, "measured_experts": base["experts"], "calib_samples": base["calib_samples"],
            "calib_seq_len": base["calib_seq_len"], "source_GB": full_bytes / 1e9, "wall_s": wall,
            "cp_s": cp, "wall_over_cp": wall / cp if cp > 0 else None, "phases_s": phases, "basis": basis}


def _kimi_thinking_bytes() -> int:
    from nvfp4_jax.examples import kimi_k2_shaped_config, kimi_k2_source_bytes

    return kimi_k2_source_bytes(kimi_k2_shaped_config(*KIMI_K2_THINKING))


def _phases_text(phases: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in _numeric(phases).items())


def _run_line(r: dict) -> str:
    built = f"built in {r['build_s']:.1f} s ({r['build_GBps']:.2f} GB/s)" if r["build_s"] else "reused"
    overlap = "" if r["overlap"] is None else f"  overlap {json.dumps(r['overlap'])}"
    return (f"L={r['layers']} (1 dense + {r['moe_layers']} MoE) E={r['experts']}: source {r['source_GB']:.2f} GB, "
            f"{built}; cp+sync {r['cp_s']:.2f} s ({r['cp_GBps']:.2f} GB/s); read again (cat) {r['cat_s']:.2f} s "
            f"({r['cat_GBps']:.2f} GB/s)\n"
            f"  convert wall {r['wall_s']:.2f} s = {r['wall_over_cp']:.1f}x cp, {r['source_GBps']:.3f} GB/s of source; "
            f"phases (s) {_phases_text(r['phases_s'])}; phase sum {r['phase_sum_s']:.2f} s{overlap}; "
            f"peak RSS {r['peak_rss_MB']:.0f} MB" + _baselines_text(r))


def _baselines_text(r: dict) -> str:
    """``; quantize phase / quantize_kernels 1.3x (14.2 s)`` for each baseline of the run."""
    parts = [f"{b['phase']} phase / {name} {r['phase_over_baseline'][name]:.2f}x ({b['seconds']:.2f} s)"
             for name, b in r.get("baselines", {}).items() if name in r.get("phase_over_baseline", {})]
    return "".join(f"\n  {p}" for p in parts)


def _marginal_line(m: dict) -> str:
    per = m["per_moe_layer"]
    ratio = "n/a" if m["wall_over_cp"] is None else f"{m['wall_over_cp']:.1f}x"
    return (f"per MoE layer of {m['experts']} experts (L={m['from_layers']} -> {m['to_layers']}): "
            f"{per['source_GB']:.2f} GB, wall {per['wall_s']:.2f} s vs cp {per['cp_s']:.2f} s ({ratio}), "
            f"cat {per['cat_s']:.2f} s; phases (s) {_phases_text(per['phases_s'])}")


def _projection_line(p: dict) -> str:
    ratio = "n/a" if p["wall_over_cp"] is None else f"{p['wall_over_cp']:.1f}x"
    return (f"projection, {p['model']} ({p['layers']} layers: 1 dense + {p['moe_layers']} MoE x {p['experts']} experts, "
            f"{p['source_GB']:.1f} GB; calibration {p['calib_samples']}x{p['calib_seq_len']}): convert "
            f"{p['wall_s'] / 60:.1f} min, cp {p['cp_s'] / 60:.1f} min ({ratio}); phases (min) "
            f"{', '.join(f'{k} {v / 60:.1f}' for k, v in p['phases_s'].items())}; basis: {p['basis']}")
