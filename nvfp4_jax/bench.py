"""Benchmarks behind ``nvfp4-jax bench`` (figures go to BENCHMARKS.md as ratios, never into tests).

``bench quantize``: NVFP4 quantization throughput of the JAX path on the default JAX device, the
torch_bridge reference on the same host (CUDA when available), and a copy baseline in the same
process: a jitted kernel that reads the same bf16 input and writes an output of the quantized size.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import numerics

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


def bench_convert(layers=(1, 2, 4), experts: int = 8, workdir=None) -> list[dict]:
    """Convert kimi-k2-shaped checkpoints of L layers, each in a fresh process (so peak RSS is per
    run), and time ``cp -r`` of the same source files in the same command."""
    import tempfile

    work = Path(workdir or tempfile.mkdtemp(prefix="nvfp4-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}  workdir {work}")
    rows = []
    for nl in layers:
        src, out, cp_dst = work / f"src-L{nl}", work / f"out-L{nl}", work / f"cp-L{nl}"
        if not (src / "config.json").exists():
            from nvfp4_jax.examples import build_kimi_k2_shaped

            build_kimi_k2_shaped(src, layers=nl, experts=experts)
        src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        shutil.rmtree(cp_dst, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(cp_dst)], check=True)
        subprocess.run(["sync"], check=False)
        t_cp = time.perf_counter() - t
        shutil.rmtree(cp_dst, ignore_errors=True)
        code = (
            "import json,sys\n"
            "from nvfp4_jax.examples import calibration_samples\n"
            "from nvfp4_jax.pipeline import ConvertOptions, convert\n"
            f"tok=calibration_samples('{src}/tokenizer.json', 8, 64)\n"
            f"r=convert('{src}', '{out}', ConvertOptions(calib_tokens=tok, overwrite=True, progress=False), log=lambda m: None)\n"
            "print('REPORT'+json.dumps(r))\n")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t
        report = json.loads(p.stdout.split("REPORT", 1)[1])
        row = {"layers": nl, "experts": experts, "source_GB": src_bytes / 1e9, "wall_s": wall,
               "phases_s": report["time_s"], "peak_rss_MB": report["peak_rss_mb"], "cp_s": t_cp,
               "source_GBps": src_bytes / 1e9 / wall, "wall_over_cp": wall / t_cp}
        rows.append(row)
        print(f"L={nl} E={experts} src {row['source_GB']:.2f} GB  wall {wall:7.2f}s  "
              f"({row['source_GBps']:.3f} GB/s)  cp {t_cp:6.2f}s  ratio {row['wall_over_cp']:.1f}x  "
              f"peak RSS {row['peak_rss_MB']:.0f} MB  phases {report['time_s']}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
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
