"""Multi-process conversion (nvfp4_jax.distributed) on localhost, CPU.

Properties checked:

* N processes (``nvfp4-jax convert ... --coordinator --num-processes N --process-id I``) give
  every output file byte for byte as one process does (the run report aside): a tiny Llama and a
  tiny Kimi-K2 (INT4 experts, MoE calibration split across processes), 2 and 4 processes, shards
  small enough that one shard holds tensors of several processes, modelopt and
  compressed-tensors formats, calibrated and calibration-free.
* The planned writer, driven by two "processes" in one interpreter writing interleaved, gives the
  one-process writer's bytes.
* A process killed mid-run (SIGKILL, no goodbye) makes the survivor exit non-zero soon after the
  heartbeat timeout, with a message naming the lost process; OUT is not created; rerunning every
  process with --resume completes and gives the one-process bytes. A process that fails with an
  error has its error reported by the others. Faults are injected through the ``fault`` hook of
  ``distributed.Processes``, by a small driver script around the CLI.

All processes share a persistent compilation cache so that only the first run of a model pays
for XLA compilation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nvfp4_jax import examples
from nvfp4_jax.checkpoint.writer import PlannedWriter, WriterOptions
from nvfp4_jax.checkpoint.formats import modelopt_configs
from nvfp4_jax.checkpoint.safetensors_io import CheckpointError, st_dtype
from tests.cli_process import finish_all

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 400  # s, a whole multi-process run on a busy 2-core machine
# one process of a run whose ``fault`` hook kills it or raises at one point: argv POINT ACTION CLI-ARGS...
FAULT_DRIVER = """
import dataclasses, os, signal, sys
from nvfp4_jax import cli, distributed
point, action = sys.argv[1:3]
def fault(at):
    if at != point:
        return
    print(f"injected fault: {action} at {at}", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at {at}")
run = distributed.convert_distributed
distributed.convert_distributed = lambda src, out, opts, processes: run(
    src, out, opts, dataclasses.replace(processes, fault=fault))
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    srcs = {"llama": examples.build_llama_tiny(root / "llama", seed=3),
            "kimi": examples.build_kimi_k2_tiny(root / "kimi", seed=4)}
    for name, src in srcs.items():
        tokens = examples.calibration_samples(src / "tokenizer.json", num_samples=4, seq_len=32)
        (root / f"{name}_tokens.json").write_text(json.dumps({"input_ids": tokens}))
    return {"root": root, "srcs": srcs, "refs": {}, "cache": root / "jax_cache"}


def _env(work):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(work["cache"]), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)
    return env


