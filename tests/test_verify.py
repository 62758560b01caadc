import io
import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nvfp4_jax.checkpoint.layout import get_layout
from nvfp4_jax.cli import main as cli_main
from nvfp4_jax.verify import Finding, run_verify, verify

from tests.paths import TINY_LLAMA

GOLDEN = TINY_LLAMA / "modelopt_nvfp4"

# ---------------------------------------------------------------------------------------------
# raw safetensors helpers (independent of the package's reader/writer)
# ---------------------------------------------------------------------------------------------
_NP = {"U8": np.uint8, "F32": np.float32, "BF16": np.uint16, "F8_E4M3": np.uint8, "I32": np.int32}


def read_st(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    meta = hdr.pop("__metadata__", None)
    out = {}
    for k, v in hdr.items():
        b, e = v["data_offsets"]
        out[k] = (v["dtype"], list(v["shape"]), raw[8 + n + b:8 + n + e])
    return out, meta


def write_st(path, tensors, meta=None):
    hdr, off, blobs = {}, 0, []
    for k in sorted(tensors):
        dt, shape, data = tensors[k]
        hdr[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(data)
    if meta:
        hdr["__metadata__"] = meta
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def t(dt, arr):
    arr = np.array(arr, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
    return (dt, list(arr.shape), arr.tobytes())


def f32(x):
    return t("F32", np.array(x, dtype=np.float32))


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    for p in Path(dst).rglob("*"):
        p.chmod(0o644)
    return Path(dst)


class _ConfigFiles:
    """config.json / hf_quant_config.json helpers shared by the checkpoint fixtures."""

    def cfg(self, fn="config.json"):
        return json.loads((self.root / fn).read_text())

    def set_cfg(self, obj, fn="config.json"):
        (self.root / fn).write_text(json.dumps(obj, indent=1))

    def set_excludes(self, lst):
        hq = self.cfg("hf_quant_config.json")
        hq["quantization"]["exclude_modules"] = lst
        self.set_cfg(hq, "hf_quant_config.json")
        c = self.cfg()
        c["quantization_config"]["ignore"] = lst
        self.set_cfg(c)

    def excludes(self):
        return self.cfg("hf_quant_config.json")["quantization"]["exclude_modules"]


class Ckpt(_ConfigFiles):
    """Edit a single-file checkpoint in a tmp dir."""

    def __init__(self, root):
        self.root = Path(root)
        self.file = next(self.root.glob("*.safetensors"))
        self.t, self.meta = read_st(self.file)

    def save(self):
        write_st(self.file, self.t, self.meta)



def messages(findings):
    return "\n".join(f.line() for f in findings)


def errors(path):
    return [f for f in verify(path) if f.severity == "error"]


def assert_caught(path, *needles):
    fs = errors(path)
    text = messages(fs)
    for nd in needles:
        assert nd in text, f"{nd!r} not in findings:\n{text}"
    buf = io.StringIO()
    assert run_verify(path, out=buf) == 1
    return fs


# ---------------------------------------------------------------------------------------------
# synthetic DeepSeek/Kimi-style NVFP4 checkpoint (MoE, MLA, shared experts, MTP layer)
# ---------------------------------------------------------------------------------------------
H, I_DENSE, I_EXP, E, QL, KVL = 64, 96, 32, 4, 32, 32
NH, NOPE, ROPE, V = 2, 16, 16, 16


def _shapes():
    """checkpoint linear module -> (N, K)"""
    s = {}
    for l in range(3):  # layers 0 (dense), 1 (MoE); layer 2 is MTP (num_hidden_layers = 2)
        p = f"model.layers.{l}."
        s[p + "self_attn.q_a_proj"] = (QL, H)
        s[p + "self_attn.q_b_proj"] = (NH * (NOPE + ROPE), QL)
        s[p + "self_attn.kv_a_proj_with_mqa"] = (KVL + ROPE, H)
        s[p + "self_attn.kv_b_proj"] = (NH * (NOPE + V), KVL)
        s[p + "self_attn.o_proj"] = (H, NH * V)
        if l == 0:
            for n, sh in (("gate_proj", (I_DENSE, H)), ("up_proj", (I_DENSE, H)),
                          ("down_proj", (H, I_DENSE))):
                s[p + "mlp." + n] = sh
        else:
            for n, sh in (("gate_proj", (I_EXP, H)), ("up_proj", (I_EXP, H)), ("down_proj", (H, I_EXP))):
                s[p + "mlp.shared_experts." + n] = sh
                for e in range(E):
                    s[p + f"mlp.experts.{e}." + n] = sh
        if l == 2:
            s[p + "eh_proj"] = (H, 2 * H)
    return s


def make_moe_ckpt(root, preset="all", seed=0):
    rng = np.random.default_rng(seed)
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
        "hidden_size": H, "num_hidden_layers": 2, "q_lora_rank": QL, "kv_lora_rank": KVL,
        "n_routed_experts": E, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1,
        "num_nextn_predict_layers": 1, "vocab_size": 128,
    }
    lay = get_layout(cfg)
    shapes = _shapes()
    names = [m + ".weight" for m in shapes] + ["lm_head.weight", "model.embed_tokens.weight",
                                                "model.norm.weight", "model.layers.1.mlp.gate.weight"]
    lin = lay.linear_modules(names)
    assert set(lin) == set(shapes)
    q = lay.quantized(lin, preset)
    tensors = {}

    def bf16(shape):
        return t("BF16", rng.integers(0x3C00, 0x3F80, size=shape, dtype=np.uint16))

    # shared per-group scales (SPEC section 4), routed experts share input_scale per layer
    group_ws2, group_in = {}, {}
    for g in lay.fused_groups(lin):
        ws2, ins = float(rng.uniform(1e-4, 1e-3)), float(rng.uniform(1e-3, 1e-2))
        for m in g:
            group_ws2[m], group_in[m] = ws2, ins
    for m, (N, K) in shapes.items():
        if m not in q:
            tensors[m + ".weight"] = bf16((N, K))
            continue
        tensors[m + ".weight"] = t("U8", rng.integers(0, 256, size=(N, K // 2), dtype=np.uint8))
        sc = rng.uniform(0.5, 400, size=(N, K // 16)).astype(ml_dtypes.float8_e4m3fn)
        tensors[m + ".weight_scale"] = t("F8_E4M3", sc.view(np.uint8))
        tensors[m + ".weight_scale_2"] = f32(group_ws2.get(m, rng.uniform(1e-4, 1e-3)))
        tensors[m + ".input_scale"] = f32(group_in.get(m, rng.uniform(1e-3, 1e-2)))
    tensors["lm_head.weight"] = bf16((128, H))
    tensors["model.embed_tokens.weight"] = bf16((128, H))
    tensors["model.norm.weight"] = bf16((H,))
    tensors["model.layers.1.mlp.gate.weight"] = bf16((E, H))
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = t("F32", np.zeros(E, np.float32))
    ex = lay.exclude_modules(lin, q, lay.routers(names), extra=lay.embeddings(names))
    root = Path(root)
    root.mkdir(parents=True)
    # two shards + index
    keys = sorted(tensors)
    half = len(keys) // 2
    wm = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        write_st(root / fn, {k: tensors[k] for k in part}, {"format": "pt"})
        wm.update({k: fn for k in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    producer = {"name": "nvfp4_jax", "version": "0.1.0"}
    grp = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    cfg["quantization_config"] = {
        "config_groups": {"group_0": {"input_activations": dict(grp), "weights": dict(grp),
                                      "targets": ["Linear"]}},
        "ignore": ex, "quant_algo": "NVFP4", "producer": producer, "quant_method": "modelopt"}
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    (root / "hf_quant_config.json").write_text(json.dumps(
        {"producer": producer, "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                                                "group_size": 16, "exclude_modules": ex}}))
    return root


class Sharded(_ConfigFiles):
    """Edit tensors of a sharded checkpoint by name."""

    def __init__(self, root):
        self.root = Path(root)
        self.wm = json.loads((self.root / "model.safetensors.index.json").read_text())["weight_map"]
        self.files = {fn: read_st(self.root / fn) for fn in set(self.wm.values())}

    def get(self, name):
        return self.files[self.wm[name]][0][name]

    def set(self, name, val):
        self.files[self.wm[name]][0][name] = val

    def delete(self, name):
        del self.files[self.wm[name]][0][name]
        del self.wm[name]

    def save(self):
        for fn, (ts, meta) in self.files.items():
            write_st(self.root / fn, ts, meta)
        (self.root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": self.wm}))



@pytest.fixture
def golden(tmp_path):
    return copy_ckpt(GOLDEN, tmp_path / "g")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_moe_ckpt(tmp_path_factory.mktemp("moe") / "ckpt")


@pytest.fixture
def moe(tmp_path, moe_dir):
    return copy_ckpt(moe_dir, tmp_path / "m")


# ---------------------------------------------------------------------------------------------
# good checkpoints
# ---------------------------------------------------------------------------------------------

def test_golden_is_clean(golden):
    assert verify(golden) == []
    buf = io.StringIO()
    assert run_verify(golden, out=buf) == 0
    assert "OK" in buf.getvalue() and "14 of 15 linears quantized" in buf.getvalue()
    buf = io.StringIO()
    assert run_verify(golden, as_json=True, out=buf) == 0
    js = json.loads(buf.getvalue())
    assert js["summary"]["ok"] and js["findings"] == []
    assert cli_main(["verify", str(golden), "--no-values"]) == 0


def test_golden_untouched_directly():
    # verify only reads: it can run on the read-only shared directory itself
    assert verify(GOLDEN) == []


@pytest.mark.parametrize("preset", ["all", "mlp_only", "experts_only"])
def test_synthetic_moe_is_clean(tmp_path, preset):
    root = make_moe_ckpt(tmp_path / preset, preset)
    assert verify(root) == [], messages(verify(root))


def test_compressed_tensors_format_is_clean(golden, tmp_path):
    """Golden converted to nvfp4-pack-quantized (SPEC section 6, second format)."""
    c = Ckpt(golden)
    out = {}
    for k, v in c.t.items():
        mod, _, leaf = k.rpartition(".")
        if leaf == "weight" and v[0] == "U8":
            out[mod + ".weight_packed"] = v
        elif leaf in ("weight_scale_2", "input_scale"):
            x = np.frombuffer(v[2], np.float32)
            out[mod + (".weight_global_scale" if leaf == "weight_scale_2" else ".input_global_scale")] = \
                t("F32", (np.float32(1) / x).reshape(1))
        else:
            out[k] = v
    c.t = out
    c.save()
    cfg = c.cfg()
    arg = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
           "symmetric": True, "dynamic": False}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": arg,
                                      "input_activations": dict(arg, dynamic="local"),
                                      "format": "nvfp4-pack-quantized"}},
        "ignore": ["lm_head"], "quantization_status": "compressed"}
    c.set_cfg(cfg)
    (golden / "hf_quant_config.json").unlink()
    assert verify(golden) == [], messages(verify(golden))


# ---------------------------------------------------------------------------------------------
# corruption suite: each caught with its own message
# ---------------------------------------------------------------------------------------------

def test_deleted_input_scale_of_one_expert(moe):
    s = Sharded(moe)
    s.delete("model.layers.1.mlp.experts.2.up_proj.input_scale")
    s.save()
    fs = assert_caught(moe, "model.layers.1.mlp.experts.2.up_proj.input_scale: missing input_scale")
    assert len(fs) == 1


def test_gate_up_weight_scale_2_differ(golden, moe):
    c = Ckpt(golden)
    c.t["model.layers.1.mlp.up_proj.weight_scale_2"] = f32(
        2 * np.frombuffer(c.t["model.layers.1.mlp.up_proj.weight_scale_2"][2], np.float32)[0])
    c.save()
    assert_caught(golden, "model.layers.1.mlp: fused group gate_proj/up_proj has different weight_scale_2")
    s = Sharded(moe)
    s.set("model.layers.1.mlp.experts.3.gate_proj.weight_scale_2", f32(0.123))
    s.save()
    assert_caught(moe, "model.layers.1.mlp.experts.3: fused group gate_proj/up_proj has different "
                       "weight_scale_2", "vLLM keeps the gate's scale")


def test_q_a_kv_a_scales_differ(moe):
    s = Sharded(moe)
    s.set("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_2", f32(0.5))
    s.set("model.layers.1.self_attn.q_a_proj.input_scale", f32(0.25))
    s.save()
    fs = assert_caught(
        moe,
        "model.layers.0.self_attn: fused group q_a_proj/kv_a_proj_with_mqa has different weight_scale_2",
        "model.layers.1.self_attn: fused group q_a_proj/kv_a_proj_with_mqa has different input_scale")
    assert len(fs) == 2


def test_nan_and_zero_in_weight_scale(golden):
    c = Ckpt(golden)
    dt, shape, data = c.t["model.layers.0.self_attn.o_proj.weight_scale"]
    b = bytearray(data)
    b[5] = 0x7F   # NaN
    b[9] = 0x00   # zero
    b[12] = 0x80  # -0
    c.t["model.layers.0.self_attn.o_proj.weight_scale"] = (dt, shape, bytes(b))
    c.save()
    fs = assert_caught(golden, "1 NaN block scale(s) in weight_scale (first at [0, 5]",
                       "2 zero block scale(s) in weight_scale (first at [1, 1]")
    assert all(f.name == "model.layers.0.self_attn.o_proj.weight_scale" for f in fs)


def test_negative_and_nonfinite_scales(golden):
    c = Ckpt(golden)
    dt, shape, data = c.t["model.layers.1.mlp.down_proj.weight_scale"]
    c.t["model.layers.1.mlp.down_proj.weight_scale"] = (dt, shape, b"\xb8" + data[1:])
    c.t["model.layers.1.mlp.down_proj.weight_scale_2"] = f32(np.inf)
    c.t["model.layers.1.mlp.down_proj.input_scale"] = f32(0.0)
    c.save()
    assert_caught(golden, "negative block scale", "weight_scale_2 is inf", "input_scale is 0.0, must be > 0")


def test_missing_kv_cache_quant_algo(golden):
    c = Ckpt(golden)
    hq = c.cfg("hf_quant_config.json")
    del hq["quantization"]["kv_cache_quant_algo"]
    c.set_cfg(hq, "hf_quant_config.json")
    fs = assert_caught(golden, "hf_quant_config.json: quantization.kv_cache_quant_algo key is missing")
    assert len(fs) == 1


def test_leftover_compressed_tensors_block(golden):
    c = Ckpt(golden)
    cfg = c.cfg()
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}}},
        "ignore": ["lm_head"]}
    c.set_cfg(cfg)
    assert_caught(golden, "config.json: quantization_config is a leftover source block "
                          "(quant_method compressed-tensors 'pack-quantized')")


def test_leftover_fp8_block_and_missing_files(golden):
    c = Ckpt(golden)
    cfg = c.cfg()
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    c.set_cfg(cfg)
    (golden / "hf_quant_config.json").unlink()
    assert_caught(golden, "leftover source block (quant_method fp8)", "hf_quant_config.json: missing")


def test_exclude_entry_substring_matches_quantized_module(golden):
    c = Ckpt(golden)
    c.set_excludes(c.excludes() + ["model.layers.1.mlp.gate"])
    assert_caught(golden, "model.layers.1.mlp.gate_up_proj: quantized in the files but vLLM would load "
                          "it unquantized: entry 'model.layers.1.mlp.gate' is a substring of "
                          "'model.layers.1.mlp.gate_up_proj'")


def test_prefix_wildcard_hits_other_layer(moe):
    # "model.layers.1*" looks like layer 1 but vLLM also matches "model.layers.1..." of layer 10+;
    # here: an entry that excludes all of layer 1 while layer 1 is quantized
    s = Sharded(moe)
    s.set_excludes(s.excludes() + ["model.layers.1.mlp*"])
    fs = assert_caught(moe, "model.layers.1.mlp.experts: quantized in the files but vLLM would load it "
                            "unquantized", "SGLang would load it unquantized")
    assert any(f.name == "model.layers.1.mlp.shared_experts.gate_up_proj" for f in fs)


def test_fused_group_half_excluded(golden):
    c = Ckpt(golden)
    c.set_excludes(c.excludes() + ["model.layers.0.self_attn.q_proj"])
    assert_caught(golden, "model.layers.0.self_attn.qkv_proj: fused group half excluded",
                  "Detected some but not all shards")


def test_fused_group_half_quantized_in_files(golden):
    c = Ckpt(golden)
    for leaf in ("weight_scale", "weight_scale_2", "input_scale"):
        del c.t[f"model.layers.1.mlp.up_proj.{leaf}"]
    c.t["model.layers.1.mlp.up_proj.weight"] = t("BF16", np.full((352, 128), 0x3F80, np.uint16))
    c.save()
    assert_caught(golden, "model.layers.1.mlp: fused group half quantized: ['gate_proj'] quantized, "
                          "['up_proj'] not")


def test_k_of_24(golden):
    c = Ckpt(golden)
    m = "model.layers.0.self_attn.o_proj"
    c.t[m + ".weight"] = t("U8", np.zeros((128, 12), np.uint8))
    c.t[m + ".weight_scale"] = t("F8_E4M3", np.full((128, 2), 0x38, np.uint8))
    c.save()
    fs = assert_caught(golden, f"{m}.weight: K = 24 is not a multiple of 16")
    assert len(fs) == 1


def test_one_excluded_expert_excludes_layer_in_vllm(moe):
    s = Sharded(moe)
    s.set_excludes(s.excludes() + ["model.layers.1.mlp.experts.0.down_proj"])
    assert_caught(moe, "model.layers.1.mlp.experts: quantized in the files but vLLM would load it "
                       "unquantized: entry 'model.layers.1.mlp.experts.0.down_proj' contains")


def test_expert_left_unquantized(moe):
    s = Sharded(moe)
    m = "model.layers.1.mlp.experts.1.down_proj"
    for leaf in ("weight_scale", "weight_scale_2", "input_scale"):
        s.delete(f"{m}.{leaf}")
    s.set(m + ".weight", t("BF16", np.full((H, I_EXP), 0x3F80, np.uint16)))
    s.save()
    assert_caught(moe, "model.layers.1.mlp.experts: 1 of 12 expert linears are not quantized")


def test_sglang_mla_projection_rule(tmp_path):
    root = make_moe_ckpt(tmp_path / "c", "all")
    s = Sharded(root)
    s.set_excludes(s.excludes() + ["model.layers.0.self_attn.kv_b_proj"])
    # make layer 0 kv_b_proj really bf16 so vLLM agrees and only SGLang's global rule disagrees
    m = "model.layers.0.self_attn.kv_b_proj"
    for leaf in ("weight_scale", "weight_scale_2", "input_scale"):
        s.delete(f"{m}.{leaf}")
    s.set(m + ".weight", t("BF16", np.full((NH * (NOPE + V), KVL), 0x3F80, np.uint16)))
    s.save()
    fs = assert_caught(root, "model.layers.1.self_attn.kv_b_proj: quantized in the files but SGLang "
                             "would load it unquantized: entry 'model.layers.0.self_attn.kv_b_proj' "
                             "ends in 'kv_b_proj', which SGLang applies to that projection in every layer")
    assert not any("vLLM" in f.message for f in fs)


def test_unquantized_linear_not_excluded(golden):
    c = Ckpt(golden)
    c.set_excludes(["model.embed_tokens"])
    assert_caught(golden, "lm_head: not quantized in the files but vLLM would expect NVFP4 tensors")


def test_inconsistent_exclude_lists(golden):
    c = Ckpt(golden)
    hq = c.cfg("hf_quant_config.json")
    hq["quantization"]["exclude_modules"] = ["lm_head"]
    c.set_cfg(hq, "hf_quant_config.json")
    assert_caught(golden, "quantization_config.ignore differs from hf_quant_config.json exclude_modules")


def test_missing_deepseek_arch_keys(moe):
    s = Sharded(moe)
    cfg = s.cfg()
    del cfg["topk_method"], cfg["moe_layer_freq"]
    s.set_cfg(cfg)
    fs = assert_caught(moe, "config.json: 'topk_method' missing", "config.json: 'moe_layer_freq' missing")
    assert len(fs) == 2


def test_missing_deepseek_arch_keys_in_a_wrappers_text_config(moe):
    s = Sharded(moe)
    # a wrapper's text model lives under language_model. (Kimi-K2.5)
    s.files = {fn: ({"language_model." + n: t for n, t in ts.items()}, meta) for fn, (ts, meta) in s.files.items()}
    s.wm = {"language_model." + n: fn for n, fn in s.wm.items()}
    s.save()
    # each entry in the checkpoint's spelling and vLLM's (language_model.model. -> language_model.)
    s.set_excludes([sp for e in s.excludes() for sp in ("language_model." + e, "language_model." + e.replace(
        "model.", "", 1) if e.startswith("model.") else e)])
    cfg = s.cfg()
    text = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "scoring_func")}
    s.set_cfg({"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
               "quantization_config": cfg["quantization_config"], "scoring_func": "sigmoid",
               "text_config": text})
    fs = assert_caught(moe, "config.json: 'scoring_func' missing")
    assert len(fs) == 1


def test_source_leftover_tensors(moe):
    s = Sharded(moe)
    s.wm["model.layers.1.mlp.experts.gate_up_proj"] = s.wm["model.layers.0.mlp.up_proj.weight"]
    s.files[s.wm["model.layers.1.mlp.experts.gate_up_proj"]][0][
        "model.layers.1.mlp.experts.gate_up_proj"] = t("BF16", np.zeros((E, 2 * I_EXP, H), np.uint16))
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    s.wm[name] = s.wm["model.layers.0.mlp.up_proj.weight"]
    s.files[s.wm[name]][0][name] = f32(np.ones((1, 1), np.float32))
    name = "model.layers.0.self_attn.o_proj.weight_packed"
    s.wm[name] = s.wm["model.layers.0.mlp.up_proj.weight"]
    s.files[s.wm[name]][0][name] = t("I32", np.zeros((H, 4), np.int32))
    s.save()
    assert_caught(moe, "model.layers.1.mlp.experts.gate_up_proj: stacked 3-D expert tensor",
                  "weight_scale_inv: leftover FP8-block scale", "weight_packed: leftover compressed-tensors")


def test_wrong_dtypes_and_shapes(golden):
    c = Ckpt(golden)
    m = "model.layers.1.self_attn.o_proj"
    c.t[m + ".weight_scale"] = t("F8_E4M3", np.full((128, 4), 0x38, np.uint8))  # expected [128, 8]
    c.t[m + ".weight_scale_2"] = t("F32", np.ones((1,), np.float32))
    c.t[m + ".input_scale"] = t("BF16", np.ones((), np.uint16))
    c.save()
    assert_caught(golden, f"{m}.weight_scale: shape [128, 4], expected [128, 8]",
                  f"{m}.weight_scale_2: F32[1], expected F32 []", f"{m}.input_scale: BF16[], expected F32 []")


def test_index_and_truncation_errors(moe):
    s = Sharded(moe)
    s.wm["model.layers.0.ghost.weight"] = next(iter(s.files))
    s.save()
    f = sorted(moe.glob("*.safetensors"))[1]
    f.write_bytes(f.read_bytes()[:-10])
    assert_caught(moe, "model.layers.0.ghost.weight: tensor 'model.layers.0.ghost.weight' is listed in the index",
                  "truncated file")


def test_finding_line_format():
    f = Finding("error", "x.weight", "bad")
    assert f.line() == "ERROR: x.weight: bad"


def test_malformed_headers_are_findings_not_exceptions(moe):
    """verify scans leniently: a header entry without a dtype, a gap in the data offsets and an
    unknown dtype are reported with the tensor's name, and the rest is still checked."""
    files = sorted(moe.glob("*.safetensors"))
    raw = files[0].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    names = sorted(k for k in hdr if k != "__metadata__")
    del hdr[names[0]]["dtype"]
    hdr[names[1]]["dtype"] = "F4_WHATEVER"
    h = json.dumps(hdr).encode()
    files[0].write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:] + b"\0" * 8)
    fs = verify(moe)
    text = messages(fs)
    assert f"ERROR: {names[0]}: " in text and "malformed header entry" in text
    assert f"WARNING: {names[1]}: " in text and "unsupported dtype F4_WHATEVER" in text
    assert "longer than its header says" in text
    assert "gap or overlap" in text  # where the malformed entry's bytes lie
