"""The CLI as a separate process, for tests that signal or kill a running conversion."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_cli(*args, merge_stderr: bool = False) -> subprocess.Popen:
    """`python -m nvfp4_jax.cli ARGS` on CPU with unbuffered output; stderr into stdout if asked."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "nvfp4_jax.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True)


def wait_for_first_layer(out: Path, p: subprocess.Popen, timeout: float = 300) -> None:
    """Return once OUT.partial's manifest records layer 0, the process ended, or timeout passed."""
    manifest = Path(f"{out}.partial") / "manifest.json"
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if manifest.exists() and '"layer.0"' in manifest.read_text():
            return
        time.sleep(0.05)


def finish_all(procs: list[subprocess.Popen], timeout: float) -> tuple[list, list[str]]:
    """(return codes, outputs) once every process ended; past ``timeout`` seconds in all they are
    killed (SIGKILL: a process hung in a collective ignores SIGTERM, JAX's preemption notifier) and
    the output says so, so a hang fails the caller's assertions instead of blocking the suite."""
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            try:
                outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(f"(killed after {timeout:.0f} s) " + p.communicate()[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], outs
