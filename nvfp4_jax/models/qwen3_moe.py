"""Qwen3-MoE: Qwen3 attention (q/k norms, GQA) with a softmax top-k routed MLP.

A layer is MoE when it is not in mlp_only_layers, num_experts > 0 and
(layer + 1) % decoder_sparse_step == 0; other layers use a dense MLP of intermediate_size.
Router (mlp.gate, not quantized): logits = linear(x, gate) in the compute dtype, softmax in float32,
top-k, optional renormalization (norm_topk_prob), weights rounded to the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .ops import ModelConfigError, linear, rms_norm
from .llama import LlamaFamily, LlamaSpec, attention_block, llama_spec_fields


class Qwen3MoeFamily(LlamaFamily):
    name = "qwen3_moe"

    @staticmethod
    def _make_spec(config):
        # transformers 5 may write num_local_experts with "num_experts": null
        num_experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
        top_k = int(config.get("num_experts_per_tok") or 0)
        if num_experts and not 0 < top_k <= num_experts:
            raise ModelConfigError(f"num_experts_per_tok {top_k} must be in 1..num_experts ({num_experts})")
        return LlamaSpec(**llama_spec_fields(config), num_experts=num_experts, top_k=top_k,
                         norm_topk_prob=bool(config.get("norm_topk_prob", False)))

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    def is_moe_layer(self, layer: int) -> bool:
        mlp_only = self.config.get("mlp_only_layers") or []
        step = int(self.config.get("decoder_sparse_step", 1) or 1)
        return layer not in mlp_only and self.spec.num_experts > 0 and (layer + 1) % step == 0

    @staticmethod
    def _moe_pre(spec, p, hidden, sliding_window):
        hidden = attention_block(spec, p, hidden, sliding_window)
        x = rms_norm(hidden, p["post_attention_layernorm.weight"], spec.eps)
        x_tokens = x.reshape(-1, x.shape[-1])
        logits = linear(x_tokens, p["mlp.gate.weight"])
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top_w, top_ids = jax.lax.top_k(probs, spec.top_k)
        if spec.norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        top_w = top_w.astype(hidden.dtype)
        return hidden, x_tokens, top_ids.astype(jnp.int32), top_w, None
