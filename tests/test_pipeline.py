"""End-to-end conversion: golden ModelOpt bytes, the Kimi INT4 path, MoE coverage, resume."""

import json
import os
import signal
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from nvfp4_jax import __version__, examples
from nvfp4_jax.pipeline import ConversionError, ConvertOptions, convert
from nvfp4_jax.verify import verify
from tests.checkpoint_files import load_dir
from tests.cli_process import start_cli, wait_for_first_layer
from tests.paths import TINY_LLAMA
from torch_bridge import reference


@pytest.fixture(scope="module")
def golden_conversion(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "out"
    tokens = json.loads((TINY_LLAMA / "calib_tokens.json").read_text())["input_ids"]
    report = convert(TINY_LLAMA / "source", out, ConvertOptions(calib_tokens=tokens, preset="all", progress=False))
    return out, report


def test_golden_weights_byte_identical(golden_conversion):
    out, _ = golden_conversion
    ours, ref = load_dir(out), load_dir(TINY_LLAMA / "modelopt_nvfp4")
    assert sorted(ours) == sorted(ref)
    for name, r in ref.items():
        if name.endswith("input_scale"):
            continue
        assert ours[name].dtype == r.dtype and ours[name].shape == r.shape, name
        assert ours[name].tobytes() == r.tobytes(), name


def test_golden_input_scales_within_1e2(golden_conversion):
    out, _ = golden_conversion
    ours, ref = load_dir(out), load_dir(TINY_LLAMA / "modelopt_nvfp4")
    rel = {n: abs(float(ours[n]) - float(r)) / float(r) for n, r in ref.items() if n.endswith("input_scale")}
    worst = max(rel, key=rel.get)
    print(f"largest input_scale relative difference: {rel[worst]:.4g} ({worst})")
    assert len(rel) == 14 and rel[worst] <= 1e-2


def test_golden_configs_agree_apart_from_producer_version(golden_conversion):
    out, _ = golden_conversion

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k != "version"}
        return d

    for name in ("config.json", "hf_quant_config.json"):
        ours = json.loads((out / name).read_text())
        ref = json.loads((TINY_LLAMA / "modelopt_nvfp4" / name).read_text())
        assert strip(ours) == strip(ref), name
        producer = ours["producer"] if name == "hf_quant_config.json" else ours["quantization_config"]["producer"]
        assert producer["version"] == f"nvfp4_jax-{__version__}", name  # ours, not ModelOpt's
    assert (out / "generation_config.json").exists()
    assert verify(out) == []


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    d = tmp_path_factory.mktemp("kimi")
    src = examples.build_kimi_k2_tiny(d / "src", seed=3)
    return src


def _ct_decoded(src) -> dict[str, torch.Tensor]:
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(src).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return CompressedTensorsDequantizer(src, dtype=torch.bfloat16).process(tensors)


def test_kimi_int4_experts_match_independent_quantization(kimi, tmp_path):
    """Every routed expert: the bytes of quantizing the compressed-tensors-decoded bf16 weight
    (torch_bridge, independent of the JAX path), gate/up with their shared amax."""
    tokens = examples.calibration_samples(kimi / "tokenizer.json", 8, 32)
    out = tmp_path / "out"
    report = convert(kimi, out, ConvertOptions(calib_tokens=tokens, progress=False))
    assert report["preset"] == "mlp_only"
    decoded = _ct_decoded(kimi)
    ours = load_dir(out)
    n_checked = 0
    for layer in (1, 2):
        for e in range(16):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            g, u = decoded[p + "gate_proj.weight"], decoded[p + "up_proj.weight"]
            group_amax = torch.maximum(g.float().abs().max(), u.float().abs().max())
            for proj, w, amax in (("gate_proj", g, group_amax), ("up_proj", u, group_amax),
                                  ("down_proj", decoded[p + "down_proj.weight"], None)):
                ref = reference.quantize(w, amax)
                assert ours[p + proj + ".weight"].tobytes() == ref["weight"].numpy().tobytes(), p + proj
                assert ours[p + proj + ".weight_scale"].tobytes() == ref["weight_scale"].view(torch.uint8).numpy().tobytes()
                assert ours[p + proj + ".weight_scale_2"].tobytes() == ref["weight_scale_2"].numpy().tobytes()
                n_checked += 1
    assert n_checked == 96
    # no INT4 leftovers; attention stays bf16 under mlp_only; routers stay
    assert not any(k.endswith(("weight_packed", "weight_shape")) for k in ours)
    assert ours["model.layers.1.self_attn.q_a_proj.weight"].dtype == ml_dtypes.bfloat16
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in ours
    assert verify(out) == []


