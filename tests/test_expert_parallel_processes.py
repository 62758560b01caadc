"""Expert parallelism across processes (jax.distributed on localhost, CPU, gloo collectives).

Property checked: a calibrated 2-process run of a Kimi-K2-shaped checkpoint (the streamed
``kimi-k2-shaped`` builder at reduced width, 32 routed experts per MoE layer, so that the routed
experts are most of the bytes as in Kimi-K2) writes every output file byte for byte as one process
does, and each process reads (``/proc/self/io`` rchar, counted by the OS) at most half of the
routed-expert bytes plus every other tensor, within 15%; the one-process run reads all of them,
more than that bound (so the bound can fail). Expected bytes come from the safetensors headers.
The run is bounded by timeouts (the processes are killed past them): a hang fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nvfp4_jax import examples
from nvfp4_jax.checkpoint.reader import CheckpointReader

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 500
# expert tensors of about 1 MB (INT4) so that the resume check's fixed 32 KiB samples per tensor stay
# small beside them, as at Kimi-K2's 7 MB
SIZES = {"hidden": 2048, "intermediate": 1024, "moe_intermediate": 1024, "layers": 2, "experts": 32, "top_k": 4,
         "heads": 4, "q_lora": 128, "kv_lora": 64, "nope": 32, "rope": 16, "v_head": 32, "vocab": 1024}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args: list[list[str]], timeout: int = RUN_TIMEOUT) -> list[str]:
    procs = [subprocess.Popen([sys.executable, "-m", "nvfp4_jax.cli", *a], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in args]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n\n".join(outs)
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
    root = tmp_path_factory.mktemp("ep_processes")
    src = examples.build_kimi_k2_streamed(root / "src", examples.kimi_k2_config(**SIZES), seed=2)
    tokens = examples.calibration_samples(src / "tokenizer.json", num_samples=8, seq_len=32)
    (root / "tokens.json").write_text(json.dumps({"input_ids": tokens}))
    return root, src


def _convert_args(root: Path, src: Path, out: Path) -> list[str]:
    return ["convert", str(src), str(out), "--calib-tokens", str(root / "tokens.json"), "--batch-size", "2",
            "--quiet", "--shard-size", "5000000"]


def test_two_processes_read_their_experts_only_and_write_one_process_bytes(model):
    root, src = model
    ref, out = root / "ref", root / "dist2"
    _run([_convert_args(root, src, ref)])
    n = 2
    port = _free_port()
    _run([_convert_args(root, src, out) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                                           "--process-id", str(i), "--timeout", "300"] for i in range(n)])
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
