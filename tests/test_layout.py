import dataclasses
import json
from pathlib import Path

import pytest

from nvfp4_jax import families
from nvfp4_jax.families import family_spec, layer_index
from nvfp4_jax.checkpoint.layout import (
    PRESETS,
    FusedShardMismatch,
    Layout,
    UnsupportedModelError,
    default_preset,
    get_layout,
    sglang_match,
    vllm_match,
)

from tests.paths import TINY_LLAMA as GOLDEN

_LLAMA = get_layout({"model_type": "llama"})


def is_excluded_vllm(module, exclude_list, *, layout=None, expand_star=True):
    """Would vLLM load ``module`` (checkpoint or engine name) unquantized? Raises FusedShardMismatch
    where vLLM raises."""
    lay = layout or _LLAMA
    return vllm_match(lay.engine_name(module, "vllm"), exclude_list, lay.packed("vllm"),
                      expand_star=expand_star) is not None


def is_excluded_sglang(module, exclude_list, *, layout=None, packed=False):
    """Would SGLang load ``module`` unquantized? ``packed``: the quant config carries
    packed_modules_mapping. Raises FusedShardMismatch where SGLang raises."""
    lay = layout or _LLAMA
    prefix = lay.engine_name(module, "sglang")
    return sglang_match(prefix, exclude_list, lay.packed("sglang") if packed else None,
                        is_moe=prefix.endswith(".experts")) is not None


def llama_names(L=2):
    n = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for l in range(L):
        p = f"model.layers.{l}."
        n += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        n += [p + f"self_attn.{s}.weight" for s in ("q_proj", "k_proj", "v_proj", "o_proj")]
        n += [p + f"mlp.{s}.weight" for s in ("gate_proj", "up_proj", "down_proj")]
    return n


