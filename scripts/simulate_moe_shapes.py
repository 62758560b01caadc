"""How many distinct padded MoE programs (compilations) a whole calibrated conversion needs, and
how many matmul rows the padded plan computes per routed row, from `moe.expert_matmul_plan`
alone (no model, no device): the plan's shapes follow each batch's routing, so a run compiles a
new program whenever a batch needs a (experts, capacity) pair no earlier batch needed.

    PYTHONPATH=. python scripts/simulate_moe_shapes.py [--experts 384] [--top-k 8] \\
        [--tokens 4096] [--chunk 24] [--layers 60] [--batches 64] [--alphas 50 5 1]

Each layer draws expert popularities from a symmetric Dirichlet(alpha) (large alpha: balanced
routing, as Kimi's auxiliary-loss-free balancing aims for; alpha 1: some experts several times as
busy as the average), each batch its per-expert row counts from a multinomial over those. The
chunk is what `moe.auto_chunk` gives a Kimi-K2 layer (2 GiB / 88 MB per expert = 24); the gather
cost is `moe.gather_cost_rows()`. Prints one JSON line per alpha: distinct
shapes over the run, new shapes per layer, and rows computed / rows routed.
"""

import argparse
import json

import numpy as np

from nvfp4_jax.models import moe


def simulate(args, alpha: float, rng: np.random.Generator) -> dict:
    rows = args.tokens * args.top_k
    seen: set = set()
    new_per_layer, computed = [], 0
    for _ in range(args.layers):
        popularity = rng.dirichlet(np.full(args.experts, alpha))
        before = len(seen)
        for _ in range(args.batches):
            plan = moe.expert_matmul_plan(rng.multinomial(rows, popularity), args.chunk, rows)
            for step in plan or []:
                count = args.experts if step.experts is None else len(step.experts)
                seen.add((step.experts is None, count, step.capacity))
                computed += count * step.capacity
        new_per_layer.append(len(seen) - before)
    return {"alpha": alpha, "distinct_shapes": len(seen), "new_shapes_per_layer": new_per_layer,
            "new_shapes_after_layer_3": sum(new_per_layer[3:]),
            "rows_computed_per_routed_row": round(computed / (rows * args.batches * args.layers), 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=384)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8 * 512, help="tokens per calibration batch")
    p.add_argument("--chunk", type=int, default=24)
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--batches", type=int, default=64, help="batches per layer (512 samples / 8)")
    p.add_argument("--alphas", type=float, nargs="+", default=[50.0, 5.0, 1.0])
    args = p.parse_args()
    rng = np.random.default_rng(0)
    for alpha in args.alphas:
        print(json.dumps(simulate(args, alpha, rng)), flush=True)


if __name__ == "__main__":
    main()
