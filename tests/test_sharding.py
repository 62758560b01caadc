"""Multi-device quantization and calibration (nvfp4_jax.sharding) on 8 host-platform CPU devices.

Properties checked, each against the one-device code path (numerics.quantize;
calibration.calibrate_layer without a mesh: family.layer_forward batch by batch):

* quantize_sharded gives the same weight / weight_scale / weight_scale_2 bytes for stacked experts
  of very different magnitudes, an all-zero expert, group amaxes above the own max, M not a
  multiple of 8 and M < 8, from a stacked array or from a list of per-expert arrays; bad input
  raises an error naming the row.
* forward_sharded gives bit-identical hidden states and equal statistics (every input amax, every
  routed expert's amax and token count) for every layer of a tiny Llama and a tiny Kimi-K2, when
  every device gets as many rows as a one-device batch, and also when batches are not a multiple
  of the device count (the remainder runs replicated). The one-device reference batches have the
  shapes the devices run, so both sides run the same per-device program: XLA does not promise
  that a row's result is independent of the batch it is computed in.
* the whole conversion (the CLI in a subprocess) on 8 devices writes the same files as on one
  device. (``python tests/test_sharding.py layer_e2e`` runs the finer one-layer comparison.)

The checks run in a subprocess: the device count is fixed by XLA_FLAGS when jax initializes, and
pytest has already imported jax. Run this file directly (``python tests/test_sharding.py CHECK``)
to see the figures, e.g. ``speed`` for the quantize timing on 8 fake devices vs 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.device_worker import calib_stats_equal, check_results, run_checks, run_device_worker

ROOT = Path(__file__).resolve().parents[1]
N_DEVICES = 8


@pytest.fixture(scope="module")
def worker():
    """All checks in one 8-device subprocess (the tiny Kimi-K2 is built and compiled once)."""
    results = run_device_worker(__file__, "quantize,forward_llama,forward_kimi", N_DEVICES, timeout=1200)
    return check_results(results, N_DEVICES)


def test_quantize_sharded_bytes_match_one_device(worker):
    r = worker("quantize")
    assert r["cases"] and all(r["cases"].values()), r


def test_forward_sharded_llama_matches_one_device(worker):
    r = worker("forward_llama")
    for case in r["cases"]:
        assert case["stats_equal"], case
        assert case["hidden_bytes_equal"], case


def test_forward_sharded_kimi_k2_matches_one_device(worker):
    r = worker("forward_kimi")
    for case in r["cases"]:
        assert case["stats_equal"], case
        assert case["hidden_bytes_equal"], case
    assert any(case["moe_layers"] for case in r["cases"])


def test_convert_on_8_devices_is_byte_identical_to_one_device(tmp_path):
    """The whole pipeline (nvfp4-jax convert) on 8 local devices: calibration samples and stacked
    experts split over the devices; every output file equals the one-device run's."""
    from nvfp4_jax import examples

    src = examples.build_kimi_k2_tiny(tmp_path / "src", seed=7)
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps({"input_ids": examples.calibration_samples(src / "tokenizer.json", 16, 32)}))
    outs = {}
    for n in (1, N_DEVICES):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        out = outs[n] = tmp_path / f"out{n}"
        code = ("import jax, sys; from nvfp4_jax.cli import main; "
                f"assert len(jax.devices()) == {n}; sys.exit(main(sys.argv[1:]))")
        proc = subprocess.run([sys.executable, "-c", code, "convert", str(src), str(out), "--calib-tokens",
                               str(tok), "--batch-size", "2", "--quiet"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(f.name for f in outs[1].iterdir() if f.name != "nvfp4_report.json")
    assert files == sorted(f.name for f in outs[N_DEVICES].iterdir() if f.name != "nvfp4_report.json")
    for f in files:
        assert (outs[1] / f).read_bytes() == (outs[N_DEVICES] / f).read_bytes(), f


# ---------------------------------------------------------------------------------------------
# the worker (runs with 8 CPU devices)


def _worker(checks: str) -> dict:
    import jax

    assert len(jax.devices()) == N_DEVICES, jax.devices()
    return run_checks(checks, CHECKS)


def _same_tensor(a, b) -> bool:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _same_nvfp4(q, ref) -> bool:
    return all(_same_tensor(getattr(q, f), getattr(ref, f))
               for f in ("weight", "weight_scale", "weight_scale_2"))


def _experts(rng, m, n, k):
    """m experts [n, k] in bf16 with magnitudes spread over 1e-4..1e3, expert 1 all zero, a few
    heavy outliers and near-threshold values."""
    import ml_dtypes
    import numpy as np

    scales = 10.0 ** rng.uniform(-4, 3, size=m)
    w = rng.standard_normal((m, n, k)).astype(np.float32) * scales[:, None, None]
    w[:, 0, :16] = scales[:, None] * np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2) / 6.0
    w[0, 3, 5] = 40.0 * scales[0]
    if m > 1:
        w[1] = 0.0
    return w.astype(ml_dtypes.bfloat16)


def check_quantize() -> dict:
    import jax.numpy as jnp
    import numpy as np

    from nvfp4_jax import numerics, sharding

    mesh = sharding.device_mesh()
    rng = np.random.default_rng(0)
    cases = {}
    for m, n, k in ((13, 32, 256), (3, 16, 64), (16, 8, 128), (1, 4, 32)):
        w = _experts(rng, m, n, k)
        own = np.abs(w.astype(np.float32)).reshape(m, -1).max(axis=1)
        group = own.copy()
        group[::3] *= 2.5  # a fused-group amax above the expert's own
        for label, amax in (("own", own), ("group", group)):
            ref = numerics.quantize(jnp.asarray(w), jnp.asarray(amax))
            q = sharding.quantize_sharded(jnp.asarray(w), amax, mesh)
            cases[f"{m}x{n}x{k}/{label}/stacked"] = _same_nvfp4(q, ref)
            q = sharding.quantize_sharded([jnp.asarray(x) for x in w], amax, mesh)
            cases[f"{m}x{n}x{k}/{label}/list"] = _same_nvfp4(q, ref)
    # the 2x4 mesh factorization gives the same bytes
    w = _experts(rng, 11, 16, 128)
    amax = np.abs(w.astype(np.float32)).reshape(11, -1).max(axis=1)
    q = sharding.quantize_sharded(jnp.asarray(w), amax, sharding.device_mesh(samples=2))
    cases["mesh_4x2"] = _same_nvfp4(q, numerics.quantize(jnp.asarray(w), jnp.asarray(amax)))
    # errors name the row
    bad = np.array(w, copy=True)
    bad[5, 2, 3] = np.nan
    for label, arr, a, needle in (("nan", bad, amax, "stacked weight 5"),
                                  ("low_amax", w, np.where(np.arange(11) == 7, amax / 2, amax), "stacked weight 7")):
        try:
            sharding.quantize_sharded(jnp.asarray(arr), a, mesh)
            cases[f"error_{label}"] = False
        except ValueError as e:
            cases[f"error_{label}"] = needle in str(e)
    print(json.dumps(cases, indent=1))
    return {"cases": cases}


def _forward_cases(build) -> dict:
    import tempfile

    import jax.numpy as jnp
    import numpy as np

    from nvfp4_jax import examples, sharding
    from nvfp4_jax.calibration import calibrate_layer
    from nvfp4_jax.checkpoint.reader import CheckpointReader
    from nvfp4_jax.models import get_family

    dtype = jnp.bfloat16
    mesh = sharding.device_mesh()
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp) / "model")
        reader = CheckpointReader(path)
        family = get_family(reader.config)
        tokens = examples.calibration_samples(path / "tokenizer.json", num_samples=16, seq_len=32)
        ids = np.asarray(tokens, np.int32)
        embed = reader.get_many(family.embed_param_names(reader.names()), dtype)
        layers = [family.read_layer(reader, l, dtype) for l in range(family.num_layers())]
        # (one-device batch sizes, sharded rows per batch): 16 = 8 devices x 2 rows, the one-device
        # batch of 2; then 13 rows: a sharded part of 1 row per device plus 5 replicated rows
        for label, single_bs, sharded_rows in (("aligned", [2] * 8, 16), ("remainder", [1] * 8 + [5], 13)):
            starts = np.cumsum([0] + single_bs)
            single = [family.embed(embed, jnp.asarray(ids[a:b]), dtype=dtype) for a, b in zip(starts, starts[1:])]
            sharded = sharding.regroup_batches(single, sharded_rows)
            for layer in range(family.num_layers()):
                single, ref_stats = calibrate_layer(family, layer, layers[layer], single, dtype=dtype)
                sharded, got_stats = calibrate_layer(family, layer, layers[layer], sharded, dtype=dtype, mesh=mesh)
                a = np.concatenate([np.asarray(h, np.float32) for h in single])
                b = np.concatenate([np.asarray(h, np.float32) for h in sharded])
                case = {
                    "case": label, "layer": layer, "moe_layers": family.is_moe_layer(layer),
                    "stats_equal": calib_stats_equal(ref_stats, got_stats),
                    "hidden_max_abs_diff": float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf"),
                    "hidden_bytes_equal": a.shape == b.shape and a.tobytes() == b.tobytes(),
                    "sharded_batch_shapes": [list(h.shape) for h in sharded],
                }
                if got_stats.experts:
                    (e,) = got_stats.experts.values()
                    case["tokens"] = int(e.tokens_per_expert.sum())
                cases.append(case)
                print(json.dumps(case))
        reader.close()
    return {"cases": cases}