def qwen3_moe_names(L=12, E=4, dense=(0,)):
    n = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for l in range(L):
        p = f"model.layers.{l}."
        n += [p + "input_layernorm.weight", p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        n += [p + f"self_attn.{s}.weight" for s in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if l in dense:
            n += [p + f"mlp.{s}.weight" for s in ("gate_proj", "up_proj", "down_proj")]
        else:
            n.append(p + "mlp.gate.weight")
            for e in range(E):
                n += [p + f"mlp.experts.{e}.{s}.weight" for s in ("gate_proj", "up_proj", "down_proj")]
    return n


def deepseek_names(L=12, E=4, mtp=True, q_lora=True):
    n = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for l in range(L + (1 if mtp else 0)):
        p = f"model.layers.{l}."
        n += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        attn = (["q_a_proj", "q_b_proj"] if q_lora else ["q_proj"]) + [
            "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        n += [p + f"self_attn.{s}.weight" for s in attn]
        n += [p + "self_attn.kv_a_layernorm.weight"]
        if q_lora:
            n += [p + "self_attn.q_a_layernorm.weight"]
        if l == 0:
            n += [p + f"mlp.{s}.weight" for s in ("gate_proj", "up_proj", "down_proj")]
        else:
            n += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            n += [p + f"mlp.shared_experts.{s}.weight" for s in ("gate_proj", "up_proj", "down_proj")]
            for e in range(E):
                n += [p + f"mlp.experts.{e}.{s}.weight" for s in ("gate_proj", "up_proj", "down_proj")]
        if mtp and l == L:
            n += [p + "eh_proj.weight", p + "enorm.weight", p + "hnorm.weight",
                  p + "shared_head.head.weight", p + "shared_head.norm.weight"]
    return n


FAMILIES = {
    "llama": ({"model_type": "llama", "num_hidden_layers": 12}, llama_names(12)),
    "qwen3_moe": ({"model_type": "qwen3_moe", "num_hidden_layers": 12}, qwen3_moe_names(12)),
    "deepseek_v3": ({"model_type": "deepseek_v3", "num_hidden_layers": 12, "q_lora_rank": 64},
                    deepseek_names(12)),
    "kimi_k2": ({"model_type": "kimi_k2", "num_hidden_layers": 12, "q_lora_rank": 64},
                deepseek_names(12)),
    "deepseek_nolora": ({"model_type": "deepseek_v3", "num_hidden_layers": 12, "q_lora_rank": None},
                        deepseek_names(12, q_lora=False)),
}


def assert_exact_and_safe(lay: Layout, names, quantized, ex):
    lin = lay.linear_modules(names)
    assert lay.check_exclude(ex, lin, quantized) == []
    # independent check through the public simulation functions, per checkpoint module
    for m in lin + [lay.lm_head]:
        want = m not in quantized
        assert is_excluded_vllm(m, ex, layout=lay) == want, m
        assert is_excluded_vllm(m, ex, layout=lay, expand_star=False) == want, m
        assert is_excluded_sglang(m, ex, layout=lay) == want, m
        assert is_excluded_sglang(m, ex, layout=lay, packed=True) == want, m
    for r in lay.routers(names):
        assert r in ex


@pytest.mark.parametrize("fam", sorted(FAMILIES))
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_exclude_lists_safe_and_exact(fam, preset):
    cfg, names = FAMILIES[fam]
    lay = get_layout(cfg)
    lin = lay.linear_modules(names)
    q = lay.quantized(lin, preset)
    ex = lay.exclude_modules(lin, q, lay.routers(names), extra=lay.embeddings(names))
    assert "lm_head" in ex and "model.embed_tokens" in ex
    assert_exact_and_safe(lay, names, q, ex)
    # the list is compressed: never one entry per routed expert
    assert not any(".experts." in e for e in ex)


def test_linear_modules_and_routers():
    cfg, names = FAMILIES["kimi_k2"]
    lay = get_layout(cfg)
    lin = lay.linear_modules(names)
    assert "lm_head" not in lin and "model.embed_tokens" not in lin
    assert not any("norm" in m for m in lin)
    assert "model.layers.1.mlp.gate" not in lin
    assert "model.layers.1.mlp.experts.3.down_proj" in lin
    assert "model.layers.12.eh_proj" in lin
    assert lay.routers(names) == [f"model.layers.{l}.mlp.gate" for l in range(1, 13)]
    assert lay.embeddings(names) == ["model.embed_tokens"]


def test_fused_groups():
    lay = get_layout(FAMILIES["llama"][0])
    g = lay.fused_groups(lay.linear_modules(llama_names(1)))
    assert set(g) == {("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                       "model.layers.0.self_attn.v_proj"),
                      ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")}
    lay = get_layout(FAMILIES["kimi_k2"][0])
    g = lay.fused_groups(lay.linear_modules(deepseek_names(2, E=2, mtp=False)))
    assert ("model.layers.1.self_attn.q_a_proj", "model.layers.1.self_attn.kv_a_proj_with_mqa") in g
    assert ("model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.shared_experts.up_proj") in g
    assert ("model.layers.1.mlp.experts.1.gate_proj", "model.layers.1.mlp.experts.1.up_proj") in g
    assert ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj") in g
    # without q_lora_rank there is no q_a/kv_a group
    lay = get_layout(FAMILIES["deepseek_nolora"][0])
    g = lay.fused_groups(lay.linear_modules(deepseek_names(2, E=2, mtp=False, q_lora=False)))
    assert not any("kv_a_proj_with_mqa" in m for grp in g for m in grp)
    lay = get_layout(FAMILIES["qwen3_moe"][0])
    g = lay.fused_groups(lay.linear_modules(qwen3_moe_names(2)))
    assert ("model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.0.up_proj") in g


def test_presets_content():
    cfg, names = FAMILIES["kimi_k2"]
    lay = get_layout(cfg)
    lin = lay.linear_modules(names)
    allq = lay.quantized(lin, "all")
    assert not any(m.startswith("model.layers.12.") for m in allq)  # MTP layer
    assert "model.layers.3.self_attn.kv_b_proj" in allq
    mlp = lay.quantized(lin, "mlp_only")
    assert not any("self_attn" in m for m in mlp)
    assert "model.layers.0.mlp.down_proj" in mlp and "model.layers.2.mlp.shared_experts.up_proj" in mlp
    exp = lay.quantized(lin, "experts_only")
    assert exp and all(".mlp.experts." in m for m in exp)
    assert default_preset(cfg) == "mlp_only"
    assert default_preset({"model_type": "llama"}) == "all"
    with pytest.raises(ValueError):
        lay.quantized(lin, "attention_only")


def test_unsupported_model_type():
    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'gpt2'.*llama"):
        get_layout({"model_type": "gpt2"})
    assert get_layout({"model_type": "gpt2"}, strict=False).generic


def test_golden_exclude_list_reproduced():
    cfg = json.loads((GOLDEN / "source" / "config.json").read_text())
    hq = json.loads((GOLDEN / "modelopt_nvfp4" / "hf_quant_config.json").read_text())
    lay = get_layout(cfg)
    names = llama_names(cfg["num_hidden_layers"])
    lin = lay.linear_modules(names)
    ex = lay.exclude_modules(lin, lay.quantized(lin, "all"), lay.routers(names),
                             extra=lay.embeddings(names))
    assert ex == hq["quantization"]["exclude_modules"]


def test_irregular_sets_stay_safe():
    # a K % 16 != 0 projection leaves its whole fused group unquantized in one layer only
    cfg, names = FAMILIES["llama"]
    lay = get_layout(cfg)
    lin = lay.linear_modules(names)
    q = lay.close_groups(lay.quantized(lin, "all") - {"model.layers.1.self_attn.v_proj"}, lin)
    assert "model.layers.1.self_attn.q_proj" not in q and "model.layers.1.self_attn.o_proj" in q
    ex = lay.exclude_modules(lin, q, [], extra=["model.embed_tokens"])
    assert_exact_and_safe(lay, names, q, ex)
    assert "model.layers.1.self_attn.qkv_proj" in ex  # SGLang without packed mapping needs it

    # DeepSeek: one layer's q_a/kv_a/kv_b unquantized; an exact 'kv_b_proj' entry would make
    # SGLang exclude kv_b_proj in every layer
    cfg, names = FAMILIES["kimi_k2"]
    lay = get_layout(cfg)
    lin = lay.linear_modules(names)
    drop = {"model.layers.3.self_attn.q_a_proj", "model.layers.3.self_attn.kv_b_proj"}
    q = lay.close_groups(lay.quantized(lin, "all") - drop, lin)
    assert "model.layers.3.self_attn.kv_a_proj_with_mqa" not in q
    ex = lay.exclude_modules(lin, q, lay.routers(names))
    assert "model.layers.3.self_attn.kv_b_proj" not in ex
    assert_exact_and_safe(lay, names, q, ex)

    # one expert layer left entirely unquantized in experts_only
    q = lay.quantized(lin, "experts_only")
    q = {m for m in q if not m.startswith("model.layers.1.")}
    ex = lay.exclude_modules(lin, q, lay.routers(names))
    assert_exact_and_safe(lay, names, q, ex)

    with pytest.raises(ValueError, match="partly quantized"):
        lay.exclude_modules(lin, lay.quantized(lin, "all") - {"model.layers.2.mlp.experts.0.up_proj"},
                            lay.routers(names))


def test_vllm_rules():
    # plain substring: a router entry hits gate_up_proj / gate_proj
    assert is_excluded_vllm("model.layers.1.mlp.gate_proj", ["model.layers.1.mlp.gate"])
    assert is_excluded_vllm("model.layers.1.mlp.gate_up_proj", ["model.layers.1.mlp.gate"])
    # "prefix*" -> prefix (substring!) and prefix.*
    assert is_excluded_vllm("model.layers.10.mlp.down_proj", ["model.layers.1*"])
    assert is_excluded_vllm("model.layers.1.self_attn.o_proj", ["model.layers.1.self_attn*"])
    assert not is_excluded_vllm("model.layers.11.self_attn.o_proj", ["model.layers.1.self_attn*"])
    # fnmatch
    assert is_excluded_vllm("model.layers.3.self_attn.o_proj", ["model.layers.*.self_attn.o_proj"])
    # fused all-or-nothing
    with pytest.raises(FusedShardMismatch):
        is_excluded_vllm("model.layers.0.self_attn.k_proj", ["model.layers.0.self_attn.q_proj"])
    assert is_excluded_vllm("model.layers.0.self_attn.k_proj",
                            [f"model.layers.0.self_attn.{s}_proj" for s in "qkv"])
    # one excluded expert excludes the whole MoE of the layer
    assert is_excluded_vllm("model.layers.2.mlp.experts.7.down_proj",
                            ["model.layers.2.mlp.experts.0.gate_proj"])
    assert not is_excluded_vllm("model.layers.2.mlp.experts.7.down_proj",
                                ["model.layers.2.mlp.shared_experts.gate_proj"])
    assert is_excluded_vllm("lm_head", ["lm_head"])


def test_sglang_rules():
    lay = get_layout({"model_type": "kimi_k2", "num_hidden_layers": 61, "q_lora_rank": 1536})
    # glob -> regex fullmatch, no plain substring
    assert not is_excluded_sglang("model.layers.1.mlp.gate_proj", ["model.layers.1.mlp.gate"])
    assert is_excluded_sglang("model.layers.1.self_attn.o_proj", ["model.layers.1.self_attn*"],
                              layout=lay)
    # any single dotted part
    assert is_excluded_sglang("model.layers.5.self_attn.o_proj", ["self_attn"], layout=lay)
    assert is_excluded_sglang("mtp_layers.0.mlp.down_proj", ["mtp*"])
    # language_model. prefix
    assert is_excluded_sglang("language_model.model.layers.0.mlp.down_proj",
                              ["model.layers.0.mlp.down_proj"])
    # an MLA projection named in one layer is excluded in every layer
    assert is_excluded_sglang("model.layers.40.self_attn.kv_b_proj",
                              ["model.layers.0.self_attn.kv_b_proj"], layout=lay)
    assert is_excluded_sglang("model.layers.40.self_attn.q_a_proj",
                              ["model.layers.0.self_attn.kv_a_proj_with_mqa"], layout=lay)
    assert not is_excluded_sglang("model.layers.40.self_attn.kv_b_proj",
                                  ["model.layers.0.self_attn.kv_b_proj*"], layout=lay)
    # experts: a single expert entry does not exclude the FusedMoE
    assert not is_excluded_sglang("model.layers.2.mlp.experts.7.down_proj",
                                  ["model.layers.2.mlp.experts.0.gate_proj"], layout=lay)
    # unfused names only exclude qkv_proj when the quant config carries packed_modules_mapping
    ex = [f"model.layers.0.self_attn.{s}_proj" for s in "qkv"]
    assert not is_excluded_sglang("model.layers.0.self_attn.q_proj", ex)
    assert is_excluded_sglang("model.layers.0.self_attn.q_proj", ex, packed=True)


# --------------------------------------------------------------------------------------------
# family specs and the layer-index parser
# --------------------------------------------------------------------------------------------

def test_layer_index():
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("model.layers.12") == 12
    assert layer_index("model.layers.x.mlp") is None
    assert layer_index("model.layers.\u00b2.mlp") is None  # a digit to str.isdigit, not to int()
    assert layer_index("mtp_layers.0.mlp.down_proj") is None
    assert layer_index("model.embed_tokens.weight") is None
    wrapped = "language_model.model.layers.7.self_attn.o_proj"
    assert layer_index(wrapped) is None
    assert layer_index(wrapped, "language_model.model.layers.") == 7


def test_family_spec_lookup():
    for mt in ("llama", "qwen2", "qwen3", "mistral"):
        assert family_spec({"model_type": mt}).name == "llama"
    assert family_spec({"model_type": "qwen3_moe"}).name == "qwen3_moe"
    for mt in ("deepseek_v3", "kimi_k2"):
        assert family_spec({"model_type": mt}).default_preset == "mlp_only"
    # a wrapper without a spec of its own: the text_config's model_type and numbers
    wrapper = {"model_type": "some_vlm", "text_config": {"model_type": "kimi_k2", "num_hidden_layers": 61,
                                                        "q_lora_rank": 1536}}
    spec = family_spec(wrapper)
    assert spec.name == "deepseek_v3" and spec.text_config(wrapper)["num_hidden_layers"] == 61
    assert get_layout(wrapper).packed("sglang") == {
        "gate_up_proj": ["gate_proj", "up_proj"], "fused_qkv_a_proj_with_mqa": ["q_a_proj", "kv_a_proj_with_mqa"]}
    assert get_layout({"model_type": "deepseek_v3"}).packed("vllm") == {"gate_up_proj": ["gate_proj", "up_proj"]}
    assert get_layout({"model_type": "qwen3"}).packed("vllm") == {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        family_spec({"model_type": "gpt2"})


def _wrapped_names(L=3, E=2):
    """A Kimi-K2.5-style wrapper: the decoder under language_model., a vision tower, a projector."""
    inner = deepseek_names(L, E=E, mtp=True)
    names = ["language_model." + n for n in inner]
    names += [f"vision_tower.encoder.blocks.{b}.{m}.weight" for b in range(2) for m in ("wqkv", "wo", "mlp.fc0")]
    names += ["mm_projector.proj.0.weight", "mm_projector.proj.2.weight"]
    return names


def test_wrapper_layout_is_one_spec():
    """A family whose decoder lives under language_model. and whose config under text_config needs
    nothing but its spec (families.KIMI_K25): MTP rule, fused groups, presets and a safe exclude
    list follow from it."""
    assert families.KIMI_K25 == dataclasses.replace(
        families.DEEPSEEK_V3, name="kimi_k25", model_types=("kimi_k25",), layer_prefix="language_model.model.layers.",
        text_config_key="text_config", engine_renames=families.KIMI_K25.engine_renames,
        alt_layer_prefixes=("language_model.layers.",))
    cfg = {"model_type": "kimi_k25", "num_hidden_layers": 99,  # the top level is not the decoder's
           "text_config": {"model_type": "kimi_k2", "num_hidden_layers": 3, "q_lora_rank": 64}}
    lay = get_layout(cfg)
    assert lay.family == "kimi_k25" and lay.num_hidden_layers == 3
    names = _wrapped_names()
    lin = lay.linear_modules(names)
    assert lay.is_mtp("language_model.model.layers.3.eh_proj")
    assert not lay.is_mtp("language_model.model.layers.2.mlp.down_proj")
    assert ("language_model.model.layers.1.self_attn.q_a_proj",
            "language_model.model.layers.1.self_attn.kv_a_proj_with_mqa") in lay.fused_groups(lin)
    for preset in PRESETS:
        q = lay.close_groups(lay.quantized(lin, preset), lin)
        assert q and not any(m.startswith(("vision_tower", "mm_projector", "language_model.model.layers.3."))
                             for m in q)
        ex = lay.exclude_modules(lin, q, lay.routers(names), extra=lay.embeddings(names) + lay.passthrough_entries(names))
        assert_exact_and_safe(lay, names, q, ex)
        assert not any(e.startswith("language_model.model*") or e == "language_model*" for e in ex)
        assert {"vision_tower*", "mm_projector*", "language_model.lm_head", "lm_head"} <= set(ex)
