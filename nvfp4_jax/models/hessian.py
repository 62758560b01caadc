"""Block second moments of linear inputs, the statistic of ``--weight-scales local-hessian``
(docs/SPEC.md section 10.4): for a linear whose input rows are ``x_t`` ``[K]``, per block of 16 input
columns ``b``, ``sum_t x_t[16b:16b+16] x_t[16b:16b+16]^T`` in float32, ``[K/16, 16, 16]``.

Sums, not means: batches (and experts' rows) are merged by adding, and the mean is taken once at the
end with the token count. Only collected when a forward asks for it, so max runs pay nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 16
# rows of routed-expert inputs whose outer products are materialised at once: bounds the temporary
# [rows, K/16, 16, 16] float32 array (1024 rows of K = 7168: 470 MB)
EXPERT_ROW_TILE = 1024
_HIGHEST = jax.lax.Precision.HIGHEST


def _blocks(x: jax.Array) -> jax.Array:
    k = x.shape[-1]
    return x.reshape(-1, k // BLOCK, BLOCK).astype(jnp.float32)


def block_second_moment_sum(x: jax.Array) -> jax.Array:
    """``[K/16, 16, 16]`` sum over every row of ``x`` ``[..., K]`` (K a multiple of 16)."""
    xb = _blocks(x)
    return jnp.einsum("tbi,tbj->bij", xb, xb, precision=_HIGHEST)


def expert_block_second_moment_sum(x: jax.Array, expert: jax.Array, num_experts: int) -> jax.Array:
    """``[E, K/16, 16, 16]``: the sum of each expert's rows of ``x`` ``[R, K]``; ``expert`` ``[R]``
    int32 names each row's expert, rows with an id outside ``[0, E)`` are left out. Rows are taken a
    tile at a time so the temporary outer products stay at EXPERT_ROW_TILE rows."""
    r, k = x.shape
    if k % BLOCK:  # no statistic for such a linear (it is never quantized)
        return jnp.zeros((num_experts, 0, BLOCK, BLOCK), jnp.float32)
    expert = jnp.where((expert >= 0) & (expert < num_experts), expert, num_experts).astype(jnp.int32)
    tiles = max(1, -(-r // EXPERT_ROW_TILE))
    pad = tiles * EXPERT_ROW_TILE - r
    xb = jnp.pad(_blocks(x), ((0, pad), (0, 0), (0, 0))).reshape(tiles, EXPERT_ROW_TILE, k // BLOCK, BLOCK)
    ids = jnp.pad(expert, (0, pad), constant_values=num_experts).reshape(tiles, EXPERT_ROW_TILE)

    def add_tile(acc, tile):
        xt, it = tile
        outer = xt[:, :, :, None] * xt[:, :, None, :]  # exact products, summed per expert below
        return acc + jax.ops.segment_sum(outer, it, num_segments=num_experts), None

    init = jnp.zeros((num_experts, k // BLOCK, BLOCK, BLOCK), jnp.float32)
    return jax.lax.scan(add_tile, init, (xb, ids))[0]


__all__ = ["block_second_moment_sum", "expert_block_second_moment_sum", "EXPERT_ROW_TILE"]
