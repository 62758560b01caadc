"""Device bytes of one quantize call of a Kimi-K2 MoE layer's routed experts, from XLA's compiled
memory analysis (compile only: nothing is allocated, so the real 384-expert layer fits any host).

    JAX_PLATFORMS=cpu python scripts/quantize_chunk_memory.py [--experts 384] [--chunk 64 1]

For each chunk size C (64: layer_quant.ACCELERATOR_CHUNK_BYTES of Kimi experts; 1: the CPU chunk),
the ``max`` quantize program (``layer_quant._chunk_quantize``: quantize plus squared error) of C
gate projections [2048, 7168] bf16 compiled two ways: from C per-expert arrays (the path without
held stacks, which stacks them inside the program) and from the layer's gate stack [E, 2048, 7168]
(layer_quant.WeightStack: a slice of it inside the program). One JSON line each: argument, output
and temporary bytes. XLA:CPU's temporaries; an accelerator's compile may fuse differently.
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
    amax = jax.ShapeDtypeStruct(() if chunk == 1 else (chunk,), jnp.float32)
    stack = jax.ShapeDtypeStruct((experts, INTER, HIDDEN), jnp.bfloat16)
    sources = {
        "per-expert arrays": (weight,) * chunk,
        "slice of the stack": layer_quant._StackRange(stack, jax.ShapeDtypeStruct((), jnp.int32), chunk),
    }
    rows = []
    for name, source in sources.items():
        m = layer_quant._chunk_quantize.lower(source, amax).compile().memory_analysis()
        rows.append({"chunk": chunk, "experts": experts, "source": name,
                     "argument_GB": m.argument_size_in_bytes / 1e9, "output_GB": m.output_size_in_bytes / 1e9,
                     "temp_GB": m.temp_size_in_bytes / 1e9, "chunk_weights_GB": chunk * INTER * HIDDEN * 2 / 1e9})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=384)
    ap.add_argument("--chunk", type=int, nargs="+", default=[64, 1])
    args = ap.parse_args()
    for c in args.chunk:
        for row in chunk_memory(args.experts, c):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
