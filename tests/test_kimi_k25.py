"""Kimi-K2.5/K2.6/K2.7 as Moonshot ships them (KimiK25ForConditionalGeneration), end to end.

The wrapper's text model must come out exactly as the same text model laid out as plain Kimi-K2
(both built from one seed): that checks the names, the calibration forward on ``text_config`` and
the quantization independently of how they are implemented. The vision tower and projector must be
the source's bytes. The exclude list is checked against the engines' name mappings written out here
from their ``kimi_k25.py``, not taken from the code under test.
"""

import json
import re
import shutil
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nvfp4_jax import examples
from nvfp4_jax.checkpoint.layout import sglang_match, vllm_match
from nvfp4_jax.checkpoint.reader import CheckpointReader
from nvfp4_jax.checkpoint.safetensors_io import CheckpointError
from nvfp4_jax.pipeline import ConvertOptions, convert
from nvfp4_jax.plan import build_plan
from nvfp4_jax.verify import verify

SEED = 3
TEXT = "language_model."
PASSTHROUGH = ("vision_tower.", "mm_projector.")


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(d.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(K2.5 source, K2.5 output, plain Kimi-K2 output) from one seed and one set of tokens."""
    d = tmp_path_factory.mktemp("k25")
    k25 = examples.build_kimi_k25_tiny(d / "k25", seed=SEED)
    k2 = examples.build_kimi_k2_tiny(d / "k2", seed=SEED)
    assert not (k25 / "tokenizer.json").exists()  # Moonshot's file set: tiktoken only
    tokens = examples.calibration_samples(k25, 2, 16)
    assert tokens == examples.calibration_samples(k2, 2, 16)
    convert(k25, d / "k25-out", ConvertOptions(calib_tokens=tokens, progress=False))
    convert(k2, d / "k2-out", ConvertOptions(calib_tokens=tokens, progress=False))
    return k25, d / "k25-out", d / "k2-out"


def test_source_layout_is_moonshots(built):
    src, _, _ = built
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == ["KimiK25ForConditionalGeneration"] and cfg["model_type"] == "kimi_k25"
    assert "quantization_config" not in cfg and cfg["text_config"]["quantization_config"]["quant_method"] == \
        "compressed-tensors"
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert all(re.fullmatch(r"model-\d{5}-of-\d{6}\.safetensors", s) for s in shards)
    for root in PASSTHROUGH:  # one shard holds each of them, and nothing else
        files = {f for n, f in weight_map.items() if n.startswith(root)}
        assert len(files) == 1 and {n for n, f in weight_map.items() if f in files} == {
            n for n in weight_map if n.startswith(root)}
    head = {weight_map[TEXT + n] for n in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight")}
    assert len(head) == 1
    for name in ("configuration_kimi_k25.py", "modeling_kimi_k25.py", "kimi_k25_processor.py",
                 "preprocessor_config.json", "tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (src / name).exists(), name


def test_vision_and_projector_are_the_source_bytes(built):
    src, out, _ = built
    before, after = _tensors(src), _tensors(out)
    passthrough = [n for n in before if n.startswith(PASSTHROUGH)]
    assert any(n.startswith("vision_tower.encoder.blocks.") for n in passthrough)
    assert "mm_projector.proj.2.bias" in passthrough
    assert sorted(n for n in after if n.startswith(PASSTHROUGH)) == sorted(passthrough)
    for n in passthrough:
        assert after[n].dtype == before[n].dtype and after[n].shape == before[n].shape, n
        assert _bytes(after[n]) == _bytes(before[n]), n
    exclude = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    for n in passthrough:
        module = n.rsplit(".", 1)[0]
        assert any(fnmatchcase(module, e) for e in exclude), module


def test_text_model_quantized_exactly_like_plain_kimi_k2(built):
    _, out, plain = built
    ours, theirs = _tensors(out), _tensors(plain)
    text = {n[len(TEXT):]: t for n, t in ours.items() if n.startswith(TEXT)}
    assert sorted(text) == sorted(theirs)
    for n, t in theirs.items():
        assert text[n].dtype == t.dtype and text[n].shape == t.shape, n
        assert _bytes(text[n]) == _bytes(t), n
    # every routed expert NVFP4 with its four tensors
    experts = {n.rsplit(".", 1)[0] for n in text if ".mlp.experts." in n}
    assert len(experts) == 2 * 16 * 3
    for m in experts:
        assert text[f"{m}.weight"].dtype == torch.uint8
        assert {f"{m}.{p}" for p in ("weight_scale", "weight_scale_2", "input_scale")} <= set(text)


def _quant_methods(node, where=""):
    """(where, quant_method) of every quantization_config block anywhere in a config."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "quantization_config" and isinstance(v, dict):
                found.append((where + k, v.get("quant_method")))
            found += _quant_methods(v, f"{where}{k}.")
    return found


def test_written_config_keeps_the_wrapper_and_no_int4_block(built):
    src, out, _ = built
    before = json.loads((src / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    for key in ("architectures", "model_type", "vision_config", "auto_map", "media_placeholder_token_id"):
        assert after[key] == before[key], key
    text_before = {k: v for k, v in before["text_config"].items() if k != "quantization_config"}
    assert after["text_config"] == text_before
    assert _quant_methods(after) == [("quantization_config", "modelopt")]
    assert after["quantization_config"]["quant_algo"] == "NVFP4"
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert sorted(hq["exclude_modules"]) == sorted(after["quantization_config"]["ignore"])
    assert verify(out) == []


# ---------------------------------------------------------------- the engines' name mappings
# vLLM vllm/model_executor/models/kimi_k25.py, KimiK25ForConditionalGeneration.load_weights:
# _KEYS_TO_MODIFY_MAPPING, applied with name.replace where the key occurs; the model defines no
# hf_to_vllm_mapper, so the exclude list is matched as written. Then DeepSeek-V2's stacked params.
VLLM_KEYS = {"language_model.lm_head": "lm_head", "language_model.model": "language_model",
             "mm_projector.proj.0": "mm_projector.linear_1", "mm_projector.proj.2": "mm_projector.linear_2"}
VLLM_PACKED = {"gate_up_proj": ["gate_proj", "up_proj"], "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]}
# SGLang python/sglang/srt/models/kimi_k25.py load_weights: name.replace("language_model.", "")
# before DeepseekV3ForCausalLM (built with prefix "" for ModelOpt).
SGLANG_PACKED = {"gate_up_proj": ["gate_proj", "up_proj"],
                 "fused_qkv_a_proj_with_mqa": ["q_a_proj", "kv_a_proj_with_mqa"]}


def _fused(module: str, packed: dict) -> str:
    m = re.match(r"^(.*\.experts)\.\d+\.[^.]+$", module)
    if m:
        return m.group(1)  # one FusedMoE module per layer
    parent, _, leaf = module.rpartition(".")
    for fused, shards in packed.items():
        if leaf in shards:
            return f"{parent}.{fused}"
    return module


def _vllm_name(module: str) -> str:
    for key, new in VLLM_KEYS.items():
        if key in module:
            module = module.replace(key, new)
    return _fused(module, VLLM_PACKED)


def _sglang_name(module: str) -> str:
    return _fused(module.replace("language_model.", ""), SGLANG_PACKED)


def test_exclude_list_safe_under_both_engines_name_mappings(built):
    _, out, _ = built
    tensors = _tensors(out)
    exclude = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    modules = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight") and n.startswith(TEXT)
               and not n.endswith(("norm.weight", "embed_tokens.weight", "mlp.gate.weight"))}
    assert TEXT + "lm_head" in modules
    quantized = {m for m in modules if tensors[m + ".weight"].dtype == torch.uint8}
    assert quantized and quantized != modules
    for m in sorted(modules):
        want = m not in quantized
        v = _vllm_name(m)
        assert v.startswith(("language_model.layers.", "lm_head")), v
        assert (vllm_match(v, exclude, VLLM_PACKED) is not None) == want, (m, v)
        assert (vllm_match(v, exclude, VLLM_PACKED, expand_star=False) is not None) == want, (m, v)
        s = _sglang_name(m)
        assert s.startswith(("model.layers.", "lm_head")), s
        for packed in (None, SGLANG_PACKED):
            assert (sglang_match(s, exclude, packed, is_moe=s.endswith(".experts")) is not None) == want, (m, s)
    for m in ("vision_tower.encoder.blocks.0.wqkv", "mm_projector.proj.0"):
        assert sglang_match(m, exclude) is not None and vllm_match(_vllm_name(m), exclude, VLLM_PACKED) is not None


# ---------------------------------------------------------------- reader, plan, presets, verify

def _copy_with_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def test_quantization_config_copied_to_the_top_level_is_accepted(built, tmp_path):
    src, _, _ = built
    both = _copy_with_config(src, tmp_path / "both", lambda c: c.update(
        quantization_config=c["text_config"]["quantization_config"]))
    r = CheckpointReader(both)
    assert r.info(TEXT + "model.layers.1.mlp.experts.0.up_proj.weight").encoding == "int4_pack"

    def differ(c):
        c["quantization_config"] = json.loads(json.dumps(c["text_config"]["quantization_config"]))
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
    with pytest.raises(CheckpointError, match="text_config.quantization_config"):
        CheckpointReader(_copy_with_config(src, tmp_path / "differ", differ))


def test_plan_and_presets(built):
    src, _, _ = built
    r = CheckpointReader(src)
    plans = {p: build_plan(r, ConvertOptions(preset=p, input_scale_constant=1.0)) for p in ("mlp_only", "experts_only")}
    mlp, experts = plans["mlp_only"], plans["experts_only"]
    assert mlp.family == "kimi_k25" and mlp.layer_ids == (0, 1, 2) and mlp.num_layers == 3
    head = {TEXT + n for n in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight")}
    assert set(mlp.non_layer_names) == head | {n for n in r.names() if n.startswith(PASSTHROUGH)}
    # mlp_only (NVIDIA's Kimi-K2-Thinking-NVFP4): every MLP linear, attention bf16
    assert mlp.quantized == {m for m in mlp.all_linear if ".mlp." in m}
    # experts_only (NVIDIA's K2.6 split): routed experts only
    assert experts.quantized == {m for m in mlp.all_linear if ".mlp.experts." in m}
    assert TEXT + "model.layers.1.mlp.shared_experts*" in experts.exclude or any(
        fnmatchcase(TEXT + "model.layers.1.mlp.shared_experts.up_proj", e) for e in experts.exclude)
    assert not any(m.startswith(PASSTHROUGH) for m in mlp.all_linear)


def test_experts_only_converts_and_verifies(built, tmp_path):
    src, _, _ = built
    out = tmp_path / "experts"
    report = convert(src, out, ConvertOptions(preset="experts_only", input_scale_constant=1.0, progress=False))
    assert report["linears_quantized"] == 2 * 16 * 3
    assert verify(out) == []


def test_verify_flags_a_stale_int4_block_in_text_config(built, tmp_path):
    src, out, _ = built
    int4 = json.loads((src / "config.json").read_text())["text_config"]["quantization_config"]
    stale = _copy_with_config(out, tmp_path / "stale", lambda c: c["text_config"].update(quantization_config=int4))
    errors = [f for f in verify(stale) if f.severity == "error"]
    assert any("text_config.quantization_config" in f.message for f in errors), errors


def test_verify_flags_vision_missing_from_the_exclude_lists(built, tmp_path):
    _, out, _ = built
    bad = _copy_with_config(out, tmp_path / "noexcl", lambda c: c["quantization_config"].update(
        ignore=[e for e in c["quantization_config"]["ignore"] if not e.startswith("vision_tower")]))
    errors = [f for f in verify(bad) if f.severity == "error"]
    assert any("vision/projector" in f.message and "config.json" in f.name for f in errors), errors
