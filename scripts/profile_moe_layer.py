"""Where a Kimi-K2-shaped MoE layer's calibration forward spends its time (one batch of 8x512):
the whole layer_forward, run_experts alone, each expert path (auto / padded / ragged), the
chunk plan. Usage: python scripts/profile_moe_layer.py [workdir] (builds the source there)."""

import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax.checkpoint.reader import CheckpointReader
from nvfp4_jax.examples import build_kimi_k2_shaped, calibration_samples
from nvfp4_jax.models import family as family_mod, get_family, moe


def timed(fn, repeats=3):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(round(time.perf_counter() - t, 4))
    return out


def main():
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/prof")
    src = work / "src"
    if not src.is_dir():
        build_kimi_k2_shaped(src, layers=2, experts=384)
    reader = CheckpointReader(src)
    fam = get_family(reader.config)
    emb = reader.get_many(fam.embed_param_names(reader.names()), jnp.bfloat16)
    tokens = np.asarray(calibration_samples(src, 8, 512), np.int32)
    h = fam.embed(emb, jnp.asarray(tokens))
    p0 = fam.read_layer(reader, 0, dtype=jnp.bfloat16)
    h, _ = fam.layer_forward(0, p0, h)
    del p0
    p1 = fam.read_layer(reader, 1, dtype=jnp.bfloat16)
    jax.block_until_ready(p1)
    plans, expert_s = [], []
    real_plan, real_run = moe.chunk_matmul_plan, family_mod.run_experts

    def plan(*a, **k):
        plans.append(real_plan(*a, **k))
        return plans[-1]

    def run(*a, **k):
        t = time.perf_counter()
        r = jax.block_until_ready(real_run(*a, **k))
        expert_s.append(round(time.perf_counter() - t, 4))
        return r

    moe.chunk_matmul_plan, family_mod.run_experts = plan, run
    rows = {}
    for mode in ("auto", "padded", "ragged"):
        os.environ[moe.MOE_MATMUL_ENV] = mode
        plans.clear(), expert_s.clear()
        layer_s = timed(lambda: fam.layer_forward(1, p1, h)[0])
        rows[mode] = {"layer_forward_s": layer_s, "run_experts_s": list(expert_s), "plan": plans[-1]}
        print(mode, json.dumps(rows[mode]), flush=True)


if __name__ == "__main__":
    main()