def test_moe_coverage_with_tiny_calibration(kimi, tmp_path):
    """Two short samples cannot reach all 16 experts: the run succeeds, every expert has its four
    tensors, fused groups share scales and the back-filled input scales equal an independent
    computation (torch_bridge calibration of the same model and tokens)."""
    from transformers import AutoModelForCausalLM

    from torch_bridge.calibration import calibrate

    tokens = [examples.calibration_samples(kimi / "tokenizer.json", 1, 3)[0]]
    out = tmp_path / "out"
    report = convert(kimi, out, ConvertOptions(calib_tokens=tokens, progress=False, compute_dtype="float32"))
    without = report["experts_without_tokens"]
    assert set(without) == {"model.layers.1", "model.layers.2"}
    assert all(v > 0 for v in without.values()), without  # 3 tokens x top-2 < 16 experts
    ours = load_dir(out)
    for layer in (1, 2):
        cov = report["moe_coverage"][f"model.layers.{layer}"]
        assert cov["tokens_total"] == 3 * 2 and cov["experts_without_tokens"] == without[f"model.layers.{layer}"]
        for e in range(16):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for t in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
                    assert p + f"{proj}.{t}" in ours
            assert ours[p + "gate_proj.weight_scale_2"] == ours[p + "up_proj.weight_scale_2"]
            assert ours[p + "gate_proj.input_scale"] == ours[p + "up_proj.input_scale"]

    # independent: torch model (transformers DeepseekV3, float32) with torch_bridge hooks
    model = _torch_kimi(kimi, tmp_path, torch.float32)
    stats = calibrate(model, [torch.tensor(tokens)])
    for layer in (1, 2):
        ex = stats["experts"][f"model.layers.{layer}.mlp.experts"]
        counts = np.asarray(ex["tokens_per_expert"])
        assert int((counts == 0).sum()) == without[f"model.layers.{layer}"]
        seen = counts > 0
        gate_up_max = np.float32(np.asarray(ex["gate_up_input_amax"])[seen].max())
        down_max = np.float32(np.asarray(ex["down_input_amax"])[seen].max())
        for e in range(16):  # layer-max policy: every expert gets the layer max, per projection
            p = f"model.layers.{layer}.mlp.experts.{e}."
            np.testing.assert_allclose(float(ours[p + "gate_proj.input_scale"]), gate_up_max / np.float32(2688), rtol=1e-5)
            np.testing.assert_allclose(float(ours[p + "down_proj.input_scale"]), down_max / np.float32(2688), rtol=1e-5)
    assert verify(out) == []


