"""Where a Kimi-K2-shaped MoE layer's calibration forward spends its time, against the bare
matmuls of the same tokens.

    PYTHONPATH=. python scripts/profile_moe_layer.py [--workdir DIR] [--experts 32] \\
        [--samples 8] [--seq-len 64] [--repeats 3] [--modes auto padded ragged]

Builds a `kimi-k2-shaped` source (layer 0 dense, layer 1 MoE; Kimi-K2's real widths) in DIR/src
unless it is there, runs layer 0 to get the MoE layer's input, then for each matmul path
(``NVFP4_MOE_MATMUL``) times ``layer_forward`` of the MoE layer on one batch of
samples x seq-len tokens (``repeats`` calls after a first, compiling, one), and ``bare_matmul``:
one jitted program of every matmul the layer's forward does for those tokens, with the same
operand dtypes and float32 accumulation (each non-expert linear on the T tokens, the routed
experts as T x top-k rows against one expert's gate, up and down: the FLOPs of the grouped
matmuls at perfect efficiency; no attention scores, norms, routing or dispatch). The ratio
layer_forward / bare_matmul is issue 13's CPU acceptance figure (at most 2). With stacks, a last
line times the routed part alone that way and as ``grouped_matmul``: one batched matmul per
projection over every expert at the mean row count, which reads every expert's weights as the
layer must (the single-expert GEMMs read one expert's).

The layer's routed experts are stacked once (``family.expert_stacks``) when the code has it, and
passed to every call, as calibration does; with older code (no ``expert_stacks``) each call
stacks them itself, as calibration did then. Run the same script with PYTHONPATH at another
checkout to compare code back to back. Prints one JSON line per path and one for the matmuls.
"""

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax.checkpoint.reader import CheckpointReader
from nvfp4_jax.examples import build_kimi_k2_shaped, calibration_samples
from nvfp4_jax.models import get_family, moe


def timed(fn, repeats: int) -> list:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(round(time.perf_counter() - t, 4))
    return out


def layer_matmul_shapes(family, layer: int, params: dict, tokens: int) -> list:
    """(rows, weight) of every matmul of ``layer``'s forward on ``tokens`` tokens: each 2-D weight
    that is not a routed expert on the tokens, and routed expert 0's weights on tokens x top-k
    rows (all experts have its shapes; the routed rows add up to tokens x top-k)."""
    prefix = family.layer_prefix(layer, params)
    experts = prefix + "mlp.experts."
    top_k = int(family.config.get("num_experts_per_tok", 0))
    shapes = []
    for name, w in sorted(params.items()):
        if not name.startswith(prefix) or w.ndim != 2 or not name.endswith(".weight"):
            continue
        if name.startswith(experts):
            if name.startswith(experts + "0."):
                shapes.append((tokens * top_k, w))
        else:
            shapes.append((tokens, w))
    return shapes


def bare_matmul(shapes: list, dtype, repeats: int) -> dict:
    """Seconds of one jitted program computing ``x [rows, in] . w [out, in]^T`` for every
    (rows, w) of ``shapes`` (operands in w's dtype, float32 accumulation, rounded to ``dtype``),
    and its FLOPs."""
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.standard_normal((rows, w.shape[1]), np.float32)).astype(w.dtype) for rows, w in shapes]
    ws = [w for _, w in shapes]

    @jax.jit
    def matmuls(xs, ws):
        return [jnp.einsum("tk,nk->tn", x, w, preferred_element_type=jnp.float32).astype(dtype)
                for x, w in zip(xs, ws)]

    jax.block_until_ready(matmuls(xs, ws))
    flops = sum(2 * rows * int(w.shape[0]) * int(w.shape[1]) for rows, w in shapes)
    return {"bare_matmul_s": timed(lambda: matmuls(xs, ws), repeats), "gflop": round(flops / 1e9, 1)}


