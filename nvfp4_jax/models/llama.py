"""Llama / Mistral / Qwen2 / Qwen3 dense decoder (and the attention Qwen3-MoE reuses).

One layer: x + o_proj(attn(rope(q), rope(k), v)) over input_layernorm(x), then
x + down(act(gate(h)) * up(h)) over post_attention_layernorm(x). Qwen3 adds per-head RMSNorm on
q and k before RoPE (q_norm/k_norm); Qwen2 has q/k/v biases; any bias present in the checkpoint
is used. GQA via num_key_value_heads; head_dim from the config when given.

Example (tiny random weights, names as in a checkpoint):

    fam = get_family(config)                       # config: dict from config.json
    h = fam.embed(params, input_ids, dtype=jnp.float32)
    h, stats = fam.layer_forward(0, params, h, dtype=jnp.float32)
    stats.input_amax["model.layers.0.self_attn.q_proj"]   # f32[]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .attention import causal_attention
from .family import Family
from .ops import LayerParams, ModelConfigError, activation, gated_mlp, rms_norm
from .rope import apply_rope, rope_cos_sin, rope_inv_freq, rope_parameters


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    act: str
    inv_freq: tuple
    attention_factor: float
    # MoE fields (Qwen3-MoE reuses this spec)
    num_experts: int = 0
    top_k: int = 0
    norm_topk_prob: bool = False


def llama_spec_fields(config: Mapping[str, Any]) -> dict:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ModelConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = int(config.get("head_dim") or hidden // heads)
    rp = rope_parameters(config)
    inv_freq, attention_factor = rope_inv_freq(rp, head_dim, config.get("max_position_embeddings"))
    return dict(
        hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        eps=float(config.get("rms_norm_eps", 1e-6)), act=str(config.get("hidden_act", "silu")),
        inv_freq=tuple(float(v) for v in inv_freq), attention_factor=attention_factor,
    )


def gqa_attention(spec, p: LayerParams, x, sliding_window):
    """self_attn block on the normed input x [B, S, H]; returns o_proj output [B, S, H]."""
    b, s, _ = x.shape
    q = p.linear("self_attn.q_proj", x).reshape(b, s, -1, spec.head_dim)
    k = p.linear("self_attn.k_proj", x).reshape(b, s, -1, spec.head_dim)
    v = p.linear("self_attn.v_proj", x).reshape(b, s, -1, spec.head_dim)
    if "self_attn.q_norm.weight" in p:  # Qwen3: RMSNorm over head_dim before RoPE
        q = rms_norm(q, p["self_attn.q_norm.weight"], spec.eps)
        k = rms_norm(k, p["self_attn.k_norm.weight"], spec.eps)
    cos, sin = rope_cos_sin(s, spec.inv_freq, spec.attention_factor, x.dtype)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    out = causal_attention(q, k, v, spec.head_dim ** -0.5, sliding_window)
    return p.linear("self_attn.o_proj", out.reshape(b, s, -1))


def attention_block(spec, p: LayerParams, hidden, sliding_window):
    x = rms_norm(hidden, p["input_layernorm.weight"], spec.eps)
    return (hidden + gqa_attention(spec, p, x, sliding_window)).astype(hidden.dtype)


class LlamaFamily(Family):
    """Llama, Mistral, Qwen2, Qwen3 (dense)."""

    name = "llama"

    @staticmethod
    def _make_spec(config):
        return LlamaSpec(**llama_spec_fields(config))

    @staticmethod
    def _dense_layer(spec, p, hidden, sliding_window):
        hidden = attention_block(spec, p, hidden, sliding_window)
        x = rms_norm(hidden, p["post_attention_layernorm.weight"], spec.eps)
        mlp = gated_mlp(p, "mlp.", x, activation(spec.act))
        return (hidden + mlp).astype(hidden.dtype)

    def sliding_window(self, layer: int) -> int | None:
        return sliding_window_for(self.config, layer)


def sliding_window_for(config: Mapping[str, Any], layer: int) -> int | None:
    """The attention window of `layer` as transformers applies it (None: plain causal)."""
    model_type = config.get("model_type")
    window = config.get("sliding_window")
    if window is None:
        return None
    if model_type == "mistral":
        return int(window)
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        if not config.get("use_sliding_window", False):
            return None
        layer_types = config.get("layer_types")
        if model_type == "qwen3_moe" and not layer_types:
            return int(window)
        if not layer_types:
            max_window_layers = config.get("max_window_layers", 28)
            return int(window) if layer >= max_window_layers else None
        return int(window) if layer_types[layer] == "sliding_attention" else None
    return None
