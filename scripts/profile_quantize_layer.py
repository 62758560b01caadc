"""Where the quantize phase of a Kimi-K2-shaped MoE layer spends its time: the whole
``layer_quant.quantize_layer`` call (the phase minus input scales) against its steps timed one by
one with a device sync after each (a weight amax pass alone, the reconstruction error over all
rows and over the sampled rows the phase uses, the one device-to-host transfer, the numpy views), and the kernel alone
(numerics.quantize of each chunk, stacked where a chunk has several weights).
Times of the 2nd and 3rd call (compilations excluded). Usage:
python scripts/profile_quantize_layer.py [workdir] [experts] (builds the source there)."""

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import layer_quant, numerics
from nvfp4_jax.checkpoint.layout import get_layout
from nvfp4_jax.checkpoint.reader import CheckpointReader
from nvfp4_jax.examples import build_kimi_k2_shaped
from nvfp4_jax.models import get_family


def timed(fn, repeats=3):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(round(time.perf_counter() - t, 4))
    return out[1:]


def main():
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/profq")
    experts = int(sys.argv[2]) if len(sys.argv) > 2 else 384
    src = work / f"src-E{experts}"
    if not src.is_dir():
        build_kimi_k2_shaped(src, layers=2, experts=experts)
    reader = CheckpointReader(src)
    fam = get_family(reader.config)
    params = fam.read_layer(reader, 1, dtype=jnp.bfloat16)
    weights = {n[:-len(".weight")]: v for n, v in params.items()
               if n.endswith(".weight") and v.ndim == 2 and "layernorm" not in n and ".gate." not in n}
    jax.block_until_ready(weights)
    gb = sum(v.size * v.dtype.itemsize for v in weights.values()) / 1e9
    groups = get_layout(reader.config).fused_groups(sorted(weights))
    singles = layer_quant.fused_batches(weights, layer_quant.fused_groups(sorted(weights)), layer_quant.chunk_bytes())
    stacked = [tuple(weights[m] for (m,) in b) for b in singles]
    kernel = jax.jit(lambda ws, a: numerics.quantize(ws[0] if len(ws) == 1 else jnp.stack(ws), a, check=False))
    error = jax.jit(lambda ws, r: numerics.squared_error(ws[0] if len(ws) == 1 else jnp.stack(ws), r))
    rows = {"linears": len(weights), "bf16_GB": round(gb, 2), "batches_of_lone_weights": len(singles)}
    rows["quantize_layer_s"] = timed(lambda: layer_quant.quantize_layer(weights, groups))
    rows["amax_alone_s"] = timed(lambda: [layer_quant._batch_amax((ws,)) for ws in stacked])
    amax = [a[0] if len(ws) > 1 else a[0, 0] for ws, a in zip(stacked, (layer_quant._batch_amax((ws,)) for ws in stacked))]
    rows["quantize_kernels_s"] = timed(lambda: [kernel(ws, a) for ws, a in zip(stacked, amax)])
    q = [kernel(ws, a) for ws, a in zip(stacked, amax)]
    rows["error_all_rows_s"] = timed(lambda: [error(ws, r) for ws, r in zip(stacked, q)])
    rows["error_sampled_rows_s"] = timed(lambda: [layer_quant._batch_error(ws, r) for ws, r in zip(stacked, q)])
    rows["device_get_s"] = timed(lambda: jax.device_get(q))
    host = jax.device_get(q)
    rows["numpy_views_s"] = timed(lambda: [np.asarray(r.weight[j]) if r.weight.ndim == 3 else np.asarray(r.weight)
                                           for r in host for j in range(r.weight.shape[0] if r.weight.ndim == 3 else 1)])
    single = jax.jit(lambda w, a: numerics.quantize(w, a, check=False))
    one = stacked[0][0]
    rows["one_weight_quantize_s"] = timed(lambda: single(one, jnp.float32(1.0)))
    print(json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
