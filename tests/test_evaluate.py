"""`nvfp4-jax eval` (nvfp4_jax/evaluate.py) and the cross-framework check of the NVFP4 forward.

- llama-tiny and kimi-k2-tiny are built, converted (built-in calibration tokens) and evaluated:
  report keys, KL >= 0, top-1 agreement in [0, 1], finite perplexities, per-layer errors, plot.
- a copy of the llama checkpoint with every packed FP4 weight byte randomized gives a KL far above
  the good checkpoint's.
- the same checkpoint rewritten as compressed-tensors nvfp4-pack-quantized evaluates alike.
- cross-framework: the NVFP4 checkpoint dequantized with torch_bridge.reference into transformers'
  LlamaForCausalLM (float32, input fake quant by forward pre-hooks) gives the logits of the JAX
  fake-quant forward in float32 (figure printed; run with -s).

Run with -s to see the printed figures.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import jax.numpy as jnp

from nvfp4_jax import evaluate as ev
from nvfp4_jax.checkpoint import formats
from nvfp4_jax.checkpoint.safetensors_io import FileCache, read_header, save_file
from nvfp4_jax.examples import build_kimi_k2_tiny, build_llama_tiny, calibration_samples
from nvfp4_jax.pipeline import ConvertOptions, convert

# the calibration batch shape (8 x 64) equals eval's default: layer functions compile once
SAMPLES, SEQ = 8, 64


def _build_and_convert(tmp, builder, fmt="modelopt"):
    src = builder(tmp / "src")
    toks = calibration_samples(src / "tokenizer.json", SAMPLES, SEQ)
    convert(src, tmp / "nvfp4", ConvertOptions(calib_tokens=toks, progress=False, fmt=fmt), log=lambda m: None)
    return src, tmp / "nvfp4"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build_and_convert(tmp_path_factory.mktemp("llama"), build_llama_tiny)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    return _build_and_convert(tmp_path_factory.mktemp("kimi"), build_kimi_k2_tiny)


def _run(src, ckpt, out, capsys=None):
    assert ev.run_eval(src, ckpt, out=str(out), num_samples=SAMPLES, seq_len=SEQ) == 0
    return json.loads((out / "eval_report.json").read_text())


def _check_report(rep, num_layers):
    for key in ("kl", "top1_agreement", "perplexity", "layers", "modules", "weight_error", "tokens",
                "routing_agreement", "format", "family"):
        assert key in rep, key
    k = rep["kl"]
    assert set(k) == {"mean", "median", "p99", "max"}
    assert 0 <= k["median"] <= k["p99"] <= k["max"] and 0 <= k["mean"] <= k["max"]
    assert 0.0 <= rep["top1_agreement"] <= 1.0
    assert all(np.isfinite(v) and v > 1 for v in rep["perplexity"].values())
    assert rep["tokens"] == SAMPLES * SEQ
    assert len(rep["layers"]) == num_layers
    for row in rep["layers"]:
        if row["rel_error"] is not None:
            # FP4 E2M1 with E4M3 block scales: ~10% relative error on Gaussian weights
            assert 0.03 < row["rel_error"] < 0.2, row
    assert all(0 < m["rel_error"] < 0.2 for m in rep["modules"].values())


def test_eval_llama_and_corrupted_checkpoint(llama, tmp_path):
    src, ckpt = llama
    rep = _run(src, ckpt, ckpt / "eval")
    _check_report(rep, 2)
    assert rep["format"] == "modelopt" and rep["weight_error"]["modules"] == 14
    assert (ckpt / "eval" / "eval_plot.png").stat().st_size > 10_000
    assert rep["top1_agreement"] > 0.7

    # randomize every packed FP4 byte: the model is garbage, the KL must show it
    bad = tmp_path / "corrupt"
    shutil.copytree(ckpt, bad, ignore=shutil.ignore_patterns("eval"))
    rng = np.random.default_rng(1)
    for f in bad.glob("*.safetensors"):
        entries, _ = read_header(f)
        with open(f, "r+b") as fh:
            for name, e in entries.items():
                if name.endswith(".weight") and e.dtype == "U8":
                    fh.seek(e.start)
                    fh.write(rng.integers(0, 256, e.nbytes, dtype=np.uint8).tobytes())
    rep_bad = _run(src, bad, tmp_path / "eval_bad")
    print(f"\nllama-tiny: KL mean good {rep['kl']['mean']:.3g} vs corrupted {rep_bad['kl']['mean']:.3g}; "
          f"top-1 {rep['top1_agreement']:.3f} vs {rep_bad['top1_agreement']:.3f}; weight error "
          f"{rep['weight_error']['rel_error']:.3f} vs {rep_bad['weight_error']['rel_error']:.3f}")
    # (the tiny random model's logits are dominated by the embedding path, which stays bf16)
    assert rep_bad["kl"]["mean"] > 20 * rep["kl"]["mean"]
    assert rep_bad["top1_agreement"] < rep["top1_agreement"]
    assert rep_bad["weight_error"]["rel_error"] > 0.5


def test_eval_kimi_k2_tiny(kimi, tmp_path):
    src, ckpt = kimi
    rep = _run(src, ckpt, tmp_path / "eval")
    _check_report(rep, 3)
    # mlp_only preset: attention stays bf16, the dense MLP, shared and routed experts are quantized
    assert not any(".self_attn." in m for m in rep["modules"])
    assert sum(".experts." in m for m in rep["modules"]) == 2 * 16 * 3
    assert set(rep["routing_agreement"]) == {"1", "2"}
    assert all(0 <= v["same_topk_set"] <= 1 for v in rep["routing_agreement"].values())
    print(f"\nkimi-k2-tiny: KL mean {rep['kl']['mean']:.3g} p99 {rep['kl']['p99']:.3g}, "
          f"top-1 {rep['top1_agreement']:.3f}, routing {rep['routing_agreement']}")


def test_routed_expert_input_hook_quantizes_each_row_with_its_experts_amax():
    """experts_chunk with per-expert input amax == experts run on inputs fake-quantized row by row
    with the amax of the row's expert (gate/up input and down input); reference: torch_bridge."""
    torch = pytest.importorskip("torch")
    from torch_bridge import reference

    from nvfp4_jax.models.moe import Dispatch, ExpertInputAmax, ExpertStacks, experts_chunk_jit

    rng = np.random.default_rng(0)
    h, inter, e = 32, 16, 3
    x = rng.standard_normal((7, h)).astype(np.float32)
    expert_sorted = np.asarray([0, 0, 1, 1, 1, 2, 2], np.int32)
    w = lambda *s: [(rng.standard_normal(s) * 0.2).astype(np.float32) for _ in range(e)]  # noqa: E731
    gate, up, down = w(inter, h), w(inter, h), w(h, inter)
    gu_amax = np.asarray([1.5, 2.0, 30.0], np.float32)  # expert 0: saturating
    dn_amax = np.asarray([0.1, 0.5, 4.0], np.float32)
    dispatch = Dispatch(jnp.asarray(x), jnp.asarray(expert_sorted), None, jnp.asarray([2, 3, 2], jnp.int32), None)
    weights = ExpertStacks(*(jnp.asarray(np.stack(ws)) for ws in (gate, up, down)))
    y, *_ = experts_chunk_jit(dispatch, jnp.int32(0), weights, ExpertInputAmax(jnp.asarray(gu_amax), jnp.asarray(dn_amax)),
                             act_name="silu")
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    fq = lambda v, a: reference.fake_quant(torch.from_numpy(v), float(a)).numpy()  # noqa: E731
    ref, plain = [], []
    for r in range(7):
        k = expert_sorted[r]
        xr = fq(x[r:r + 1], gu_amax[k])
        hr = silu(xr @ gate[k].T) * (xr @ up[k].T)
        ref.append(fq(hr, dn_amax[k]) @ down[k].T)
        plain.append((silu(x[r:r + 1] @ gate[k].T) * (x[r:r + 1] @ up[k].T)) @ down[k].T)
    np.testing.assert_allclose(np.asarray(y), np.concatenate(ref), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(y), np.concatenate(plain), atol=1e-3)


