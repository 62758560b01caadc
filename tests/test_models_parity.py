"""Flax/JAX forwards of nvfp4_jax.models against transformers' PyTorch models.

Property: for tiny random checkpoints written by transformers' save_pretrained, the JAX model fed
with the checkpoint's tensors (checkpoint names, per-expert layout) reproduces the PyTorch logits
(float32: max |diff| <= 1e-4 * logit range), the same top-k experts per token in every MoE layer,
and the calibration statistics an independent torch observation gives (forward hooks on every
nn.Linear input; per-expert input amax and token counts derived from torch's own routing).
bf16 figures are printed (run with -s to see them).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from tests import model_fixtures as mf  # noqa: E402
from nvfp4_jax.models import ModelConfigError, get_family  # noqa: E402

BATCH, SEQ = 2, 16

MAKERS = {
    "llama": mf.make_llama,
    "qwen2": mf.make_qwen2,
    "qwen3": mf.make_qwen3,
    "qwen3_moe": mf.make_qwen3_moe,
    "deepseek_v3": mf.make_deepseek_v3,
    # transformers maps per-expert checkpoint names to its fused experts by model_type, so torch
    # reads this one as deepseek_v3; the JAX side sees model_type kimi_k2 (JAX_CONFIG_OVERRIDES)
    "kimi_k2_no_q_lora": lambda p: mf.make_deepseek_v3(p, seed=5, q_lora_rank=None),
}
JAX_CONFIG_OVERRIDES = {"kimi_k2_no_q_lora": {"model_type": "kimi_k2"}}
BF16_CASES = ["qwen3", "qwen3_moe", "deepseek_v3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = MAKERS[case](tmp_path_factory.mktemp(case))
        return cache[case]

    return get


def _input_ids():
    return np.random.RandomState(0).randint(0, mf.VOCAB, size=(BATCH, SEQ)).astype(np.int32)


def _torch_model(path, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval()


def _routing_margin(gate, router_logits, config) -> float:
    """The smallest gap, over tokens, between the last expert chosen and the first one not
    chosen (DeepSeek: also between the last group kept and the first dropped), in torch's
    float64-recomputed router scores. Routing of the two frameworks can only differ for a token
    whose gap is below their float32 differences."""
    lg = router_logits.detach().double().numpy()
    k = config.num_experts_per_tok
    if not hasattr(gate, "e_score_correction_bias"):  # Qwen3-MoE: softmax top-k
        p = np.exp(lg - lg.max(-1, keepdims=True))
        s = -np.sort(-p / p.sum(-1, keepdims=True), -1)
        return float((s[:, k - 1] - s[:, k]).min())
    choice = 1 / (1 + np.exp(-lg)) + gate.e_score_correction_bias.double().numpy()  # DeepSeek noaux_tc
    t, e = choice.shape
    per = e // config.n_group
    group = np.sort(choice.reshape(t, config.n_group, per), -1)[..., -2:].sum(-1)
    gs = -np.sort(-group, -1)
    kept = np.zeros_like(group, bool)
    np.put_along_axis(kept, np.argsort(-group, -1)[:, :config.topk_group], True, -1)
    cs = -np.sort(-np.where(np.repeat(kept, per, 1), choice, -np.inf), -1)
    return float(min((gs[:, config.topk_group - 1] - gs[:, config.topk_group]).min(), (cs[:, k - 1] - cs[:, k]).min()))


def _torch_run(path, dtype):
    """Torch logits plus what hooks observe: input amax of every nn.Linear of the decoder layers,
    routing (sorted top-k ids) and its margin (_routing_margin) per MoE layer, and the routed
    experts' inputs."""
    model = _torch_model(path, dtype)
    linear_amax, routing, margins, expert_inputs, handles = {}, {}, {}, {}, []
    for name, mod in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        if isinstance(mod, torch.nn.Linear):
            def pre(m, args, name=name):
                linear_amax[name] = float(args[0].detach().abs().max().float())
            handles.append(mod.register_forward_pre_hook(pre))
        elif name.endswith(".mlp.gate") and not isinstance(mod, torch.nn.Linear):
            def post(m, args, out, name=name):
                routing[name.rsplit(".mlp.gate", 1)[0]] = np.sort(out[2].detach().numpy(), axis=-1)
                margins[name.rsplit(".mlp.gate", 1)[0]] = _routing_margin(m, out[0], model.config)
            handles.append(mod.register_forward_hook(post))
        elif name.endswith(".mlp.experts"):
            def pre_e(m, args, name=name):
                expert_inputs[name] = (m, args[0].detach(), args[1].detach())
            handles.append(mod.register_forward_pre_hook(pre_e))
    with torch.no_grad():
        logits = model(torch.tensor(_input_ids(), dtype=torch.long)).logits.float().numpy()
    for h in handles:
        h.remove()
    return logits, linear_amax, (routing, margins), expert_inputs