def grouped_matmul(stacks, rows: int, dtype, repeats: int) -> dict:
    """Seconds of one jitted program of the routed experts' three matmuls as one batched matmul per
    projection over every expert, ``rows`` rows each (the routed rows split evenly): the same
    FLOPs as the single-expert GEMMs of :func:`bare_matmul`, but reading every expert's weights,
    as the layer must."""
    rng = np.random.default_rng(1)
    e, inter, hidden = (int(d) for d in stacks.gate.shape)
    x = jnp.asarray(rng.standard_normal((e, rows, hidden), np.float32)).astype(stacks.gate.dtype)
    h = jnp.asarray(rng.standard_normal((e, rows, inter), np.float32)).astype(stacks.gate.dtype)

    @jax.jit
    def matmuls(x, h, gate, up, down):
        return [jnp.einsum("erk,enk->ern", a, w, preferred_element_type=jnp.float32).astype(dtype)
                for a, w in ((x, gate), (x, up), (h, down))]

    def run():
        return matmuls(x, h, stacks.gate, stacks.up, stacks.down)

    jax.block_until_ready(run())
    return {"grouped_matmul_s": timed(run, repeats), "rows_per_expert": rows}


def _plan_text(plan) -> object:
    """[experts ("all" or a count), capacity, skip] per padded program; "ragged" for ragged_dot."""
    if plan is None:
        return "ragged"
    return [["all" if st.experts is None else len(st.experts), st.capacity, st.skip] for st in plan]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/prof")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["auto", "padded", "ragged"])
    args = ap.parse_args()
    src = Path(args.workdir) / f"src{args.experts}"
    if not src.is_dir():
        build_kimi_k2_shaped(src, layers=2, experts=args.experts)
    reader = CheckpointReader(src)
    fam = get_family(reader.config)
    dtype = jnp.bfloat16
    emb = reader.get_many(fam.embed_param_names(reader.names()), dtype)
    tokens = np.asarray(calibration_samples(src, args.samples, args.seq_len), np.int32)
    h = fam.embed(emb, jnp.asarray(tokens))
    p0 = fam.read_layer(reader, 0, dtype=dtype)
    h, _ = fam.layer_forward(0, p0, h)
    del p0
    p1 = fam.read_layer(reader, 1, dtype=dtype)
    jax.block_until_ready(p1)
    kwargs = {}
    if hasattr(fam, "expert_stacks"):  # stacked once per layer, as calibrate_layer does
        t = time.perf_counter()
        kwargs["experts"] = jax.block_until_ready(fam.expert_stacks(1, p1, dtype))
        print(json.dumps({"stack_once_s": round(time.perf_counter() - t, 4)}), flush=True)
    plans = []
    real_plan = getattr(moe, "expert_matmul_plan", None)  # older code: chunk_matmul_plan, not recorded
    if real_plan is not None:
        def recorded_plan(*a, **k):
            plans.append(real_plan(*a, **k))
            return plans[-1]

        moe.expert_matmul_plan = recorded_plan
    for mode in args.modes:
        os.environ[moe.MOE_MATMUL_ENV] = mode
        plans.clear()
        first = timed(lambda: fam.layer_forward(1, p1, h, dtype=dtype, **kwargs)[0], 1)
        again = timed(lambda: fam.layer_forward(1, p1, h, dtype=dtype, **kwargs)[0], args.repeats)
        print(json.dumps({"mode": mode, "experts": args.experts, "tokens": int(tokens.size),
                          "first_call_s": first[0], "layer_forward_s": again,
                          "plan": _plan_text(plans[-1]) if plans else None}), flush=True)
    shapes = layer_matmul_shapes(fam, 1, p1, int(tokens.size))
    row = bare_matmul(shapes, dtype, args.repeats)
    print(json.dumps({"experts": args.experts, "tokens": int(tokens.size), **row}), flush=True)
    if "experts" in kwargs:  # the routed part both ways: one expert's GEMMs, and every expert's weights read
        routed_rows = int(tokens.size) * int(fam.config.get("num_experts_per_tok", 0))
        routed = bare_matmul([(r, w) for r, w in shapes if r == routed_rows], dtype, args.repeats)
        grouped = grouped_matmul(kwargs["experts"], routed_rows // args.experts, dtype, args.repeats)
        print(json.dumps({"routed_bare_matmul_s": routed["bare_matmul_s"], **grouped}), flush=True)


if __name__ == "__main__":
    main()
