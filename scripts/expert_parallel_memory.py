"""Per-device memory of the expert-parallel forward of one Kimi-K2 MoE layer, from XLA's compiled
memory analysis (compile only: no tensor is allocated, so the real 384-expert layer fits any host).

    XLA_FLAGS=--xla_force_host_platform_device_count=32 JAX_PLATFORMS=cpu \\
        python scripts/expert_parallel_memory.py --devices 8 16 32 --experts 384 --tokens 2048

For each device count D: the compiled program's per-device argument bytes (E/D experts + the
replicated part + the device's rows), output and temporary bytes (XLA:CPU's; a TPU compile differs
in temporaries, not in arguments), and the same figures from the tensor shapes, as JSON lines.

XLA:CPU has no ragged-dot instruction: JAX lowers ``ragged_dot`` there by expanding the rows to
``[G, M, K]`` (every row once per group, masked), a temporary of G x the sorted rows that XLA:TPU,
which lowers ``ragged_dot`` to its own instruction, does not have. ``--ragged native-estimate``
compiles instead with a stand-in of the same output (``[M, N]``, one plain dot of the rows
against the sum over the block's experts, so every weight is read as the real one reads it) for
the temporaries a native ragged dot leaves: an estimate of the TPU figure, not a measurement.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def layer_memory(num_devices: int, experts: int, tokens_per_device: int) -> dict:
    from nvfp4_jax import examples, expert_parallel
    from nvfp4_jax.models import get_family

    cfg = examples.kimi_k2_shaped_config(layers=2, experts=experts, vocab=163840)
    family = get_family(cfg)
    mesh = expert_parallel.expert_mesh(jax.devices()[:num_devices])
    blocks = expert_parallel.ExpertBlocks(experts, num_devices)
    layer, dtype = 1, jnp.bfloat16
    prefix = family.layer_prefix(layer)
    replicated = NamedSharding(mesh, P())
    rest = {}
    for t in examples.kimi_k2_tensors(cfg):
        if t.name.startswith(prefix) and expert_parallel.expert_of(t.name, prefix) is None:
            rest[t.name] = jax.ShapeDtypeStruct(t.shape, family.param_dtype(t.name, dtype), sharding=replicated)
    h, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    split = NamedSharding(mesh, P(expert_parallel.AXIS))
    stacks = (jax.ShapeDtypeStruct((blocks.padded, inter, h), dtype, sharding=split),
              jax.ShapeDtypeStruct((blocks.padded, inter, h), dtype, sharding=split),
              jax.ShapeDtypeStruct((blocks.padded, h, inter), dtype, sharding=split))
    hidden = jax.ShapeDtypeStruct((num_devices, tokens_per_device, h), dtype, sharding=split)
    sig = (tuple(sorted((k, tuple(v.shape), jnp.dtype(v.dtype).name) for k, v in rest.items())),
           tuple((tuple(s.shape), jnp.dtype(s.dtype).name) for s in stacks))
    fn = expert_parallel._forward_fn(family, layer, mesh, dtype, sig, False)
    ma = fn.lower(rest, stacks, hidden).compile().memory_analysis()
    nbytes = lambda s: int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize  # noqa: E731
    return {"devices": num_devices, "experts": experts, "experts_per_device": blocks.per_device,
            "tokens_per_device": tokens_per_device,
            "argument_bytes": int(ma.argument_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
            "temp_bytes": int(ma.temp_size_in_bytes),
            "shapes_experts_per_device": sum(nbytes(s) for s in stacks) // num_devices,
            "shapes_replicated": sum(nbytes(v) for v in rest.values()),
            "shapes_rows_per_device": tokens_per_device * h * 2}


def _native_ragged_standin(x, w, sizes, dtype):
    """The buffers of a native ragged dot (output [M, N], every group's weights read), not its
    arithmetic (memory estimates)."""
    return jnp.einsum("mk,gnk->mn", x, w, preferred_element_type=jnp.float32).astype(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[8])
    ap.add_argument("--experts", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens per device per forward")
    ap.add_argument("--ragged", choices=("xla-cpu", "native-estimate"), default="xla-cpu",
                    help="compile ragged_dot as XLA:CPU lowers it, or the native-instruction estimate")
    args = ap.parse_args()
    if args.ragged == "native-estimate":
        from nvfp4_jax.models import moe

        moe._ragged_matmul = _native_ragged_standin
    for d in args.devices:
        print(json.dumps({"ragged": args.ragged, **layer_memory(d, args.experts, args.tokens)}), flush=True)


if __name__ == "__main__":
    main()