def check_forward_llama() -> dict:
    from nvfp4_jax import examples

    return _forward_cases(examples.build_llama_tiny)


def check_forward_kimi() -> dict:
    from nvfp4_jax import examples

    return _forward_cases(examples.build_kimi_k2_tiny)


def check_layer_e2e() -> dict:
    """One MoE layer of the tiny Kimi-K2 the pipeline's way, sharded vs one device: calibration
    forward of layers 0..L, input amax with the MoE back-fill and fused-group unification, lazy
    weight amax unified over groups, then quantize per shape (experts as lists, others stacked)."""
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from nvfp4_jax import examples, numerics, sharding
    from nvfp4_jax.calibration import calibrate_layer, expert_input_amax, unify_groups
    from nvfp4_jax.checkpoint.layout import get_layout
    from nvfp4_jax.checkpoint.reader import CheckpointReader
    from nvfp4_jax.models import get_family

    dtype = jnp.bfloat16
    mesh = sharding.device_mesh()
    with tempfile.TemporaryDirectory() as tmp:
        path = examples.build_kimi_k2_tiny(Path(tmp) / "kimi")
        reader = CheckpointReader(path)
        family = get_family(reader.config)
        layout = get_layout(reader.config)
        names = reader.names()
        all_linear = layout.linear_modules(names)
        quantized = layout.close_groups(layout.quantized(all_linear, "all"), all_linear)
        groups = layout.fused_groups(sorted(quantized))
        ids = np.asarray(examples.calibration_samples(path / "tokenizer.json", 16, 32), np.int32)
        embed = reader.get_many(family.embed_param_names(names), dtype)
        target = 1  # the first MoE layer
        results = {}
        for mode in ("single", "sharded"):
            hidden = [family.embed(embed, jnp.asarray(ids[i:i + 2]), dtype=dtype) for i in range(0, 16, 2)]
            if mode == "sharded":
                hidden = sharding.regroup_batches(hidden, 2 * mesh.size)
            for layer in range(target + 1):
                params = family.read_layer(reader, layer, dtype)
                hidden, stats = calibrate_layer(family, layer, params, hidden, dtype=dtype,
                                                mesh=mesh if mode == "sharded" else None)
            layer_names = family.layer_param_names(target, names)
            mods = sorted({n[:-len(".weight")] for n in layer_names if n.endswith(".weight")} & quantized)
            layer_groups = [g for g in groups if g[0] in mods]
            in_amax = dict(stats.input_amax)
            in_amax.update(expert_input_amax(stats, "layer-max"))
            in_amax = unify_groups({m: in_amax[m] for m in mods}, layer_groups)
            w_amax = unify_groups({m: float(numerics.tensor_amax(params[f"{m}.weight"])) for m in mods},
                                  layer_groups)
            by_shape: dict = {}
            for m in mods:
                by_shape.setdefault(tuple(params[f"{m}.weight"].shape), []).append(m)
            res = {}
            for shape, ms in by_shape.items():
                amax = np.asarray([w_amax[m] for m in ms], np.float32)
                if mode == "single":
                    q = numerics.quantize(jnp.stack([params[f"{m}.weight"] for m in ms]), jnp.asarray(amax))
                elif len(ms) > 1:
                    q = sharding.quantize_sharded([params[f"{m}.weight"] for m in ms], amax, mesh)
                else:
                    q = sharding.quantize_sharded(jnp.stack([params[f"{m}.weight"] for m in ms]), amax, mesh)
                q = jax.device_get(q)
                for j, m in enumerate(ms):
                    res[m] = (q.weight[j], q.weight_scale[j], q.weight_scale_2[j],
                              np.asarray(numerics.scale_from_amax(in_amax[m]), np.float32))
            results[mode] = res
        reader.close()
    mismatched = [m for m in results["single"]
                  if not all(_same_tensor(x, y) for x, y in zip(results["single"][m], results["sharded"][m]))]
    return {"modules": len(results["single"]), "mismatched": mismatched,
            "expert_modules": sum(".experts." in m for m in results["single"])}


