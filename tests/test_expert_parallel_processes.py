"""Expert parallelism across processes (jax.distributed on localhost, CPU, gloo collectives).

Properties checked:

* A calibrated run of a Kimi-K2-shaped checkpoint (the streamed ``kimi-k2-shaped`` builder at
  reduced width, 32 routed experts per MoE layer, so that the routed experts are most of the bytes
  as in Kimi-K2) over 2 and over 4 processes (one CPU device each) writes every output file byte
  for byte as one process does.
* Each of the 2 processes reads (``/proc/self/io`` rchar, counted by the OS) at most half of the
  routed-expert bytes plus every other tensor, within 15%, and so does each of the 4 with a quarter;
  the one-process run reads all of them, more than that bound (so the bound can fail). Expected
  bytes come from the safetensors headers.
* A process killed right before a MoE layer's collectives (after the barrier) makes the other exit
  non-zero with a message naming the lost process (not gloo's timeout), and OUT is not created.
* The processes meet before the collectives whatever their compile times: in the 2-process run
  process 0 shares the compilation cache the one-process run filled (hits) while process 1 starts
  from an empty one (compiles everything); the 4-process run compiles its 4-device programs anew.

Runs are bounded by timeouts (the processes are killed past them): a hang fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from nvfp4_jax import examples
from nvfp4_jax.checkpoint.reader import CheckpointReader
from tests.cli_process import finish_all
from tests.test_distributed import FAULT_DRIVER

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 500  # s, one whole run (all its processes) on a busy 2-core machine
# expert tensors of about 1 MB (INT4) so that the resume check's fixed 32 KiB samples per tensor stay
# small beside them, as at Kimi-K2's 7 MB
SIZES = {"hidden": 2048, "intermediate": 1024, "moe_intermediate": 1024, "layers": 2, "experts": 32, "top_k": 4,
         "heads": 4, "q_lora": 128, "kv_lora": 64, "nope": 32, "rope": 16, "v_head": 32, "vocab": 1024}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", NVFP4_JAX_COMPILE_CACHE=str(cache))
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _finish(procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT) -> tuple[list, list[str]]:
    return finish_all(procs, timeout)


def _start(args: list[str], cache: Path, fault: Optional[tuple[str, str]] = None) -> subprocess.Popen:
    """One CLI process with compilation cache ``cache``; ``fault``: (point, "kill" or "raise")."""
    prefix = ["-c", FAULT_DRIVER, *fault] if fault else ["-m", "nvfp4_jax.cli"]
    return subprocess.Popen([sys.executable, *prefix, *args], cwd=REPO, env=_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(args: list[list[str]], caches: list[Path]) -> list[str]:
    """Run one CLI process per argument list (process i with compilation cache ``caches[i]``); all
    must exit 0 within RUN_TIMEOUT."""
    codes, outs = _finish([_start(a, c) for a, c in zip(args, caches)])
    assert codes == [0] * len(codes), "\n\n".join(outs)
    return outs


def _source_bytes(src: Path) -> tuple[int, int]:
    """(routed-expert bytes, every other tensor's bytes) of the source, from its headers."""
    reader = CheckpointReader(src)
    routed = other = 0
    for name in reader.names():
        n = sum(reader.entry(p).nbytes for p in reader.info(name).parts.values())
        if ".mlp.experts." in name:
            routed += n
        else:
            other += n
    reader.close()
    return routed, other


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(root, source, the one-process output): the reference every multi-process run must equal."""
    root = tmp_path_factory.mktemp("ep_processes")
    src = examples.build_kimi_k2_streamed(root / "src", examples.kimi_k2_config(**SIZES), seed=2)
    tokens = examples.calibration_samples(src / "tokenizer.json", num_samples=8, seq_len=32)
    (root / "tokens.json").write_text(json.dumps({"input_ids": tokens}))
    ref = root / "ref"
    _run([_convert_args(root, src, ref)], [root / "cache"])
    return root, src, ref


def _convert_args(root: Path, src: Path, out: Path) -> list[str]:
    return ["convert", str(src), str(out), "--calib-tokens", str(root / "tokens.json"), "--batch-size", "2",
            "--quiet", "--shard-size", "5000000", "--expert-parallel", "processes"]


def _process_args(root: Path, src: Path, out: Path, n: int, timeout_s: int = 300) -> list[list[str]]:
    port = _free_port()
    return [_convert_args(root, src, out) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                                             "--process-id", str(i), "--timeout", str(timeout_s)] for i in range(n)]


def _run_processes(root: Path, src: Path, out: Path, caches: list[Path]) -> None:
    _run(_process_args(root, src, out, len(caches)), caches)


def _check(src: Path, ref: Path, out: Path, n: int) -> dict:
    """The output equals the reference byte for byte and each process read its share; the report."""
    files = sorted(f.name for f in ref.iterdir() if f.name != "nvfp4_report.json")
    assert files == sorted(f.name for f in out.iterdir() if f.name != "nvfp4_report.json")
    for f in files:
        assert (ref / f).read_bytes() == (out / f).read_bytes(), f

    routed, other = _source_bytes(src)
    assert routed > 2 * other  # the routed experts dominate, as in Kimi-K2
    bound = 1.15 * (routed / n + other)
    report = json.loads((out / "nvfp4_report.json").read_text())
    assert report["expert_parallel"]["devices"] == n and report["expert_parallel"]["layers"] == [1]
    figures = {r["process"]: r["bytes_read"]["rchar"] for r in report["resources"]}
    assert sorted(figures) == list(range(n))
    for p, rchar in figures.items():
        assert routed / n <= rchar <= bound, (p, rchar, routed, other)
    reader = {r["process"]: r["bytes_read"]["reader"] for r in report["resources"]}
    assert sum(reader.values()) < routed + n * other + 0.01 * routed  # no expert read twice
    one = json.loads((ref / "nvfp4_report.json").read_text())["resources"][0]["bytes_read"]["rchar"]
    assert one >= routed + other > bound, (one, routed, other)
    return report


def test_two_processes_read_their_experts_only_and_write_one_process_bytes(model):
    root, src, ref = model
    out = root / "dist2"
    # process 0 finds the reference run's programs in its cache, process 1 compiles all of its own
    _run_processes(root, src, out, [root / "cache", root / "cache-empty"])
    report = _check(src, ref, out, 2)
    assert report["compile_cache"]["hits"] > 0, report["compile_cache"]  # process 0's


def test_four_processes_write_one_process_bytes(model):
    root, src, ref = model
    out = root / "dist4"
    _run_processes(root, src, out, [root / "cache"] * 4)
    _check(src, ref, out, 4)


def test_process_killed_inside_the_collectives_is_named_by_the_other(model):
    root, src, _ = model
    out = root / "dist-killed"
    timeout_s = 30  # heartbeat timeout 10 s
    args = _process_args(root, src, out, 2, timeout_s)
    # process 1 dies right after the barrier before layer 1's collectives: process 0's gloo setup
    # waits for it in vain (30 s), then process 0 watches the heartbeats and names the lost process
    procs = [_start(args[0], root / "cache"), _start(args[1], root / "cache", ("passed:experts/layer.1", "kill"))]
    codes, outs = _finish(procs)
    assert codes[1] == -9, outs[1]
    assert codes[0] not in (0, None, -9), outs[0]
    assert "process 1 of 2 is gone" in outs[0] and "collectives of layer 1" in outs[0], outs[0]
    assert not out.exists()
