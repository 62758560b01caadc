"""A/B of ``layer_quant.quantize_layer`` in one process: another tree's (e.g. main before a change)
against this tree's, alternately, on the weights a conversion quantized, each with compilations
included (JAX's caches cleared before each), beside the bare-kernel baseline of ``bench convert``.
Same process and alternating, so a shared machine's load hits both alike. Usage:

    PYTHONPATH=. python scripts/ab_quantize_layer.py OTHER_TREE SRC OUT [repeats]

OTHER_TREE: a checkout or ``git archive`` copy whose nvfp4_jax/layer_quant.py is compared (it runs
against this tree's numerics); SRC, OUT: a source checkpoint and a conversion of it (e.g. from
``bench convert --keep``)."""

import importlib.util
import resource
import sys
import time
from pathlib import Path

import jax

from nvfp4_jax import bench, layer_quant


def main():
    other, src, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    spec = importlib.util.spec_from_file_location("layer_quant_other", other / "nvfp4_jax" / "layer_quant.py")
    lq_other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = lq_other  # dataclasses look their module up
    spec.loader.exec_module(lq_other)
    layers = list(bench._quantized_weights_per_layer(src, out))

    def run(fn):
        jax.clear_caches()
        t = time.perf_counter()
        for _, weights in layers:
            fn(weights)
        return time.perf_counter() - t

    def load():
        return open("/proc/loadavg").read().split()[0]

    for rep in range(repeats):
        print(f"rep {rep}: other {run(lq_other.quantize_layer):.2f} s (load {load()})", flush=True)
        print(f"rep {rep}: this {run(layer_quant.quantize_layer):.2f} s (load {load()})", flush=True)
        print(f"rep {rep}: kernels {bench.quantize_kernels_baseline(src, out)['seconds']:.2f} s (load {load()})",
              flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
