"""torch_bridge.calibration against independent computations on tiny transformers models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from torch_bridge import arrays  # noqa: E402
from torch_bridge.calibration import calibrate, merge_stats  # noqa: E402

from tests.paths import GOLDEN_DIR as GOLDEN
if not GOLDEN.exists():
    GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
TINY = GOLDEN / "tiny_llama"


def _close(a: float, b: float, rtol: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------
# tiny Llama: a hand-written forward gives every linear input
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    m = LlamaForCausalLM(cfg).float().eval()
    return m


def _rms(x, w, eps):
    v = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(v + eps))


def _rope(x, pos, theta):
    # x [B, h, S, d], rotate-half convention
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    fr = pos[:, None].float() * inv[None]
    emb = torch.cat([fr, fr], -1)
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@torch.no_grad()
def _manual_llama(model, ids):
    """Independent Llama forward: returns ({linear name: input amax}, logits)."""
    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items()}
    H, nh, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = H // nh
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    B, S = ids.shape
    pos = torch.arange(S)
    h = sd["model.embed_tokens.weight"][ids]
    amax = {}
    lin = lambda name, x: (amax.__setitem__(name, max(amax.get(name, 0.0), float(x.abs().max()))),
                           x @ sd[name + ".weight"].T)[1]
    mask = torch.full((S, S), float("-inf")).triu(1)
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        x = _rms(h, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = lin(p + "self_attn.q_proj", x).view(B, S, nh, hd).transpose(1, 2)
        k = lin(p + "self_attn.k_proj", x).view(B, S, nkv, hd).transpose(1, 2)
        v = lin(p + "self_attn.v_proj", x).view(B, S, nkv, hd).transpose(1, 2)
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        h = h + lin(p + "self_attn.o_proj", att.transpose(1, 2).reshape(B, S, H))
        x = _rms(h, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        g = lin(p + "mlp.gate_proj", x)
        u = lin(p + "mlp.up_proj", x)
        h = h + lin(p + "mlp.down_proj", F.silu(g) * u)
    h = _rms(h, sd["model.norm.weight"], cfg.rms_norm_eps)
    return amax, lin("lm_head", h)


def test_llama_matches_manual_forward(llama):
    g = torch.Generator().manual_seed(1)
    b1 = torch.randint(0, 96, (2, 12), generator=g)
    b2 = torch.randint(0, 96, (1, 20), generator=g)
    stats = calibrate(llama, [b1, b2])
    assert stats["experts"] == {}
    exp = {}
    for b in (b1, b2):
        a, logits = _manual_llama(llama, b)
        ref_logits = llama(b).logits
        assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)  # the manual forward is right
        for k, v in a.items():
            exp[k] = max(exp.get(k, 0.0), v)
    assert set(stats["input_amax"]) == set(exp)
    for k, v in exp.items():
        assert _close(stats["input_amax"][k], v), (k, stats["input_amax"][k], v)
    # q_proj input is input_layernorm(hidden_states[l]), independently from output_hidden_states
    s1 = calibrate(llama, [b1])
    with torch.no_grad():
        out = llama(b1, output_hidden_states=True)
        for l in range(2):
            a = float(llama.model.layers[l].input_layernorm(out.hidden_states[l]).abs().max())
            assert _close(a, s1["input_amax"][f"model.layers.{l}.self_attn.q_proj"])
    # merging: two calls == one call with both batches
    s2 = calibrate(llama, [b2])
    merged = merge_stats(s1, s2)
    assert merged["input_amax"] == stats["input_amax"]
    assert not llama.training
    # hooks are removed afterwards
    assert all(len(m._forward_pre_hooks) == 0 for m in llama.modules())


def test_calibrate_input_forms(llama):
    ids = [5, 7, 9, 11]
    s_list = calibrate(llama, [ids])
    s_tensor = calibrate(llama, [torch.tensor([ids])])
    s_dict = calibrate(llama, [{"input_ids": torch.tensor(ids)}])
    assert s_list == s_tensor == s_dict
    with pytest.raises(ValueError):
        calibrate(llama, [])
    with pytest.raises(TypeError):
        calibrate(llama, [torch.zeros(1, 4)])


# ----------------------------------------------------------------------------------------------
# tiny Qwen3-MoE: routing and expert inputs recomputed from the MoE block input
# ----------------------------------------------------------------------------------------------
E, TOPK = 8, 2


@pytest.fixture(scope="module")
def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=E, num_experts_per_tok=TOPK,
        decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True, max_position_embeddings=64,
    )
    return Qwen3MoeForCausalLM(cfg).float().eval()


def _capture_moe_inputs(model, batches):
    """Test-side hooks on the sparse MoE blocks (not on the experts module calibrate uses)."""
    caught = {}
    hs = []
    for name, m in model.named_modules():
        if type(m).__name__ == "Qwen3MoeSparseMoeBlock":
            hs.append(m.register_forward_hook(
                lambda mod, args, out, name=name: caught.setdefault(name, []).append(args[0].detach().clone())))
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in hs:
            h.remove()
    return caught


def _manual_moe_stats(block, xs):
    W_r = block.gate.weight.detach()
    gu = block.experts.gate_up_proj.detach()
    dn_in = block.experts.down_proj.shape[-1]
    tok = [0] * E
    gua = [0.0] * E
    dna = [0.0] * E
    for x in xs:
        x = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(x @ W_r.T, -1)
        top = torch.topk(probs, TOPK, -1).indices
        for e in range(E):
            sel = (top == e).any(-1)
            n = int(sel.sum())
            if n == 0:
                continue
            xe = x[sel]
            tok[e] += n
            gua[e] = max(gua[e], float(xe.abs().max()))
            gate = xe @ gu[e, :dn_in].T
            up = xe @ gu[e, dn_in:].T
            dna[e] = max(dna[e], float((F.silu(gate) * up).abs().max()))
    return tok, gua, dna


@pytest.mark.parametrize("impl", ["grouped_mm", "eager", "batched_mm"])
def test_qwen3_moe_experts(qwen3_moe, impl):
    model = qwen3_moe
    model.set_experts_implementation(impl)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 96, (2, 16), generator=g), torch.randint(0, 96, (1, 24), generator=g)]
    stats = calibrate(model, batches)
    n_tokens = sum(b.numel() for b in batches)
    prefixes = [f"model.layers.{l}.mlp.experts" for l in (1, 2)]
    assert sorted(stats["experts"]) == prefixes
    # non-routed names are checkpoint names; no routed expert / router in input_amax
    ia = stats["input_amax"]
    assert "model.layers.0.mlp.gate_proj" in ia and "model.layers.2.self_attn.o_proj" in ia
    assert not any(".experts" in k or k.endswith("mlp.gate") for k in ia)
    caught = _capture_moe_inputs(model, batches)
    for l in (1, 2):
        p = f"model.layers.{l}.mlp"
        rec = stats["experts"][p + ".experts"]
        assert sum(rec["tokens_per_expert"]) == n_tokens * TOPK
        tok, gua, dna = _manual_moe_stats(model.model.layers[l].mlp, caught[p])
        assert rec["tokens_per_expert"] == tok
        for e in range(E):
            assert _close(rec["gate_up_input_amax"][e], gua[e]), (l, e)
            assert _close(rec["down_input_amax"][e], dna[e], 1e-4), (l, e, rec["down_input_amax"][e], dna[e])
            assert (rec["gate_up_input_amax"][e] == 0) == (tok[e] == 0)
        # routed-expert gate/up input is the post-attention norm output; every token reaches it
        assert max(rec["gate_up_input_amax"]) == pytest.approx(float(caught[p][0].abs().max()) if len(caught[p]) == 1
                                                               else max(float(c.abs().max()) for c in caught[p]))
    model.set_experts_implementation("grouped_mm")


def test_qwen3_moe_router_logits_agree(qwen3_moe):
    """Token counts equal a manual top-k of the router logits the model itself returns."""
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    stats = calibrate(qwen3_moe, [ids])
    with torch.no_grad():
        out = qwen3_moe(ids, output_router_logits=True)
    logits = [r for r in out.router_logits if r is not None]
    assert len(logits) == 2
    for l, rl in zip((1, 2), logits):
        top = torch.topk(torch.softmax(rl.float(), -1), TOPK, -1).indices
        counts = torch.bincount(top.reshape(-1), minlength=E).tolist()
        assert stats["experts"][f"model.layers.{l}.mlp.experts"]["tokens_per_expert"] == counts


def test_merge_stats_experts(qwen3_moe):
    g = torch.Generator().manual_seed(4)
    b1, b2 = torch.randint(0, 96, (1, 10), generator=g), torch.randint(0, 96, (1, 14), generator=g)
    both = calibrate(qwen3_moe, [b1, b2])
    m = merge_stats(calibrate(qwen3_moe, [b1]), calibrate(qwen3_moe, [b2]))
    assert m == both


# ----------------------------------------------------------------------------------------------
# tiny DeepSeek-V3: names (MLA, shared experts) and fused routed experts
# ----------------------------------------------------------------------------------------------
def test_deepseek_v3_names():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=64,
    )
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    stats = calibrate(model, [ids])
    ia = stats["input_amax"]
    for n in ["model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.q_b_proj",
              "model.layers.0.self_attn.kv_a_proj_with_mqa", "model.layers.0.self_attn.kv_b_proj",
              "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj",
              "model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.shared_experts.up_proj",
              "model.layers.1.mlp.shared_experts.down_proj"]:
        assert n in ia and ia[n] > 0, n
    assert ia["model.layers.0.self_attn.q_a_proj"] == ia["model.layers.0.self_attn.kv_a_proj_with_mqa"]
    rec = stats["experts"]["model.layers.1.mlp.experts"]
    assert list(stats["experts"]) == ["model.layers.1.mlp.experts"]
    assert sum(rec["tokens_per_expert"]) == 12 * 2
    # the shared experts see every token: their input amax bounds each routed expert's input amax
    assert max(rec["gate_up_input_amax"]) == ia["model.layers.1.mlp.shared_experts.gate_proj"]


# ----------------------------------------------------------------------------------------------
# golden: ModelOpt's input_scale for tiny_llama
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (TINY / "modelopt_nvfp4" / "model.safetensors").exists(), reason="no tiny_llama golden")
def test_tiny_llama_input_scales_vs_modelopt():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY / "source", dtype=torch.bfloat16).eval()
    ids = json.loads((TINY / "calib_tokens.json").read_text())["input_ids"]
    stats = calibrate(model, [torch.tensor([s]) for s in ids])  # one forward per sequence, as ModelOpt
    ref = arrays.load_safetensors(TINY / "modelopt_nvfp4" / "model.safetensors")
    names = [k[: -len(".input_scale")] for k in ref if k.endswith(".input_scale")]
    assert len(names) == 14
    worst = 0.0
    for n in names:
        ours = float(torch.tensor(stats["input_amax"][n], dtype=torch.float32) / torch.tensor(2688.0))
        theirs = float(ref[n + ".input_scale"])
        worst = max(worst, abs(ours - theirs) / theirs)
    assert worst <= 1e-2, worst