def _torch_kimi(kimi, tmp_path, dtype):
    """The same weights (INT4 experts decoded by compressed-tensors) as a transformers DeepseekV3."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = json.loads((kimi / "config.json").read_text())
    tdir = tmp_path / "as_deepseek"
    tdir.mkdir(exist_ok=True)
    cfg_t = dict(cfg, model_type="deepseek_v3")
    cfg_t.pop("quantization_config")
    cfg_t.pop("auto_map")
    (tdir / "config.json").write_text(json.dumps(cfg_t))
    save_file({k: v.contiguous() for k, v in _ct_decoded(kimi).items()}, str(tdir / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(tdir, dtype=dtype)


def test_bf16_calibration_agrees_with_torch_bridge(kimi, tmp_path):
    """JAX pipeline vs torch_bridge hooks on transformers, both bf16, same weights and tokens:
    every input amax within relative 1e-2; routing differences counted and reported."""
    from torch_bridge.calibration import calibrate

    tokens = examples.calibration_samples(kimi / "tokenizer.json", 4, 32)
    report = convert(kimi, tmp_path / "out", ConvertOptions(calib_tokens=tokens, progress=False))
    ours = report["calibration_stats"]
    theirs = calibrate(_torch_kimi(kimi, tmp_path, torch.bfloat16), [torch.tensor(tokens)])
    rel = {m: abs(a - theirs["input_amax"][m]) / theirs["input_amax"][m] for m, a in ours["input_amax"].items()}
    assert len(rel) >= 20
    flipped_layer_rel = {}
    for prefix, ex in ours["experts"].items():
        ref = theirs["experts"][prefix]
        moved = int(np.abs(np.asarray(ex["tokens_per_expert"]) - np.asarray(ref["tokens_per_expert"])).sum()) // 2
        print(f"{prefix}: {moved} of {sum(ref['tokens_per_expert'])} routing decisions differ in bf16")
        for key in ("gate_up_input_amax", "down_input_amax"):  # the layer max the default policy uses
            r = abs(max(ex[key]) - max(ref[key])) / max(ref[key])
            # a token routed elsewhere meets other expert weights: its amax is not comparable
            (flipped_layer_rel if moved else rel)[f"{prefix} {key} (layer max)"] = r
    worst = max(rel, key=rel.get)
    print(f"largest relative input amax difference (bf16): {rel[worst]:.3g} at {worst}")
    print(f"layers with routing differences: {flipped_layer_rel}")
    assert rel[worst] <= 1e-2, worst
    assert all(r <= 2e-2 for r in flipped_layer_rel.values()), flipped_layer_rel


def test_per_expert_policy_keeps_own_amax(kimi, tmp_path):
    tokens = examples.calibration_samples(kimi / "tokenizer.json", 2, 16)
    out = tmp_path / "out"
    convert(kimi, out, ConvertOptions(calib_tokens=tokens, progress=False, moe_policy="per-expert"))
    ours = load_dir(out)
    scales = {float(ours[f"model.layers.1.mlp.experts.{e}.down_proj.input_scale"]) for e in range(16)}
    assert len(scales) > 1  # experts keep their own amax


def test_calibration_free_run_is_recorded(kimi, tmp_path):
    out = tmp_path / "out"
    convert(kimi, out, ConvertOptions(input_scale_constant=1.0, progress=False, preset="experts_only"))
    ours = load_dir(out)
    assert float(ours["model.layers.2.mlp.experts.5.up_proj.input_scale"]) == 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert "calibration-free" in cfg["quantization_config"]["producer"]["calibration"]
    assert "model.layers.0.mlp.gate_proj.input_scale" not in ours  # experts_only: dense MLP stays bf16


def test_no_calibration_data_is_an_error(kimi, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        convert(kimi, tmp_path / "out", ConvertOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        convert(TINY_LLAMA / "source", out, ConvertOptions(input_scale_constant=1.0, progress=False))


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    """Kill a conversion after its first finished layer, resume it, compare with a clean run."""
    src = examples.build_kimi_k2_tiny(tmp_path / "src", seed=5)
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps({"input_ids": examples.calibration_samples(src / "tokenizer.json", 4, 32)}))
    args = ["convert", src, None, "--calib-tokens", tok, "--shard-size", "300000", "--quiet"]

    clean = tmp_path / "clean"
    p = start_cli(*[clean if a is None else a for a in args], merge_stderr=True)
    assert p.wait(timeout=300) == 0, p.stdout.read()

    out = tmp_path / "out"
    p = start_cli(*[out if a is None else a for a in args], merge_stderr=True)
    wait_for_first_layer(out, p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists(), "a killed run must never leave OUT"
    assert Path(str(out) + ".partial").exists()

    p = start_cli(*[out if a is None else a for a in args], "--resume", merge_stderr=True)
    assert p.wait(timeout=300) == 0, p.stdout.read()
    files = sorted(f.name for f in clean.iterdir() if f.name != "nvfp4_report.json")
    assert files == sorted(f.name for f in out.iterdir() if f.name != "nvfp4_report.json")
    assert sum(f.endswith(".safetensors") for f in files) > 1  # several shards
    for f in files:
        assert (clean / f).read_bytes() == (out / f).read_bytes(), f


def test_nan_in_source_weight_names_the_tensor(tmp_path):
    src = examples.build_llama_tiny(tmp_path / "src")
    from nvfp4_jax.checkpoint.safetensors_io import save_file

    t = load_dir(src)
    w = t["model.layers.1.mlp.up_proj.weight"].astype(np.float32)
    w[3, 5] = np.nan
    t["model.layers.1.mlp.up_proj.weight"] = w.astype(ml_dtypes.bfloat16)
    save_file(src / "model.safetensors", t)
    from nvfp4_jax.errors import NVFP4Error

    with pytest.raises(NVFP4Error, match=r"model\.layers\.1\.mlp\.up_proj\.weight of layer 1 holds nan at index \[3, 5\]"):
        convert(src, tmp_path / "out", ConvertOptions(input_scale_constant=1.0, progress=False))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_cli_calibration_text_is_tokenized_with_the_source_tokenizer(tmp_path, kind, capsys):
    from tokenizers import Tokenizer

    from nvfp4_jax.cli import main

    src = examples.build_llama_tiny(tmp_path / "src")
    text = "Calibration text for the converter. " * 8
    f = tmp_path / f"calib.{kind}"
    f.write_text(text if kind == "txt" else "\n".join(json.dumps({"text": t}) for t in (text, text[:50])))
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--calib", str(f), "--seq-len", "64", "--quiet"]) == 0
    report = json.loads((out / "nvfp4_report.json").read_text())
    n_ids = len(Tokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids)
    if kind == "txt":  # one text, cut into windows of --seq-len tokens
        assert report["calibration"]["samples"] == -(-n_ids // 64)
        assert report["calibration"]["tokens"] == n_ids
    else:  # one sample per record, truncated to --seq-len
        assert report["calibration"]["samples"] == 2
        assert report["calibration"]["tokens"] == 64 + len(Tokenizer.from_file(str(src / "tokenizer.json")).encode(text[:50]).ids)
    assert "conversion report" in capsys.readouterr().out


def test_cli_bad_calibration_file_is_a_clear_error(tmp_path, capsys):
    from nvfp4_jax.cli import main

    src = examples.build_llama_tiny(tmp_path / "src")
    f = tmp_path / "calib.jsonl"
    f.write_text('{"txt": "no text field"}\n')
    assert main(["convert", str(src), str(tmp_path / "out"), "--calib", str(f)]) != 0
    assert "calib.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_k_not_multiple_of_16_stays_bf16_and_is_reported(tmp_path):
    """A linear whose K is not a multiple of 16 is left in bf16, listed in exclude_modules and named
    in the report; it is never padded (SPEC section 2)."""
    from nvfp4_jax.checkpoint.safetensors_io import save_file

    src = examples.build_llama_tiny(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 360  # down_proj K = 360
    (src / "config.json").write_text(json.dumps(cfg))
    t = load_dir(src)
    rng = np.random.default_rng(0)
    for l in range(2):
        for name, shape in (("gate_proj", (360, 128)), ("up_proj", (360, 128)), ("down_proj", (128, 360))):
            t[f"model.layers.{l}.mlp.{name}.weight"] = (rng.standard_normal(shape) * 0.05).astype(ml_dtypes.bfloat16)
    save_file(src / "model.safetensors", t)
    out = tmp_path / "out"
    report = convert(src, out, ConvertOptions(input_scale_constant=1.0, progress=False))
    assert report["excluded_k_not_multiple_of_16"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    ours = load_dir(out)
    assert ours["model.layers.1.mlp.down_proj.weight"].tobytes() == t["model.layers.1.mlp.down_proj.weight"].tobytes()
    assert "model.layers.1.mlp.down_proj.weight_scale" not in ours
    assert ours["model.layers.1.mlp.up_proj.weight"].dtype == np.uint8
    hf = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert hf == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert verify(out) == []


def test_without_room_for_expert_stacks_the_bytes_are_the_same(kimi, tmp_path, monkeypatch):
    """A device too small for a layer's expert stacks falls back to stacking inside each batch's
    programs: same output bytes, and the size rule itself on hand-computed sizes."""
    from nvfp4_jax import calibration

    assert calibration.stacks_fit(10, None)  # no allocator limit known (CPU)
    assert calibration.stacks_fit(28, 100) and not calibration.stacks_fit(29, 100)  # 3 x 28 <= 85 < 3 x 29
    tokens = examples.calibration_samples(kimi / "tokenizer.json", 2, 16)
    convert(kimi, tmp_path / "a", ConvertOptions(calib_tokens=tokens, progress=False))
    built = []
    real = calibration.stacks_fit
    monkeypatch.setattr(calibration, "stacks_fit", lambda n, limit: built.append(real(n, limit)) or False)
    convert(kimi, tmp_path / "b", ConvertOptions(calib_tokens=tokens, progress=False))
    assert built and all(built)  # asked for every MoE layer, and the stacks would have fit
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("weight_scales", ["max", "local-hessian"])
def test_experts_held_as_stacks_give_the_files_of_per_expert_arrays(kimi, tmp_path, monkeypatch, weight_scales):
    """A calibrated conversion whose MoE layers hold their routed experts as stacks only (the
    per-expert arrays dropped at the read; calibration, local-hessian's second forward and the
    quantize phase reading the stacks) writes the same files, byte for byte, as one that keeps the
    per-expert arrays (stacks_fit forced false: no stacks at all, every weight its own array)."""
    from nvfp4_jax import calibration
    from nvfp4_jax.models import moe

    tokens = examples.calibration_samples(kimi / "tokenizer.json", 2, 16)
    moved = []
    real_move = moe.ExpertNames.move_into_stacks
    monkeypatch.setattr(moe.ExpertNames, "move_into_stacks",
                        lambda self, params, dtype: moved.append(self.prefix) or real_move(self, params, dtype))
    options = ConvertOptions(calib_tokens=tokens, progress=False, weight_scales=weight_scales)
    convert(kimi, tmp_path / "stacks", options)
    assert moved == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]  # every MoE layer of kimi-k2-tiny
    monkeypatch.setattr(calibration, "stacks_fit", lambda n, limit: False)
    convert(kimi, tmp_path / "arrays", options)
    assert len(moved) == 2
    files = sorted(p.name for p in (tmp_path / "stacks").iterdir() if p.name != "nvfp4_report.json")
    assert files == sorted(p.name for p in (tmp_path / "arrays").iterdir() if p.name != "nvfp4_report.json")
    assert any(f.endswith(".safetensors") for f in files)
    for f in files:
        assert (tmp_path / "stacks" / f).read_bytes() == (tmp_path / "arrays" / f).read_bytes(), f