def _expert_reference(module, x, top_k_index):
    """Per-expert token counts and input amax computed in torch from torch's routing."""
    n = module.num_experts
    counts = np.zeros(n, np.int64)
    gu_amax = np.zeros(n, np.float32)
    down_amax = np.zeros(n, np.float32)
    with torch.no_grad():
        for e in range(n):
            rows = (top_k_index == e).any(dim=-1)
            counts[e] = int((top_k_index == e).sum())
            if not rows.any():
                continue
            xe = x[rows]
            gu_amax[e] = float(xe.abs().max())
            gate, up = torch.nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
            down_amax[e] = float((module.act_fn(gate) * up).abs().max())
    return counts, gu_amax, down_amax


def _jax_run(path, dtype, case=None):
    config = {**mf.read_config(path), **JAX_CONFIG_OVERRIDES.get(case, {})}
    family = get_family(config)
    params = mf.load_params(path, family, dtype)
    logits, stats = family.forward(params, _input_ids(), dtype=dtype)
    return family, np.asarray(logits.astype(jnp.float32)), stats


@pytest.mark.parametrize("case", list(MAKERS))
def test_float32_logits_routing_and_amax_match_transformers(case, checkpoints):
    path = checkpoints(case)
    ref, linear_amax, (routing, margins), expert_inputs = _torch_run(path, torch.float32)
    family, logits, stats = _jax_run(path, jnp.float32, case)

    diff = float(np.abs(logits - ref).max())
    span = float(ref.max() - ref.min())
    print(f"\n[{case}] float32 max|dlogit| = {diff:.3e}, logit range {span:.3f}, ratio {diff / span:.2e}")
    assert diff <= 1e-4 * span

    # every non-routed linear is observed, with torch's value
    ours = {k: float(v) for s in stats for k, v in s.input_amax.items()}
    assert set(ours) == set(linear_amax)
    for name, value in linear_amax.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-5, err_msg=name)

    moe_layers = [l for l in range(family.num_layers()) if family.is_moe_layer(l)]
    assert sorted(routing) == [f"model.layers.{l}" for l in moe_layers]
    for l in moe_layers:
        # routing (and with it the expert statistics) is compared exactly: no token of these
        # inputs is within 1e-4 of a routing tie, while the two float32 forwards give router
        # inputs x (|x| <= ~2) that agree to about 1e-6 relative (the routed experts' input amax,
        # asserted below): router logits move by <= sum|w| |dx| ~ 4 * 2e-6 (64 weights ~0.08)
        # and the scores (sigmoid, softmax) by no more
        assert margins[f"model.layers.{l}"] > 1e-4, margins
        es = stats[l].experts
        assert es.prefix == f"model.layers.{l}.mlp.experts"
        np.testing.assert_array_equal(np.asarray(es.topk_ids), routing[f"model.layers.{l}"],
                                      err_msg=f"routing of layer {l}")
        module, x, idx = expert_inputs[f"model.layers.{l}.mlp.experts"]
        counts, gu_amax, down_amax = _expert_reference(module, x, idx)
        np.testing.assert_array_equal(np.asarray(es.tokens_per_expert), counts)
        np.testing.assert_allclose(np.asarray(es.gate_up_input_amax), gu_amax, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(es.down_input_amax), down_amax, rtol=1e-5)
    for l in range(family.num_layers()):
        if l not in moe_layers:
            assert stats[l].experts is None


