"""Small source checkpoints for the checkpoint tests, written with independent tools.

- bf16: torch tensors saved with safetensors.torch (optionally sharded with an index);
- FP8 block: DeepSeek-V3 layout, quantized here with torch's float8_e4m3fn cast;
- INT4: a tiny torch model quantized and packed by the compressed-tensors package itself
  (apply_quantization_config + ModelCompressor.compress_model + update_config), exactly the way a
  Kimi-K2-Thinking-style checkpoint is produced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_FILES = {
    "tokenizer_config.json": '{"model_max_length": 128}',
    "generation_config.json": '{"do_sample": false}',
    "modeling_tiny.py": "# remote code\n",
}


def write_checkpoint(path, tensors: dict[str, torch.Tensor], config: dict, *, num_shards: int = 1,
                     extra_files: dict[str, str] | None = None) -> Path:
    """Save tensors as an HF checkpoint (one file, or num_shards files plus an index)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in (extra_files if extra_files is not None else TOKENIZER_FILES).items():
        (path / name).write_text(text)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if num_shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    weight_map = {}
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::num_shards]}
        save_file(part, path / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return path


def tiny_config(**extra) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "num_hidden_layers": 1, "vocab_size": 32}
    cfg.update(extra)
    return cfg


def bf16_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "model.embed_tokens.weight": torch.randn(32, 64, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.rand(64, generator=g).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g).bfloat16(),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(96, 64, generator=g).bfloat16(),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 96, generator=g).bfloat16(),
        "model.norm.weight": torch.rand(64, generator=g).to(torch.float32),
        "lm_head.weight": torch.randn(32, 64, generator=g).to(torch.float16),
    }
    return t


def make_bf16_checkpoint(path, *, num_shards: int = 1, seed: int = 0) -> Path:
    return write_checkpoint(path, bf16_tensors(seed), tiny_config(), num_shards=num_shards)


def fp8_block_quantize(w: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3-style block FP8: returns (fp8 [N, K], scale_inv f32 [ceil(N/bn), ceil(K/bk)])."""
    n, k = w.shape
    bn, bk = block
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    scale = torch.empty(nb, kb, dtype=torch.float32)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    wf = w.float()
    for i in range(nb):
        for j in range(kb):
            blk = wf[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def make_fp8_checkpoint(path, *, shape=(300, 200), seed: int = 0, num_shards: int = 2) -> Path:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 1, shape[1])  # varied block ranges
    q, s = fp8_block_quantize(w)
    tensors = {
        "model.layers.0.mlp.down_proj.weight": q,
        "model.layers.0.mlp.down_proj.weight_scale_inv": s,
        "model.layers.0.mlp.gate.weight": torch.randn(8, shape[1], generator=g).bfloat16(),
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(8, generator=g),
        "model.norm.weight": torch.rand(shape[1], generator=g).bfloat16(),
    }
    cfg = tiny_config(
        model_type="deepseek_v3",
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "weight_block_size": [128, 128]},
    )
    return write_checkpoint(path, tensors, cfg, num_shards=num_shards)


class _Tree(torch.nn.Module):
    """Module tree whose named_modules() follow dotted checkpoint names."""

    def add(self, dotted: str, module: torch.nn.Module):
        parent = self
        parts = dotted.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, _Tree())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], module)


INT4_EXPERT_SHAPES = {"gate_proj": (40, 96), "up_proj": (40, 96), "down_proj": (96, 40 + 24)}


def make_int4_checkpoint(path, *, num_experts: int = 2, seed: int = 0, num_shards: int = 1) -> Path:
    """Kimi-K2-Thinking-like checkpoint: routed experts int4 pack-quantized (group 32, symmetric)
    by compressed-tensors; attention, shared expert and lm_head left bf16 through the ignore list.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    g = torch.Generator().manual_seed(seed)
    model = _Tree()
    for e in range(num_experts):
        for proj, (n, k) in INT4_EXPERT_SHAPES.items():
            model.add(f"model.layers.1.mlp.experts.{e}.{proj}", torch.nn.Linear(k, n, bias=False))
    model.add("model.layers.1.mlp.shared_experts.down_proj", torch.nn.Linear(96, 64, bias=False))
    model.add("model.layers.1.self_attn.o_proj", torch.nn.Linear(64, 64, bias=False))
    model.add("lm_head", torch.nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.to(torch.bfloat16)

    qc = QuantizationConfig(
        config_groups={
            "group_0": QuantizationScheme(
                targets=["Linear"],
                weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                                         group_size=32, dynamic=False),
            )
        },
        ignore=["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*"],
        format="pack-quantized",
    )
    apply_quantization_config(model, qc, show_progress=False)
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "weight_scale"):
                w = m.weight.float()
                n, k = w.shape
                grouped = torch.nn.functional.pad(w, (0, (-k) % 32)).view(n, -1, 32)
                # a little less than amax/7 so some values clamp at the edge of the int4 range
                scale = (grouped.abs().amax(-1) / 6.5).clamp(min=1e-4)
                m.weight_scale.copy_(scale.to(m.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state["model.norm.weight"] = torch.rand(64, generator=g).bfloat16()
    cfg = tiny_config(model_type="kimi_k2")
    path = write_checkpoint(path, state, cfg, num_shards=num_shards)
    compressor.update_config(str(path))  # the package writes its own quantization_config
    return path