def check_speed() -> dict:
    """quantize_sharded on 8 fake CPU devices vs numerics.quantize on one, 16 experts of 512x1024
    bf16 (informative only: fake devices share the host's cores)."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from nvfp4_jax import numerics, sharding

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((16, 512, 1024)).astype(np.float32) * 0.02, jnp.bfloat16)
    amax = np.asarray(numerics.tensor_amax(w, per_leading=True))
    mesh8 = sharding.device_mesh()
    mesh1 = sharding.device_mesh(jax.devices()[:1])

    def best(fn, reps=5):
        jax.block_until_ready(fn())  # compile
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t)
        return min(times)

    w8 = jax.device_put(w, jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec(("experts", "samples"))))
    t_one = best(lambda: numerics.quantize(w, jnp.asarray(amax), check=False))
    t_one_mesh = best(lambda: sharding.quantize_sharded(w, amax, mesh1, check=False))
    t_eight = best(lambda: sharding.quantize_sharded(w, amax, mesh8, check=False))
    t_eight_placed = best(lambda: sharding.quantize_sharded(w8, amax, mesh8, check=False))
    t_one_checked = best(lambda: numerics.quantize(w, jnp.asarray(amax)))
    t_eight_checked = best(lambda: sharding.quantize_sharded(w, amax, mesh8))
    r = {"cpu_count": os.cpu_count(), "numerics_quantize_1dev_s": t_one, "quantize_sharded_1dev_s": t_one_mesh,
         "quantize_sharded_8dev_s": t_eight, "quantize_sharded_8dev_presharded_s": t_eight_placed,
         "speedup_8_vs_1": t_one / t_eight, "numerics_quantize_checked_1dev_s": t_one_checked,
         "quantize_sharded_checked_8dev_s": t_eight_checked, "speedup_checked_8_vs_1": t_one_checked / t_eight_checked}
    print(json.dumps(r, indent=1))
    return r


CHECKS = {"quantize": check_quantize, "forward_llama": check_forward_llama, "forward_kimi": check_forward_kimi,
          "layer_e2e": check_layer_e2e, "speed": check_speed}


if __name__ == "__main__":
    if "XLA_FLAGS" not in os.environ:  # run directly: set up the 8 devices before jax starts
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={N_DEVICES}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    result = _worker(sys.argv[1] if len(sys.argv) > 1 else "quantize")
    print("RESULT " + json.dumps(result))