@pytest.mark.parametrize("case", BF16_CASES)
def test_bfloat16_parity_figures(case, checkpoints):
    """bf16: whole-model figures are printed; each layer fed with torch's own input hidden state
    must give torch's output within a few bf16 ulps (a whole-model run can flip a near-tie routing
    decision, which then moves that token's logits a lot, so it is only reported)."""
    path = checkpoints(case)
    model = _torch_model(path, torch.bfloat16)
    routing, handles = {}, []
    for name, mod in model.named_modules():
        if name.endswith(".mlp.gate") and not isinstance(mod, torch.nn.Linear):
            def post(m, args, out, name=name):
                routing[int(name.split(".")[2])] = np.sort(out[2].detach().numpy(), axis=-1)
            handles.append(mod.register_forward_hook(post))
    with torch.no_grad():
        out = model(torch.tensor(_input_ids(), dtype=torch.long), output_hidden_states=True)
    for h in handles:
        h.remove()
    ref = out.logits.float().numpy()
    torch_hidden = [h.float().numpy() for h in out.hidden_states]

    family, logits, stats = _jax_run(path, jnp.bfloat16, case)
    diff = float(np.abs(logits - ref).max())
    span = float(ref.max() - ref.min())
    differing = sum(int((np.asarray(stats[l].experts.topk_ids) != ids).any(-1).sum())
                    for l, ids in routing.items())
    total = sum(v.shape[0] for v in routing.values())

    params = mf.load_params(path, family, jnp.bfloat16)
    worst_layer = 0.0
    for layer in range(family.num_layers() - 1):  # the last hidden_states entry is after the final norm
        h_in = jnp.asarray(torch_hidden[layer]).astype(jnp.bfloat16)
        h_out, _ = family.layer_forward(layer, params, h_in, dtype=jnp.bfloat16)
        expect = torch_hidden[layer + 1]
        rel = float(np.abs(np.asarray(h_out.astype(jnp.float32)) - expect).max() / np.abs(expect).max())
        worst_layer = max(worst_layer, rel)
    print(f"\n[{case}] bf16 max|dlogit| = {diff:.3e}, logit range {span:.3f}, ratio {diff / span:.2e}; "
          f"tokens routed differently {differing}/{total}; worst layer-local diff {worst_layer:.2e} of max|h|")
    assert worst_layer <= 2e-2
    if differing == 0:
        assert diff <= 2e-2 * span
    assert differing <= 0.05 * max(total, 1)


def _gamma(n: int) -> float:
    """Higham's gamma_n for float32: any order of summing n float32 products x_k*w_k (with or
    without FMA) is within gamma_n * sum |x_k w_k| of the exact dot product."""
    u = 2.0 ** -24
    return n * u / (1 - n * u)


