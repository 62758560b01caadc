"""Tiny random Hugging Face checkpoints, written by transformers' own save_pretrained.

Each maker builds a transformers model from a small config, gives every tensor random values large
enough to make attention and routing non-trivial (norm weights around 1, a random DeepSeek
e_score_correction_bias), saves it to `path` and returns the path. `load_params` reads the
safetensors back into a dict keyed by checkpoint names, as the pipeline's reader would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 128
HIDDEN = 64


def _randomize(model, seed: int, std: float = 0.08):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith(".bias"):
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(std * torch.randn(t.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def _save(model, path: Path, extra_config: dict | None = None) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    if extra_config:
        cfg_file = path / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(extra_config)
        cfg_file.write_text(json.dumps(cfg, indent=2))
    return path


def make_llama(path, *, seed=0) -> Path:
    """Llama with GQA, llama3 rope scaling, explicit head_dim, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
    )
    return _save(_randomize(LlamaForCausalLM(cfg), seed), path)


def make_qwen2(path, *, seed=1) -> Path:
    """Qwen2: q/k/v biases, GQA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return _save(_randomize(Qwen2ForCausalLM(cfg), seed), path)


def make_qwen3(path, *, seed=2) -> Path:
    """Qwen3 dense: q_norm/k_norm, head_dim != hidden/heads, GQA."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return _save(_randomize(Qwen3ForCausalLM(cfg), seed), path)


def make_qwen3_moe(path, *, seed=3) -> Path:
    """Qwen3-MoE: 3 layers, layer 1 dense via mlp_only_layers, 8 experts top-2, norm_topk_prob."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[1], max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return _save(_randomize(Qwen3MoeForCausalLM(cfg), seed), path)


def make_deepseek_v3(path, *, seed=4, model_type="deepseek_v3", q_lora_rank=48) -> Path:
    """DeepSeek-V3: MLA with q_lora, layer 0 dense, 2 MoE layers, 8 experts in 4 groups (top-2
    groups, top-3 experts), shared expert, yarn rope with mscale. Engine keys added to config.json."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_rope_head_dim=16,
        v_head_dim=24, qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=3,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=256, num_mtp_layers=0, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
    )
    extra = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1}
    if model_type != "deepseek_v3":
        extra["model_type"] = model_type
    return _save(_randomize(DeepseekV3ForCausalLM(cfg), seed), path, extra)


def read_config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def load_params(path, family, dtype) -> dict:
    """Every tensor of the checkpoint at `path`, keyed by its name, cast to
    family.param_dtype(name, dtype) (routers may stay float32)."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    params = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        for name, arr in load_file(str(f)).items():
            params[name] = jnp.asarray(arr.astype(np.float32)).astype(family.param_dtype(name, dtype))
    return params


def tensor_digest(path) -> str:
    """sha256 over every tensor of the safetensors files at `path` (name, dtype, shape, raw bytes,
    names sorted), read from the file format itself: equal digests mean equal checkpoints whatever
    the header's layout. Goldens made from a seeded fixture store it to detect a changed fixture."""
    import hashlib
    import struct

    h = hashlib.sha256()
    entries = []
    for f in sorted(Path(path).glob("*.safetensors")):
        data = f.read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
        base = 8 + header_len
        for name, meta in header.items():
            if name != "__metadata__":
                start, stop = meta["data_offsets"]
                entries.append((name, meta["dtype"], meta["shape"], data[base + start:base + stop]))
    for name, dtype, shape, raw in sorted(entries, key=lambda e: e[0]):
        h.update(f"{name}|{dtype}|{shape}|".encode())
        h.update(raw)
    return h.hexdigest()
