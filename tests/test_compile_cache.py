"""--compile-cache: a second conversion in a new process reads its compiled programs from the
cache the first one wrote (counted by JAX's own cache-hit events, reported in the run report)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from nvfp4_jax import examples

REPO = Path(__file__).resolve().parents[1]


def _convert(src: Path, out: Path, cache) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "nvfp4_jax.cli", "convert", str(src), str(out),
                        "--input-scale-constant", "1.0", "--quiet", "--compile-cache", str(cache)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads((out / "nvfp4_report.json").read_text())


def test_second_process_reuses_the_cached_programs(tmp_path):
    src = examples.build_llama_tiny(tmp_path / "src", seed=3)
    cache = tmp_path / "cache"
    first = _convert(src, tmp_path / "a", cache)["compile_cache"]
    entries = {p.name for p in cache.iterdir()}
    assert first["dir"] == str(cache) and first["misses"] > 0 and entries  # compiled and stored
    second = _convert(src, tmp_path / "b", cache)["compile_cache"]
    assert second["hits"] >= first["misses"]  # every program the first run compiled is read back
    assert {p.name for p in cache.iterdir()} == entries  # and none had to be stored again


def test_off_reports_no_cache(tmp_path):
    src = examples.build_llama_tiny(tmp_path / "src", seed=3)
    assert _convert(src, tmp_path / "a", "off")["compile_cache"] is None
