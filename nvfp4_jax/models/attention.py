"""Causal attention with the roundings of torch's scaled_dot_product_attention on CPU."""

from __future__ import annotations

import jax.numpy as jnp


def causal_attention(q, k, v, scaling: float, sliding_window: int | None = None):
    """Causal attention as torch's scaled_dot_product_attention computes it on CPU (transformers'
    default "sdpa"): q [B,S,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv] -> [B,S,Hq,Dv].

    Scores q.k accumulate in float32 and are scaled there; exp(s - max) and the row sums stay in
    float32. Then torch's CPU dispatch decides the rounding:

    - Dv == D (flash kernel): the unnormalised probabilities are rounded to the compute dtype for
      the product with v (float32 accumulation), which is divided by the float32 row sum and
      rounded once;
    - Dv != D (MLA: DeepSeek-V3/Kimi; the CPU flash kernel needs equal head dims, so torch takes
      its math path, which upcasts low-precision inputs to float32): the normalised float32
      probabilities times v in float32, rounded once.

    For float32 inputs both are ordinary softmax attention.
    """
    dtype = q.dtype
    _, seq, hq, _ = q.shape
    hkv = k.shape[2]
    if hq != hkv:
        rep = hq // hkv
        k = jnp.repeat(k, rep, axis=2)
        v = jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(scaling)
    qi = jnp.arange(seq)[:, None]
    ki = jnp.arange(seq)[None, :]
    allowed = ki <= qi
    if sliding_window is not None:
        allowed = allowed & (ki > qi - sliding_window)
    scores = jnp.where(allowed[None, None], scores, -jnp.inf)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    row_sum = jnp.sum(p, axis=-1)  # [B,H,Q]
    if v.shape[-1] != q.shape[-1]:  # torch's math path: everything in float32
        probs = p / row_sum[..., None]
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32), preferred_element_type=jnp.float32)
        return out.astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.transpose(row_sum, (0, 2, 1))[..., None]
    return out.astype(dtype)
