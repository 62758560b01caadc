"""Device bytes of one quantize call of a Kimi-K2 MoE layer's routed experts, from XLA's compiled
memory analysis (compile only: nothing is allocated, so the real 384-expert layer fits any host).

    JAX_PLATFORMS=cpu python scripts/quantize_chunk_memory.py [--experts 384] [--chunk 32 1]

For each batch size C (32: the gate/up pairs of a batch of layer_quant.ACCELERATOR_CHUNK_BYTES, 64
Kimi experts' weights; 1: the CPU batch, one pair),
the ``max`` quantize program (``layer_quant._batch_quantize``: amax and quantize; the squared
error is a separate small call) of C routed experts' gate/up pairs [2048, 7168] bf16 compiled two
ways: from 2C per-expert arrays (the path without held stacks, which stacks them inside the
program) and from the layer's gate and up stacks [E, 2048, 7168] (layer_quant.WeightStack: a slice
of each inside the program). One JSON line each: argument, output and temporary bytes. XLA:CPU's
temporaries; an accelerator's compile may fuse differently.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

INTER, HIDDEN = 2048, 7168  # Kimi-K2's expert intermediate and hidden sizes


def chunk_memory(experts: int, chunk: int) -> list[dict]:
    from nvfp4_jax import layer_quant

    weight = jax.ShapeDtypeStruct((INTER, HIDDEN), jnp.bfloat16)
    stack = jax.ShapeDtypeStruct((experts, INTER, HIDDEN), jnp.bfloat16)
    start = jax.ShapeDtypeStruct((), jnp.int32)
    sources = {
        "per-expert arrays": ((weight,) * chunk,) * 2,
        "slices of the stacks": (layer_quant._StackRange(stack, start, chunk),) * 2,
    }
    rows = []
    for name, positions in sources.items():
        m = layer_quant._batch_quantize.lower(positions).compile().memory_analysis()
        rows.append({"chunk": chunk, "experts": experts, "source": name,
                     "argument_GB": m.argument_size_in_bytes / 1e9, "output_GB": m.output_size_in_bytes / 1e9,
                     "temp_GB": m.temp_size_in_bytes / 1e9, "chunk_weights_GB": 2 * chunk * INTER * HIDDEN * 2 / 1e9})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=384)
    ap.add_argument("--chunk", type=int, nargs="+", default=[32, 1])
    args = ap.parse_args()
    for c in args.chunk:
        for row in chunk_memory(args.experts, c):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
