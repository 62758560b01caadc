"""Expert-parallel MoE forward (nvfp4_jax.expert_parallel) on 8 host-platform CPU devices.

Properties checked, each against the one-device forward (family.layer_forward batch by batch,
calibration.calibrate_layer without a mesh):

* every statistic (each linear's input amax, each routed expert's gate/up and down input amax and
  token count) is bit-identical, and so are the hidden states, for every MoE layer of a tiny
  Kimi-K2 (16 experts over 8 devices: 2 each) and over 6 devices (16 experts in blocks of 3, the
  last padded with zero experts), for batches that are a multiple of the device count and for a
  remainder that runs replicated;
* the compiled forward's per-device arguments (read from the input shardings' shard shapes and,
  where XLA CPU gives it, the compiled memory analysis) are at most E/D experts plus the
  replicated tensors plus the device's rows; the replicated data-parallel forward of
  nvfp4_jax.sharding holds all E experts per device, which this bound rejects;
* the whole conversion (CLI, subprocess) on 8 devices with --expert-parallel auto writes the same
  files as on one device.

Checks run in a subprocess: the device count is fixed by XLA_FLAGS when jax starts.
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


def _env(n: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def worker():
    return check_results(run_device_worker(__file__, "forward,argument_bytes", N_DEVICES, timeout=900), N_DEVICES)


def test_expert_parallel_forward_bit_identical_to_one_device(worker):
    r = worker("forward")
    assert {c["devices"] for c in r["cases"]} == {8, 6}
    assert {c["case"] for c in r["cases"]} == {"aligned", "remainder"}
    for case in r["cases"]:
        assert case["stats_equal"], case
        assert case["hidden_bytes_equal"], case
        assert case["tokens"] > 0


def test_per_device_argument_bytes_at_most_experts_over_d_plus_shared(worker):
    r = worker("argument_bytes")
    e, d = r["num_experts"], r["devices"]
    # independent figures: per-expert bytes from the checkpoint's shapes, the replicated tensors' sum
    bound = -(-e // d) * r["bytes_per_expert"] + r["shared_bytes"] + r["hidden_bytes_per_device"]
    assert r["by_shard_shapes"] <= bound, r
    if r["memory_analysis_arguments"] is not None:
        assert r["memory_analysis_arguments"] <= bound, r
    # the data-parallel forward (all experts on every device) does not meet the bound
    assert r["replicated_forward_arguments"] > bound, r


def test_convert_8_devices_expert_parallel_byte_identical(tmp_path):
    from nvfp4_jax import examples

    src = examples.build_kimi_k2_tiny(tmp_path / "src", seed=3)
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps({"input_ids": examples.calibration_samples(src / "tokenizer.json", 16, 32)}))
    outs = {}
    for n, mode in ((1, "auto"), (N_DEVICES, "auto")):
        out = outs[n] = tmp_path / f"out{n}"
        code = ("import jax, sys; from nvfp4_jax.cli import main; "
                f"assert len(jax.devices()) == {n}; sys.exit(main(sys.argv[1:]))")
        proc = subprocess.run([sys.executable, "-c", code, "convert", str(src), str(out), "--calib-tokens", str(tok),
                               "--batch-size", "2", "--expert-parallel", mode, "--quiet"], cwd=ROOT, env=_env(n),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((outs[N_DEVICES] / "nvfp4_report.json").read_text())
    assert report["expert_parallel"]["layers"] == [1, 2], report["expert_parallel"]
    files = sorted(f.name for f in outs[1].iterdir() if f.name != "nvfp4_report.json")
    assert files == sorted(f.name for f in outs[N_DEVICES].iterdir() if f.name != "nvfp4_report.json")
    for f in files:
        assert (outs[1] / f).read_bytes() == (outs[N_DEVICES] / f).read_bytes(), f


# ---------------------------------------------------------------------------------------------
# the worker (runs with 8 CPU devices)


def _tiny_kimi(tmp):
    import jax.numpy as jnp
    import numpy as np

    from nvfp4_jax import examples
    from nvfp4_jax.checkpoint.reader import CheckpointReader
    from nvfp4_jax.models import get_family

    path = examples.build_kimi_k2_tiny(Path(tmp) / "model", seed=5)
    reader = CheckpointReader(path)
    family = get_family(reader.config)
    ids = np.asarray(examples.calibration_samples(path / "tokenizer.json", num_samples=24, seq_len=32), np.int32)
    embed = reader.get_many(family.embed_param_names(reader.names()), jnp.bfloat16)
    return reader, family, ids, embed


def check_forward() -> dict:
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from nvfp4_jax import expert_parallel
    from nvfp4_jax.calibration import CalibStats, calibrate_layer

    dtype = jnp.bfloat16
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        reader, family, ids, embed = _tiny_kimi(tmp)
        for n in (8, 6):
            mesh = expert_parallel.expert_mesh(jax.devices()[:n])
            # one-device batches of 2 rows; expert parallel: n devices x 2 rows (+ a remainder)
            for label, rows in (("aligned", 2 * n), ("remainder", 2 * n + 2)):
                single = [family.embed(embed, jnp.asarray(ids[i:i + 2]), dtype=dtype) for i in range(0, rows, 2)]
                sharded = [jnp.concatenate(single[:n])] + ([jnp.concatenate(single[n:])] if rows > 2 * n else [])
                for layer in range(family.num_layers()):
                    params = family.read_layer(reader, layer, dtype)
                    single, ref = calibrate_layer(family, layer, params, single, dtype=dtype)
                    if not family.is_moe_layer(layer):
                        sharded, _ = calibrate_layer(family, layer, params, sharded, dtype=dtype)
                        continue
                    params = expert_parallel.read_layer(family, reader, layer, reader.names(), mesh, dtype)
                    sharded, merged = expert_parallel.forward(family, layer, params, sharded, dtype, mesh)
                    got = CalibStats()
                    got.observe(merged)
                    a = np.concatenate([np.asarray(h, np.float32) for h in single])
                    b = np.concatenate([np.asarray(h, np.float32) for h in sharded])
                    (e,) = got.experts.values()
                    case = {"devices": n, "case": label, "layer": layer, "stats_equal": calib_stats_equal(ref, got),
                            "hidden_bytes_equal": a.shape == b.shape and a.tobytes() == b.tobytes(),
                            "hidden_max_abs_diff": float(np.max(np.abs(a - b))) if a.shape == b.shape else None,
                            "tokens": int(e.tokens_per_expert.sum())}
                    cases.append(case)
                    print(json.dumps(case))
        reader.close()
    return {"cases": cases}


def check_argument_bytes() -> dict:
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from nvfp4_jax import expert_parallel, sharding

    dtype = jnp.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        reader, family, ids, embed = _tiny_kimi(tmp)
        layer = 1
        mesh = expert_parallel.expert_mesh(jax.devices())
        params = expert_parallel.read_layer(family, reader, layer, reader.names(), mesh, dtype)
        hidden = family.embed(embed, jnp.asarray(ids[:2 * mesh.size]), dtype=dtype)
        got = expert_parallel.per_device_argument_bytes(family, layer, params, hidden, mesh, dtype)
        prefix = family.layer_prefix(layer)
        per_expert = sum(int(np.prod(reader.info(f"{prefix}mlp.experts.0.{p}.weight").shape)) * 2
                         for p in ("gate_proj", "up_proj", "down_proj"))
        shared = sum(int(np.prod(v.shape)) * v.dtype.itemsize for k, v in params.items()
                     if expert_parallel.expert_of(k, prefix) is None)
        # the data-parallel forward of nvfp4_jax.sharding, every tensor of the layer replicated
        full = family.read_layer(reader, layer, dtype)
        dmesh = sharding.device_mesh()
        everywhere = jax.sharding.NamedSharding(dmesh, jax.sharding.PartitionSpec())
        stacks = jax.device_put(family.expert_stacks(layer, full, dtype), everywhere)  # as forward_sharded passes them
        local = jax.device_put({k: v for k, v in full.items() if expert_parallel.expert_of(k, prefix) is None},
                               everywhere)
        sig = (tuple(sorted((k, tuple(v.shape), v.dtype.name) for k, v in local.items())),
               tuple((tuple(a.shape), a.dtype.name) for a in stacks))
        fn = sharding._forward_fn(family, sharding._canonical_layer(family, layer), dmesh, dtype, sig)
        hs = jax.device_put(hidden, jax.sharding.NamedSharding(dmesh, sharding._SAMPLES_SPEC))
        ma = fn.lower(local, stacks, hs).compile().memory_analysis()
        replicated = int(ma.argument_size_in_bytes) if ma is not None else sum(
            int(np.prod(v.shape)) * v.dtype.itemsize for v in jax.tree.leaves((local, stacks)))
        reader.close()
    ma = got["memory_analysis"] or {}
    r = {"num_experts": family.num_experts, "devices": mesh.size, "bytes_per_expert": per_expert,
         "shared_bytes": shared, "hidden_bytes_per_device": got["hidden_per_device"],
         "by_shard_shapes": got["by_shard_shapes"], "memory_analysis_arguments": ma.get("argument_size_in_bytes"),
         "replicated_forward_arguments": replicated, "detail": got}
    print(json.dumps(r, indent=1))
    return r


CHECKS = {"forward": check_forward, "argument_bytes": check_argument_bytes}


def _worker(checks: str) -> dict:
    return run_checks(checks, CHECKS)


if __name__ == "__main__":
    if "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={N_DEVICES}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    print("RESULT " + json.dumps(_worker(sys.argv[1] if len(sys.argv) > 1 else "forward")))