def _chunking_bounds(family, params, layer, stats):
    """Bounds on |whole - chunked| for the down-projection input amax of each expert and for the
    layer output, when only the expert matmuls are compiled differently (chunked programs have
    other shapes, so XLA may sum their dot products in another order: CPU code differs by
    instruction set).

    gate/up dot products have length H: two orders differ by <= 2 gamma_H a L_g (resp. L_u), with
    a the expert's gate/up input amax (exact, the same program computes it) and L the largest
    row 1-norm of its weight, which also bound |g| <= a L_g, |u| <= a L_u. h = silu(g) u with
    |silu'| <= 1.1 and |silu(g)| <= |g| + 0.28, plus 16 float32 ulps for the roundings of silu and
    the product. The output adds the down dot product (length I, <= 2 gamma_I |h|max L_d plus
    L_d |dh|), weighted by routing weights summing to routed_scaling_factor, plus 16 ulps of the
    output for the roundings of the combine."""
    experts = [[np.asarray(params[f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"], np.float64)
                for p in ("gate_proj", "up_proj", "down_proj")] for e in range(family.num_experts)]
    ulp = 2.0 ** -24
    a = np.asarray(stats.experts.gate_up_input_amax, np.float64)
    down_amax = np.asarray(stats.experts.down_input_amax, np.float64)
    dh = np.zeros(len(experts))
    for e, (g, u, d) in enumerate(experts):
        lg, lu = np.abs(g).sum(axis=1).max(), np.abs(u).sum(axis=1).max()
        eps = 2 * _gamma(g.shape[1])
        dh[e] = 1.1 * eps * a[e] * lg * a[e] * lu + (a[e] * lg + 0.28) * eps * a[e] * lu + 16 * ulp * down_amax[e]
    ld = max(np.abs(d).sum(axis=1).max() for _, _, d in experts)
    inter = experts[0][2].shape[1]
    dy = ld * (2 * _gamma(inter) * down_amax.max() + dh.max())
    return dh, family.spec.routed_scaling_factor * dy


def _same_layer_within_bounds(family, params, reference, other):
    """Layer 1 computed two ways, (hidden, stats) each: routing, counts and the other amaxes equal,
    the down amax and the output within the float32 accumulation bounds of _chunking_bounds."""
    (ref_out, s1), (out, s2) = reference, other
    for key in ("gate_up_input_amax", "tokens_per_expert"):
        np.testing.assert_array_equal(np.asarray(getattr(s2.experts, key)), np.asarray(getattr(s1.experts, key)))
    assert s2.input_amax == s1.input_amax
    dh, dy = _chunking_bounds(family, params, 1, s1)
    diff = np.abs(np.asarray(s2.experts.down_input_amax, np.float64) - np.asarray(s1.experts.down_input_amax))
    assert np.all(diff <= dh), (diff, dh)
    out_diff = float(np.max(np.abs(np.asarray(out, np.float64) - np.asarray(ref_out, np.float64))))
    scale = float(np.max(np.abs(np.asarray(ref_out))))
    assert out_diff <= dy + 16 * 2.0 ** -24 * scale, (out_diff, dy)
    return diff, dh, out_diff, dy


def test_expert_chunking_gives_the_same_layer(checkpoints):
    """Stacking experts a few at a time (memory bound) changes only how XLA sums the expert
    matmuls: routing, token counts and gate/up input amax (computed before the experts, by one
    program) are exact; the down input amax and the output agree within the float32 rounding
    bound of those dot products (_chunking_bounds)."""
    path = checkpoints("deepseek_v3")
    family = get_family(mf.read_config(path))
    assert family.spec.norm_topk_prob  # routing weights sum to routed_scaling_factor (the bound)
    params = mf.load_params(path, family, jnp.float32)
    hidden = family.embed(params, _input_ids(), dtype=jnp.float32)
    whole, s1 = family.layer_forward(1, params, hidden, dtype=jnp.float32)
    family.expert_chunk_size = 3
    chunked, s2 = family.layer_forward(1, params, hidden, dtype=jnp.float32)
    diff, dh, out_diff, dy = _same_layer_within_bounds(family, params, (whole, s1), (chunked, s2))
    print(f"\nchunked vs whole: down amax diff {diff.max():.2e} (bound {dh.min():.2e}..{dh.max():.2e}), "
          f"output diff {out_diff:.2e} (bound {dy:.2e})")


def test_layer_names_split_the_checkpoint():
    config = {"model_type": "kimi_k2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 8,
              "num_attention_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
              "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
    family = get_family(config)
    assert family.name == "deepseek_v3"
    assert [family.is_moe_layer(l) for l in range(2)] == [False, True]
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
             "model.layers.0.self_attn.q_a_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
             "model.layers.10.mlp.gate.weight", "model.layers.2.eh_proj.weight"]
    assert family.layer_param_names(1, names) == ["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert family.layer_param_names(0, names) == ["model.layers.0.self_attn.q_a_proj.weight"]
    assert family.param_dtype("model.layers.1.mlp.gate.weight") == jnp.float32


@pytest.mark.parametrize("bad", [
    {"model_type": "gpt2"},
    {"model_type": "deepseek_v3", "scoring_func": "softmax"},
    {"model_type": "llama", "rope_parameters": {"rope_type": "longrope"}},
])
def test_unsupported_configs_are_refused(bad):
    config = {"hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 8, "num_attention_heads": 4,
              "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, **bad}
    with pytest.raises(ModelConfigError):
        get_family(config)


def test_padded_expert_matmul_gives_the_same_layer(checkpoints, monkeypatch):
    """The padded batched matmul per expert chunk (moe.experts_chunk_padded) against ragged_dot:
    routing, token counts and gate/up input amax are exact (computed before the experts); the down
    input amax and the output agree within the float32 rounding bound of the expert dot products
    (_chunking_bounds), since only the order XLA sums them in may change."""
    from nvfp4_jax.models import moe

    path = checkpoints("deepseek_v3")
    family = get_family(mf.read_config(path))
    params = mf.load_params(path, family, jnp.float32)
    hidden = family.embed(params, _input_ids(), dtype=jnp.float32)
    family.expert_chunk_size = 3
    outputs = {}
    for path_name in ("ragged", "padded"):
        monkeypatch.setenv(moe.MOE_MATMUL_ENV, path_name)
        outputs[path_name] = family.layer_forward(1, params, hidden, dtype=jnp.float32)
    (ragged, s1), (padded, s2) = outputs["ragged"], outputs["padded"]
    _same_layer_within_bounds(family, params, (ragged, s1), (padded, s2))


def test_padded_matmul_rule(monkeypatch):
    """Two tiers: every expert's first c1 rows on the stacks as they are, then the rows past c1 of
    the busier experts, gathered a chunk at a time in descending count; c1 on the capacity ladder
    (16, 24, 32, 48, ...) of least cost in rows (slabs plus a gather cost per gathered expert);
    padded steps of at most PADDED_ROWS_FACTOR (4) times the sorted rows, else ragged_dot."""
    from nvfp4_jax.models import moe

    monkeypatch.delenv(moe.MOE_MATMUL_ENV, raising=False)
    ladder = [moe.padded_capacity(r) for r in (0, 1, 16, 17, 24, 25, 33, 49, 65, 1000)]
    assert ladder == [16, 16, 16, 24, 24, 32, 48, 64, 96, 1024]
    assert moe.PADDED_ROWS_FACTOR == 4
    sizes = np.array([10, 30, 0, 5, 200, 1, 0, 0], np.int64)  # 246 sorted rows

    def steps(plan):
        return [(None if s.experts is None else list(s.experts), s.capacity, s.skip) for s in plan]

    # costs (gather 16 rows an expert): c1=0: [4] 256 alone (its middle-of-2 neighbour, 30 rows,
    # needs 32 < 256 / 2), then [1,0] 32, [3,5] 16 -> 256+64+32+5x16 = 432; c1=16: 128, then past
    # 16: [4] (184 rows) 192 alone, [1] (14) 16 -> 128+192+16+2x16 = 368; c1=32: 256+192+16 = 464;
    # c1=48: 384+192+16 = 592; c1=96: 768+128+16 = 912; c1=128: 8 x 128 > 4 x 246: stop
    assert steps(moe.expert_matmul_plan(sizes, 2, 246, gather_rows=16)) == [(None, 16, 0), ([4], 192, 16),
                                                                            ([1], 16, 16)]
    # gathers so dear that one tier covers every row, where the rule lets 8 x 256 rows be padded
    assert steps(moe.expert_matmul_plan(sizes, 4, 600, gather_rows=10_000)) == [(None, 256, 0)]
    # no first tier (10 x 16 > 4 x 35): chunks of 4, the last 3 busy experts padded to 4 (expert 7)
    seven = np.array([5] * 7 + [0] * 3, np.int64)
    assert steps(moe.expert_matmul_plan(seven, 4, 35)) == [([0, 1, 2, 3], 16, 0), ([4, 5, 6, 7], 16, 0)]
    assert moe.expert_matmul_plan(np.zeros(8, np.int64), 2, 0) == []
    # 10 rows over 64 experts: 64 x 16 > 4 x 10, and one chunk of 16 x 16 too: ragged
    spread = np.array([1] * 10 + [0] * 54, np.int64)
    assert moe.expert_matmul_plan(spread, 64, 10) is None
    monkeypatch.setenv(moe.MOE_MATMUL_ENV, "padded")
    # forced: the 10 busy experts and 6 without rows, a power of two (16 x 16 rows + 16 gathers
    # against 64 x 16 for a first tier)
    assert steps(moe.expert_matmul_plan(spread, 64, 10, gather_rows=16)) == [(list(range(16)), 16, 0)]
    monkeypatch.setenv(moe.MOE_MATMUL_ENV, "ragged")
    assert moe.expert_matmul_plan(sizes, 2, 246) is None


def test_stacks_built_once_serve_every_batch(checkpoints):
    """layer_forward with the layer's experts stacked once (family.expert_stacks, as calibration
    passes them) gives the bytes of the per-call stacking on two different batches; stacks of
    another expert count are refused; a dense layer has no stacks."""
    import jax

    path = checkpoints("deepseek_v3")
    family = get_family(mf.read_config(path))
    params = mf.load_params(path, family, jnp.bfloat16)
    stacks = family.expert_stacks(1, params, jnp.bfloat16)
    assert family.expert_stacks(0, params, jnp.bfloat16) is None
    assert stacks.gate.shape[0] == family.spec.num_experts and stacks.gate.dtype == jnp.bfloat16
    ids = _input_ids()
    for batch in (ids, ids[:, ::-1].copy()):
        hidden = family.embed(params, batch, dtype=jnp.bfloat16)
        (a, sa), (b, sb) = (family.layer_forward(1, params, hidden, dtype=jnp.bfloat16, experts=s)
                            for s in (None, stacks))
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for x, y in zip(jax.tree.leaves(jax.device_get(sa)), jax.tree.leaves(jax.device_get(sb))):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    fewer = type(stacks)(*(s[:-1] for s in stacks))
    with pytest.raises(ModelConfigError, match="stacked experts"):
        family.layer_forward(1, params, hidden, dtype=jnp.bfloat16, experts=fewer)


def test_experts_moved_into_stacks_free_the_per_expert_arrays_and_run_the_same(checkpoints):
    """move_experts_into_stacks leaves the layer's routed experts only as stacks (their per-expert
    entries gone, the stacks equal to numpy stacks of them) and layer_forward on those tensors
    gives the bytes of the per-expert tensors; a LayerTensors flattens and rebuilds as a pytree."""
    import jax

    from nvfp4_jax.models.moe import LayerTensors

    path = checkpoints("deepseek_v3")
    family = get_family(mf.read_config(path))
    params = mf.load_params(path, family, jnp.bfloat16)
    prefix = family.layer_prefix(1) + "mlp.experts."
    held = LayerTensors(params)
    family.move_experts_into_stacks(1, held, jnp.bfloat16)
    assert not [k for k in held if k.startswith(prefix)] and [k for k in params if k.startswith(prefix)]
    for stack, proj in zip(held.expert_stacks, ("gate_proj", "up_proj", "down_proj")):
        ref = np.stack([np.asarray(params[f"{prefix}{e}.{proj}.weight"]) for e in range(family.spec.num_experts)])
        assert np.asarray(stack).tobytes() == ref.tobytes(), proj
    hidden = family.embed(params, _input_ids(), dtype=jnp.bfloat16)
    (a, sa), (b, sb) = (family.layer_forward(1, p, hidden, dtype=jnp.bfloat16) for p in (params, held))
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    for x, y in zip(jax.tree.leaves(jax.device_get(sa)), jax.tree.leaves(jax.device_get(sb))):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    rebuilt = jax.tree.map(lambda x: x, held)
    assert isinstance(rebuilt, LayerTensors) and rebuilt.keys() == held.keys()
    assert rebuilt.expert_stacks.gate.shape == held.expert_stacks.gate.shape