def test_compressed_tensors_checkpoint_evaluates_alike(llama, tmp_path):
    src, ckpt = llama
    ct = tmp_path / "ct"
    ct.mkdir()
    cache = FileCache()
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        entries, _ = read_header(f)
        for name, e in entries.items():
            for n, a in formats.to_compressed_tensors(name, np.array(cache.read(e))):
                tensors[n] = np.asarray(a)
    save_file(ct / "model.safetensors", tensors, {"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = formats.compressed_tensors_config(cfg["quantization_config"]["ignore"])
    (ct / "config.json").write_text(json.dumps(cfg))
    tokens = ev.heldout_tokens(src, None, SAMPLES, SEQ)
    a = ev.forward_both(src, ckpt, tokens)
    b = ev.forward_both(src, ct, tokens)
    assert b["format"] == "compressed-tensors"
    # 1/(1/s) may differ from s by an ulp: logits agree to bf16 noise
    rng_ = float(np.ptp(a["logits_q"]))
    assert float(np.max(np.abs(a["logits_q"] - b["logits_q"]))) <= 0.02 * rng_
    for m, v in a["modules"].items():
        assert abs(v["rel_error"] - b["modules"][m]["rel_error"]) < 1e-5


def test_source_checkpoint_as_ckpt_is_refused(llama):
    src, _ = llama
    with pytest.raises(ev.EvalError, match="NVFP4"):
        ev.NVFP4Checkpoint(src)


def test_input_amax_round_trips_to_the_input_scale():
    from nvfp4_jax import numerics

    rng = np.random.default_rng(0)
    amax = rng.uniform(1e-3, 3e4, 300).astype(np.float32)
    scales = np.asarray(numerics.scale_from_amax(amax), np.float32)  # what calibration writes
    back = np.asarray([ev.input_amax_from_scale(s) for s in scales], np.float32)
    np.testing.assert_array_equal(np.asarray(numerics.scale_from_amax(back), np.float32), scales)


def test_cross_framework_llama_logits(llama):
    """torch_bridge + transformers (float32) vs the JAX fake-quant forward (float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch_bridge import reference
    from torch_bridge.arrays import to_torch

    src, ckpt = llama
    tokens = ev.heldout_tokens(src, None, 2, SEQ)
    logits_j = ev.forward_both(src, ckpt, tokens, dtype=jnp.float32, with_source=False)["logits_q"]

    q = ev.NVFP4Checkpoint(ckpt)
    cfg = transformers.AutoConfig.from_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                          dtype=torch.float32).eval()
    qset = set(q.quantized)
    state = {}
    for name in model.state_dict():
        mod = name[: -len(".weight")]
        if mod in qset:
            state[name] = reference.dequantize(to_torch(q.raw(f"{mod}.weight")),
                                               to_torch(q.raw(f"{mod}.weight_scale")),
                                               to_torch(q.raw(f"{mod}.weight_scale_2")), dtype=torch.float32)
        else:
            state[name] = to_torch(q.raw(name)).float()
    model.load_state_dict(state, strict=True)
    handles = []
    for name, module in model.named_modules():
        if name in qset:
            amax = float(ev.input_amax_from_scale(q.raw(f"{name}.input_scale")))

            def pre(m, args, amax=amax):
                return (reference.fake_quant(args[0], amax),) + tuple(args[1:])

            handles.append(module.register_forward_pre_hook(pre))
    assert len(handles) == len(qset) == 14
    ids = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        logits_t = model(ids).logits.numpy()
        for hnd in handles:
            hnd.remove()
        logits_no_input_quant = model(ids).logits.numpy()
    diff = float(np.max(np.abs(logits_t - logits_j)))
    rng_ = float(np.ptp(logits_j))
    effect = float(np.max(np.abs(logits_no_input_quant - logits_j)))
    print(f"\ncross-framework (llama-tiny, float32, {tokens.size} tokens): max |torch - jax| logit diff "
          f"{diff:.3g}, logit range {rng_:.3g}, relative {diff / rng_:.2e}; argmax agreement "
          f"{np.mean(logits_t.argmax(-1) == logits_j.argmax(-1)):.4f}; input fake quant moves logits by {effect:.3g}")
    assert diff <= 1e-4 * rng_
    # the activation quantization both sides apply is far larger than their difference
    assert effect > 100 * diff


def test_layer_forward_input_amax_argument(kimi):
    """input_amax={} changes nothing, a named linear's input is fake-quantized (the output moves
    by far more than rounding), a name that is no linear of the layer, or only some routed
    experts, is refused."""
    from nvfp4_jax.checkpoint.reader import CheckpointReader
    from nvfp4_jax.models import ModelConfigError, get_family

    src, _ = kimi
    reader = CheckpointReader(src)
    family = get_family(reader.config)
    params = {**family.read_layer(reader, 1, jnp.float32),
              **reader.get_many(family.embed_param_names(reader.names()), jnp.float32)}
    reader.close()
    hidden = family.embed(params, np.arange(16, dtype=np.int32).reshape(2, 8), dtype=jnp.float32)
    plain, s0 = family.layer_forward(1, params, hidden, dtype=jnp.float32)
    same, _ = family.layer_forward(1, params, hidden, dtype=jnp.float32, input_amax={})
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    o_proj = "model.layers.1.self_attn.o_proj"
    quant, _ = family.layer_forward(1, params, hidden, dtype=jnp.float32,
                                    input_amax={o_proj: s0.input_amax[o_proj]})
    assert not np.allclose(np.asarray(quant), np.asarray(plain), rtol=0, atol=1e-3)
    with pytest.raises(ModelConfigError, match="no linear"):
        family.layer_forward(1, params, hidden, input_amax={"model.layers.1.input_layernorm": 1.0})
    with pytest.raises(ModelConfigError, match="some but not all routed experts"):
        family.layer_forward(1, params, hidden, input_amax={"model.layers.1.mlp.experts.0.gate_proj": 1.0})
    with pytest.raises(ModelConfigError, match="no routed expert linear"):
        family.layer_forward(1, params, hidden, input_amax={"model.layers.1.mlp.experts.99.gate_proj": 1.0})
