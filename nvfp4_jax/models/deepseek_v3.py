"""DeepSeek-V3 and Kimi-K2 (model_type deepseek_v3 / kimi_k2).

Attention is MLA: q = q_b_proj(q_a_layernorm(q_a_proj(x))) (or q_proj(x) when q_lora_rank is null),
[kv_latent, k_rope] = kv_a_proj_with_mqa(x), k_nope|v = kv_b_proj(kv_a_layernorm(kv_latent)), RoPE
(interleaved pairs when rope_interleave, the default) on the qk_rope_head_dim part only, with yarn
scaling: cos/sin times the yarn attention factor, softmax scale qk_head_dim**-0.5 * mscale(factor,
mscale_all_dim)**2. q_a_layernorm/kv_a_layernorm use eps 1e-6 as in the reference code.

MLP: layers < first_k_dense_replace (and layers with layer % moe_layer_freq != 0) are dense; the others
route with a sigmoid router (float32, weights `mlp.gate.weight`, `mlp.gate.e_score_correction_bias`):
choice score = sigmoid + bias, groups ranked by the sum of their top-2 choice scores, the best
topk_group groups kept, top-k experts among them, weights = sigmoid scores of the chosen experts,
renormalized when norm_topk_prob, times routed_scaling_factor. Shared experts run on every token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .attention import causal_attention
from .family import Family
from .ops import LayerParams, ModelConfigError, activation, gated_mlp, rms_norm
from .rope import apply_rope, apply_rope_interleaved, rope_cos_sin, rope_inv_freq, rope_parameters, yarn_get_mscale

LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm(q_lora_rank) / (kv_lora_rank): default eps, not rms_norm_eps


@dataclasses.dataclass(frozen=True)
class DeepseekSpec:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    eps: float
    act: str
    inv_freq: tuple
    attention_factor: float
    scaling: float
    rope_interleave: bool
    num_experts: int
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float


def _mla(spec: DeepseekSpec, p: LayerParams, x):
    b, s, _ = x.shape
    nope, rope, vdim = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
    if spec.q_lora_rank is None:
        q = p.linear("self_attn.q_proj", x)
    else:
        qa = p.linear("self_attn.q_a_proj", x)
        qa = rms_norm(qa, p["self_attn.q_a_layernorm.weight"], LATENT_NORM_EPS)
        q = p.linear("self_attn.q_b_proj", qa)
    q = q.reshape(b, s, spec.num_heads, nope + rope)
    q_pass, q_rot = q[..., :nope], q[..., nope:]

    ckv = p.linear("self_attn.kv_a_proj_with_mqa", x)
    kv_latent, k_rot = ckv[..., :spec.kv_lora_rank], ckv[..., spec.kv_lora_rank:]
    kv_latent = rms_norm(kv_latent, p["self_attn.kv_a_layernorm.weight"], LATENT_NORM_EPS)
    k_rot = k_rot.reshape(b, s, 1, rope)

    cos, sin = rope_cos_sin(s, spec.inv_freq, spec.attention_factor, x.dtype)
    rope_fn = apply_rope_interleaved if spec.rope_interleave else apply_rope
    q_rot = rope_fn(q_rot, cos, sin)
    k_rot = rope_fn(k_rot, cos, sin)
    query = jnp.concatenate([q_pass, q_rot], axis=-1)

    kv = p.linear("self_attn.kv_b_proj", kv_latent).reshape(b, s, spec.num_heads, nope + vdim)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    key = jnp.concatenate([k_nope, jnp.broadcast_to(k_rot, (b, s, spec.num_heads, rope))], axis=-1)
    out = causal_attention(query, key, v, spec.scaling)
    return p.linear("self_attn.o_proj", out.reshape(b, s, spec.num_heads * vdim))


def _attention_block(spec, p: LayerParams, hidden):
    x = rms_norm(hidden, p["input_layernorm.weight"], spec.eps)
    return (hidden + _mla(spec, p, x)).astype(hidden.dtype)


def route_sigmoid_grouped(spec: DeepseekSpec, x_tokens, gate_w, bias):
    """noaux_tc routing -> (topk_ids int32 [T, k], topk_weights float32 [T, k])."""
    logits = jnp.einsum("tk,ek->te", x_tokens.astype(jnp.float32), gate_w.astype(jnp.float32),
                        preferred_element_type=jnp.float32)
    scores = jax.nn.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    t, e = choice.shape
    g = spec.n_group
    if g > 1:
        per_group = e // g
        grouped = choice.reshape(t, g, per_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, min(2, per_group))[0], axis=-1)
        _, group_idx = jax.lax.top_k(group_scores, spec.topk_group)
        group_mask = jnp.sum(jax.nn.one_hot(group_idx, g, dtype=jnp.int32), axis=1) > 0  # [T, G]
        expert_mask = jnp.repeat(group_mask, per_group, axis=1)
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, spec.top_k)
    w = jnp.take_along_axis(scores, ids, axis=-1)
    if spec.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + jnp.float32(1e-20))
    w = w * jnp.float32(spec.routed_scaling_factor)
    return ids.astype(jnp.int32), w


class DeepseekV3Family(Family):
    name = "deepseek_v3"

    @staticmethod
    def _make_spec(config):
        scoring = config.get("scoring_func", "sigmoid")
        topk_method = config.get("topk_method", "noaux_tc")
        if scoring != "sigmoid" or topk_method != "noaux_tc":
            raise ModelConfigError(
                f"DeepSeek routing scoring_func={scoring!r}, topk_method={topk_method!r} is not supported "
                "(only the DeepSeek-V3/Kimi-K2 router: sigmoid + noaux_tc)")
        heads = int(config["num_attention_heads"])
        kv_heads = config.get("num_key_value_heads") or heads
        if int(kv_heads) != heads:
            raise ModelConfigError(f"MLA expects num_key_value_heads == num_attention_heads, got {kv_heads} vs {heads}")
        nope = int(config.get("qk_nope_head_dim", 128))
        rope = int(config.get("qk_rope_head_dim", 64))
        rp = rope_parameters(config)
        inv_freq, attention_factor = rope_inv_freq(rp, rope, config.get("max_position_embeddings"))
        scaling = (nope + rope) ** -0.5
        if rp.get("rope_type", "default") != "default":
            mscale_all_dim = rp.get("mscale_all_dim", 0)
            if mscale_all_dim:
                mscale = yarn_get_mscale(rp["factor"], mscale_all_dim)
                scaling = scaling * mscale * mscale
        num_experts = int(config.get("n_routed_experts") or config.get("num_local_experts") or 0)
        n_group = int(config.get("n_group") or 1)
        topk_group = int(config.get("topk_group") or 1)
        top_k = int(config.get("num_experts_per_tok") or 0)
        if num_experts:
            if num_experts % n_group:
                raise ModelConfigError(f"n_routed_experts {num_experts} is not divisible by n_group {n_group}")
            if not 0 < topk_group <= n_group:
                raise ModelConfigError(f"topk_group {topk_group} must be in 1..n_group ({n_group})")
            if not 0 < top_k <= num_experts // n_group * topk_group:
                raise ModelConfigError(f"num_experts_per_tok {top_k} exceeds the experts of the kept groups")
        q_lora = config.get("q_lora_rank")
        return DeepseekSpec(
            hidden_size=int(config["hidden_size"]), num_heads=heads,
            q_lora_rank=None if q_lora is None else int(q_lora),
            kv_lora_rank=int(config.get("kv_lora_rank", 512)),
            qk_nope_head_dim=nope, qk_rope_head_dim=rope,
            v_head_dim=int(config.get("v_head_dim") or 128),
            eps=float(config.get("rms_norm_eps", 1e-6)), act=str(config.get("hidden_act", "silu")),
            inv_freq=tuple(float(v) for v in inv_freq), attention_factor=attention_factor,
            scaling=float(scaling), rope_interleave=bool(config.get("rope_interleave", True)),
            num_experts=num_experts, top_k=top_k, n_group=n_group, topk_group=topk_group,
            norm_topk_prob=bool(config.get("norm_topk_prob", True)),
            routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        )

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    def is_moe_layer(self, layer: int) -> bool:
        first_dense = int(self.config.get("first_k_dense_replace") or 0)
        freq = int(self.config.get("moe_layer_freq") or 1)
        return self.spec.num_experts > 0 and layer >= first_dense and layer % freq == 0

    def param_dtype(self, name: str, compute_dtype=jnp.bfloat16):
        # the router runs in float32 (transformers keeps gate.weight and the bias in fp32)
        if name.endswith(".mlp.gate.weight") or name.endswith(".e_score_correction_bias"):
            return jnp.float32
        return compute_dtype

    @staticmethod
    def _dense_layer(spec, p, hidden, sliding_window):
        hidden = _attention_block(spec, p, hidden)
        x = rms_norm(hidden, p["post_attention_layernorm.weight"], spec.eps)
        mlp = gated_mlp(p, "mlp.", x, activation(spec.act))
        return (hidden + mlp).astype(hidden.dtype)

    @staticmethod
    def _moe_pre(spec, p, hidden, sliding_window):
        hidden = _attention_block(spec, p, hidden)
        x = rms_norm(hidden, p["post_attention_layernorm.weight"], spec.eps)
        x_tokens = x.reshape(-1, x.shape[-1])
        ids, w = route_sigmoid_grouped(spec, x_tokens, p["mlp.gate.weight"],
                                       p.optional("mlp.gate.e_score_correction_bias"))
        shared = None
        if "mlp.shared_experts.gate_proj.weight" in p:
            shared = gated_mlp(p, "mlp.shared_experts.", x_tokens, activation(spec.act))
        return hidden, x_tokens, ids, w, shared