def _args(work, model, out, extra):
    root = work["root"]
    calib = [] if "--input-scale-constant" in extra else ["--calib-tokens", str(root / f"{model}_tokens.json")]
    return ["convert", str(work["srcs"][model]), str(out), *calib, "--batch-size", "1", "--quiet", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(work, model, extra=()):
    """The one-process conversion (cached per model and flags)."""
    key = (model, tuple(extra))
    if key not in work["refs"]:
        out = work["root"] / f"ref-{model}-{len(work['refs'])}"
        p = subprocess.run([sys.executable, "-m", "nvfp4_jax.cli", *_args(work, model, out, extra)], cwd=REPO, env=_env(work), capture_output=True,
                           text=True, timeout=RUN_TIMEOUT)
        assert p.returncode == 0, p.stdout + p.stderr
        work["refs"][key] = out
    return work["refs"][key]


def launch(work, model, out, n, extra=(), fault=None):
    """Start processes 0..n-1 of one run; returns the Popen objects (stdout+stderr to a pipe).
    extra: more CLI flags (a --timeout there replaces the default 120 s); fault: (process id,
    point, "kill" or "raise") injected into that process."""
    port = _free_port()
    procs = []
    for i in range(n):
        args = _args(work, model, out, ["--timeout", "120", *extra, "--coordinator", f"127.0.0.1:{port}",
                                        "--num-processes", str(n), "--process-id", str(i)])
        prefix = (["-c", FAULT_DRIVER, *fault[1:]] if fault and fault[0] == i else ["-m", "nvfp4_jax.cli"])
        procs.append(subprocess.Popen([sys.executable, *prefix, *args], cwd=REPO, env=_env(work),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout=RUN_TIMEOUT):
    return finish_all(procs, timeout)


def assert_same_files(ref: Path, out: Path):
    files = sorted(f.name for f in ref.iterdir() if f.name != "nvfp4_report.json")
    assert files == sorted(f.name for f in out.iterdir() if f.name != "nvfp4_report.json")
    for f in files:
        assert (ref / f).read_bytes() == (out / f).read_bytes(), f"{f} differs from the one-process run"
    return files


@pytest.mark.parametrize("model,n,extra", [
    ("llama", 2, []),
    ("kimi", 2, ["--shard-size", "200000"]),
    ("llama", 4, ["--input-scale-constant", "1.0", "--format", "compressed-tensors", "--shard-size", "30000"]),
], ids=["llama-2", "kimi-2-shards", "llama-4-calibration-free-compressed-tensors"])
def test_processes_write_the_one_process_bytes(work, model, n, extra):
    ref = reference(work, model, extra)
    out = work["root"] / f"dist-{model}-{n}-{len(extra)}"
    codes, outs = finish(launch(work, model, out, n, extra))
    assert codes == [0] * n, "\n\n".join(outs)
    files = assert_same_files(ref, out)
    report = json.loads((out / "nvfp4_report.json").read_text())
    assert report["processes"] == n
    if model == "kimi":
        assert sum(f.endswith(".safetensors") for f in files) > 2


@pytest.mark.slow
def test_four_processes_kimi(work):
    extra = ["--shard-size", "200000"]
    ref = reference(work, "kimi", extra)
    out = work["root"] / "dist-kimi-4"
    codes, outs = finish(launch(work, "kimi", out, 4, extra))
    assert codes == [0] * 4, "\n\n".join(outs)
    assert_same_files(ref, out)


def test_killed_process_stops_the_others_then_resume_completes(work):
    ref = reference(work, "llama")
    out = work["root"] / "dist-killed"
    timeout_s = 60  # heartbeat timeout 20 s: a dead process is noticed after that
    procs = launch(work, "llama", out, 2, ["--timeout", str(timeout_s)], fault=(1, "stats:layer.1", "kill"))
    try:
        procs[1].wait(timeout=RUN_TIMEOUT)
        procs[0].wait(timeout=RUN_TIMEOUT)  # a hang fails here; how fast it stops is not asserted
    finally:
        codes, outs = finish(procs, timeout=5)
    assert codes[1] == -9, outs[1]
    assert codes[0] not in (0, None), outs[0]
    # noticed by the heartbeats (distributed.heartbeat_seconds(timeout_s) after the death)
    assert "process 1 of 2 is gone" in outs[0], outs[0]
    assert not out.exists()
    partial = Path(f"{out}.partial")
    assert (partial / "manifest-p1-of-2.json").exists(), outs  # layer.0 was finished before the kill

    codes, outs = finish(launch(work, "llama", out, 2, ["--resume"]))
    assert codes == [0, 0], "\n\n".join(outs)
    assert_same_files(ref, out)
    assert not partial.exists()


def test_failing_process_error_reaches_the_others(work):
    out = work["root"] / "dist-error"
    procs = launch(work, "llama", out, 2, fault=(1, "stats:layer.0", "raise"))
    codes, outs = finish(procs)
    assert codes[0] != 0 and codes[1] != 0, outs
    assert "process 1 of 2 failed: RuntimeError: injected fault at stats:layer.0" in outs[0], outs[0]
    assert not out.exists()


# -- the planned writer, in one interpreter -------------------------------------------------------


def _tensors():
    rng = np.random.default_rng(0)
    units = []
    for u in range(4):
        ts = [(f"model.layers.{u}.norm.weight", rng.standard_normal(64).astype(ml_dtypes.bfloat16))]
        for mod, (n, k) in {"q_proj": (64, 128), "down_proj": (128, 96)}.items():
            ts += [(f"model.layers.{u}.{mod}.weight", rng.integers(0, 256, (n, k // 2), dtype=np.uint8)),
                   (f"model.layers.{u}.{mod}.weight_scale",
                    rng.uniform(0.01, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)),
                   (f"model.layers.{u}.{mod}.weight_scale_2", np.float32(rng.uniform(1e-4, 1e-2))),
                   (f"model.layers.{u}.{mod}.input_scale", np.float32(rng.uniform(1e-3, 1.0)))]
        units.append((f"layer.{u}", ts))
    return units


def _plan(units):
    return [(u, [(n, st_dtype(np.asarray(a).dtype), np.shape(a), np.asarray(a).nbytes) for n, a in ts])
            for u, ts in units]


def test_planned_writer_from_two_processes_matches_one_process(tmp_path):
    units = _tensors()
    plan = _plan(units)
    qc, hf = modelopt_configs(["lm_head"], "x")
    cfg = {"model_type": "llama"}

    one = PlannedWriter(tmp_path / "one", plan, WriterOptions(shard_size=20_000))
    one.prepare()
    one.open()
    for unit, ts in units:
        for name, a in ts:
            one.add(name, a)
        one.finish_unit(unit, {"n": len(ts)})
    one.finalize({**cfg, "quantization_config": qc}, hf)

    ws = [PlannedWriter(tmp_path / "planned", plan, WriterOptions(shard_size=20_000, process_id=i, num_processes=2))
          for i in range(2)]
    assert ws[0].digest == ws[1].digest
    ws[0].prepare()
    for w in ws:
        w.open()
    for unit, ts in units:
        for j, (name, a) in enumerate(reversed(ts)):  # any order, tensors of one shard from both
            ws[j % 2].add(name, a)
        for w in ws:
            w.finish_unit(unit, {})
    ws[1].close()
    assert len(ws[0].files) > 2
    ws[0].finalize({**cfg, "quantization_config": qc}, hf, manifests=[w.manifest() for w in ws])
    assert_same_files(tmp_path / "one", tmp_path / "planned")


def test_planned_writer_refuses_incomplete_or_foreign_state(tmp_path):
    units = _tensors()
    plan = _plan(units)
    qc, hf = modelopt_configs([], "x")
    w = PlannedWriter(tmp_path / "out", plan, WriterOptions(shard_size=20_000))
    w.prepare()
    w.open()
    for unit, ts in units[:-1]:
        for name, a in ts:
            w.add(name, a)
        w.finish_unit(unit)
    with pytest.raises(CheckpointError, match="did not finish layer.3"):
        w.finalize({"quantization_config": qc}, hf, manifests=[w.manifest()])
    with pytest.raises(CheckpointError, match="expects U8"):
        w.add("model.layers.3.q_proj.weight", np.zeros((64, 64), np.float32))
    w.close()
    # another process count cannot resume this partial output
    with pytest.raises(CheckpointError, match=r"num_processes 1 \(this run: 2\)"):
        PlannedWriter(tmp_path / "out", plan, WriterOptions(shard_size=20_000, num_processes=2, resume=True)).prepare()
