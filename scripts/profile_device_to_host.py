"""Device-to-host transfer rates for a quantized MoE layer's worth of results (about 9.5 GB for
Kimi-K2: 25 chunks of uint8 codes and fp8 scales): one jax.device_get of everything, the same
after copy_to_host_async on every array, and threads fetching arrays one each. Fresh arrays per
way (a fetched jax.Array caches its host copy). Usage: python scripts/profile_device_to_host.py [GB]"""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np


def fresh(total_gb: float, parts: int = 25):
    n = int(total_gb * 1e9 / parts)
    key = jax.random.PRNGKey(0)
    return [jax.random.randint(jax.random.fold_in(key, i), (n,), 0, 255, jnp.int32).astype(jnp.uint8)
            for i in range(parts)]


def run(way: str, arrays) -> float:
    jax.block_until_ready(arrays)
    t = time.perf_counter()
    if way == "device_get":
        jax.device_get(arrays)
    elif way == "async_then_get":
        for a in arrays:
            a.copy_to_host_async()
        [np.asarray(a) for a in arrays]
    else:
        with ThreadPoolExecutor(int(way.split("_")[1])) as pool:
            list(pool.map(np.asarray, arrays))
    return time.perf_counter() - t


def main():
    gb = float(sys.argv[1]) if len(sys.argv) > 1 else 9.5
    rows = {}
    for way in ("device_get", "async_then_get", "threads_4", "threads_16", "device_get"):
        arrays = fresh(gb)
        s = run(way, arrays)
        rows.setdefault(way, []).append({"s": round(s, 3), "GBps": round(gb / s, 2)})
        del arrays
    print(json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
