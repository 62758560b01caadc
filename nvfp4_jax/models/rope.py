"""Rotary position embeddings as transformers 5 computes them: the tables in float32, rounded to
the compute dtype before use."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .ops import ModelConfigError


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE parameters of a raw config.json, standardized as transformers 5 does.

    Accepts transformers 5 `rope_parameters` and older `rope_scaling` + `rope_theta` layouts.
    """
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rp = dict(rp)
    if any(isinstance(v, dict) for v in rp.values()):
        raise ModelConfigError("per-layer-type rope_parameters are not supported by this model family")
    rp.setdefault("rope_type", rp.get("type", "default"))
    rp.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in config and config["partial_rotary_factor"] is not None:
        rp.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if rp["rope_type"] in ("llama3", "yarn", "longrope"):
        if config.get("original_max_position_embeddings") is not None:
            rp["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        else:
            rp.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return rp


def _f32(v) -> np.float32:
    return np.float32(v)


def rope_inv_freq(rp: Mapping[str, Any], head_dim: int, max_position_embeddings: int | None):
    """(inv_freq float32 [dim/2], attention_factor) as transformers' ROPE_INIT_FUNCTIONS compute them.

    Supported rope_type: default, linear, llama3, yarn (dynamic only below max_position_embeddings,
    where it equals default).
    """
    rope_type = rp["rope_type"]
    base = float(rp["rope_theta"])
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    exponents = np.arange(0, dim, 2).astype(np.float32) / _f32(dim)
    pos_freqs = (_f32(base) ** exponents).astype(np.float32)
    inv_freq = (_f32(1.0) / pos_freqs).astype(np.float32)
    attention_factor = 1.0

    if rope_type in ("default", "dynamic"):
        pass
    elif rope_type == "linear":
        inv_freq = (inv_freq / _f32(rp["factor"])).astype(np.float32)
    elif rope_type == "llama3":
        factor = float(rp["factor"])
        low_freq_factor = float(rp["low_freq_factor"])
        high_freq_factor = float(rp["high_freq_factor"])
        old_context_len = float(rp["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = (_f32(2 * math.pi) / inv_freq).astype(np.float32)
        inv_freq_llama = np.where(wavelen > _f32(low_freq_wavelen), inv_freq / _f32(factor), inv_freq)
        inv_freq_llama = inv_freq_llama.astype(np.float32)
        smooth = ((_f32(old_context_len) / wavelen - _f32(low_freq_factor))
                  / _f32(high_freq_factor - low_freq_factor)).astype(np.float32)
        smoothed = ((_f32(1) - smooth) * inv_freq_llama / _f32(factor) + smooth * inv_freq_llama)
        is_medium = ~(wavelen < _f32(high_freq_wavelen)) & ~(wavelen > _f32(low_freq_wavelen))
        inv_freq = np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)
    elif rope_type == "yarn":
        factor = rp.get("factor")
        original = rp["original_max_position_embeddings"]
        if factor is None:
            factor = max_position_embeddings / original
        factor = float(factor)
        attention_factor = rp.get("attention_factor")
        mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
            else:
                attention_factor = yarn_get_mscale(factor)
        beta_fast = rp.get("beta_fast") or 32
        beta_slow = rp.get("beta_slow") or 1

        def correction_dim(num_rotations):
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rp.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((np.arange(dim // 2).astype(np.float32) - _f32(low)) / _f32(high - low)).astype(np.float32)
        ramp = np.clip(ramp, 0, 1).astype(np.float32)
        extrapolation_factor = (_f32(1) - ramp).astype(np.float32)
        inv_extra = (_f32(1.0) / pos_freqs).astype(np.float32)
        inv_inter = (_f32(1.0) / (_f32(factor) * pos_freqs)).astype(np.float32)
        inv_freq = (inv_inter * (_f32(1) - extrapolation_factor) + inv_extra * extrapolation_factor)
        inv_freq = inv_freq.astype(np.float32)
    else:
        raise ModelConfigError(
            f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3, yarn)"
        )
    return inv_freq, float(attention_factor)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_cos_sin(seq_len: int, inv_freq: Sequence[float], attention_factor: float, dtype):
    """cos, sin [S, dim] for positions 0..S-1: float32 tables rounded to the compute dtype."""
    inv = jnp.asarray(np.asarray(inv_freq, dtype=np.float32))
    pos = jnp.arange(seq_len, dtype=jnp.float32)
    freqs = pos[:, None] * inv[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = (jnp.cos(emb) * jnp.float32(attention_factor)).astype(dtype)
    sin = (jnp.sin(emb) * jnp.float32(attention_factor)).astype(dtype)
    return cos, sin


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split RoPE on x [B, S, H, D] with cos/sin [S, D] (rotary part may be D' < D: partial)."""
    rot = cos.shape[-1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    if rot == x.shape[-1]:
        return x * c + _rotate_half(x) * s
    xr, xp = x[..., :rot], x[..., rot:]
    return jnp.concatenate([xr * c + _rotate_half(xr) * s, xp], axis=-1)


def apply_rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """DeepSeek's interleaved-pair RoPE, laid out as transformers' apply_rotary_pos_emb_interleave:
    output = [x_even*cos - x_odd*sin, x_odd*cos + x_even*sin] (de-interleaved)."""
    half = cos.shape[-1] // 2
    c, s = cos[None, :, None, :half], sin[None, :, None, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

