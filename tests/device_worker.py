"""A test module run again as a subprocess with N host CPU devices (XLA_FLAGS is read when JAX
starts, so a multi-device check cannot run inside the pytest process); the worker prints one
``RESULT {json}`` line, and each check's entry holds its figures or an ``error``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def run_device_worker(script: str, checks: str, devices: int, timeout: int) -> dict:
    """``python SCRIPT CHECKS`` on ``devices`` CPU devices -> its RESULT dict; fails the test on a
    non-zero exit or a missing RESULT line, showing the worker's output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), checks], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"worker {checks} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    last = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert last, proc.stdout[-4000:]
    return json.loads(last[-1][len("RESULT "):])


def run_checks(checks: str, table: dict) -> dict:
    """In the worker: each check named in ``checks`` (comma-separated keys of ``table``, name ->
    fn() -> dict) -> the RESULT dict; a failing check's entry is its traceback, so one failure
    does not hide the others."""
    import traceback

    import jax

    out = {"devices": len(jax.devices())}
    for check in checks.split(","):
        try:
            out[check] = table[check]()
        except Exception:  # noqa: BLE001 - reported per check, see the docstring
            out[check] = {"error": traceback.format_exc()}
            print(out[check]["error"], file=sys.stderr)
    return out


def check_results(results: dict, devices: int) -> Callable[[str], dict]:
    """The getter a module's ``worker`` fixture returns: one check's entry, failing on its error."""
    assert results["devices"] == devices

    def get(check: str) -> dict:
        res = results[check]
        assert "error" not in res, res["error"]
        return res

    return get


def calib_stats_equal(a, b) -> bool:
    """Two CalibStats bit for bit: the same input amax and, per MoE layer, the same per-expert
    arrays (dtype and bytes)."""
    if a.input_amax != b.input_amax or set(a.experts) != set(b.experts):
        return False
    for k, ea in a.experts.items():
        eb = b.experts[k]
        for f in ("gate_up_input_amax", "down_input_amax", "tokens_per_expert"):
            x, y = getattr(ea, f), getattr(eb, f)
            if x.dtype != y.dtype or x.tobytes() != y.tobytes():
                return False
    return True
