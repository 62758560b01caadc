"""The streamed Kimi-K2 builder behind ``example kimi-k2-shaped`` and ``bench convert``:

- a small variant (1 dense + 1 MoE layer, 8 experts, hidden 128) reads back with our reader; every
  INT4 expert decodes to what an independent numpy decode of the stored codes and scales gives
  (files read with the safetensors package), and compressed-tensors' own dequantizer agrees;
- scales are positive and finite, codes use all 16 nibbles, bf16 weights are finite with about the
  spread asked for; the bytes do not depend on the thread count; it converts and verifies;
- the real Kimi-K2-Thinking's tensor bytes from an independent count;
- ``bench convert``'s marginal and projection arithmetic on hand-made runs.
"""

from __future__ import annotations

import hashlib
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nvfp4_jax import bench, examples
from nvfp4_jax.checkpoint.reader import CheckpointReader

BF16 = ml_dtypes.bfloat16
SMALL = examples.kimi_k2_config(layers=2, experts=8)  # hidden 128, layer 0 dense, layer 1 MoE


def _stored_numpy(src) -> dict[str, np.ndarray]:
    """Every stored tensor, read by the safetensors package (bf16 kept as ml_dtypes bf16)."""
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, t in load_file(f).items():
            out[name] = t.view(torch.int16).numpy().view(BF16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def _numpy_int4_decode(packed: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    """compressed-tensors pack-quantized: nibble i of each int32 word (bits 4i..4i+3) is code + 8."""
    words = packed.view(np.uint32)
    nib = np.stack([(words >> np.uint32(4 * i)) & np.uint32(0xF) for i in range(8)], axis=-1)
    q = nib.reshape(packed.shape[0], -1)[:, :k].astype(np.float32) - 8.0
    s = np.repeat(scale.astype(np.float32), 32, axis=1)[:, :k]
    return (q * s).astype(BF16)


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint16)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    # small chunks: every weight spans several chunks (and ends in a partial one), as at full size
    mp = pytest.MonkeyPatch()
    mp.setattr(examples, "CHUNK_BYTES", 4096)
    try:
        yield examples.build_kimi_k2_streamed(tmp_path_factory.mktemp("shaped") / "src", SMALL, seed=1, workers=3)
    finally:
        mp.undo()


def test_small_variant_reads_back_and_int4_decodes_to_the_written_codes(small):
    stored = _stored_numpy(small)
    r = CheckpointReader(small)
    specs = examples.kimi_k2_tensors(SMALL)
    want = {t.name + (".weight" if t.kind == "int4" else "") for t in specs}
    assert set(r.names()) == want
    assert len(list(small.glob("model-*-of-000002.safetensors"))) == 2  # shards named as Moonshot's
    index = json.loads((small / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in stored.values())

    experts = [t for t in specs if t.kind == "int4"]
    assert len(experts) == 8 * 3
    nibbles_seen = set()
    for t in experts:
        packed, scale = stored[t.name + ".weight_packed"], stored[t.name + ".weight_scale"]
        assert packed.dtype == np.int32 and packed.shape == (t.shape[0], t.shape[1] // 8)
        assert list(stored[t.name + ".weight_shape"]) == list(t.shape)
        s = scale.astype(np.float32)
        assert np.all(np.isfinite(s)) and np.all(s > 0), t.name
        nibbles_seen |= set(np.unique(packed.view(np.uint8) & 0xF).tolist())
        got = r.get(t.name + ".weight")
        assert r.info(t.name + ".weight").encoding == "int4_pack"
        np.testing.assert_array_equal(_bits(got), _numpy_int4_decode(packed, scale, t.shape[1]).view(np.uint16),
                                      err_msg=t.name)
    assert nibbles_seen == set(range(16))

    for t in specs:
        if t.kind == "int4":
            continue
        got = np.asarray(r.get(t.name, jnp.float32))
        np.testing.assert_array_equal(got, stored[t.name].astype(np.float32), err_msg=t.name)
        assert np.all(np.isfinite(got)), t.name
        if t.kind == "normal":
            rms = float(np.sqrt(np.mean(got.astype(np.float64) ** 2)))
            assert t.std / 1.6 < rms < t.std * 1.6, (t.name, rms, t.std)
            assert abs(float(got.mean())) < 0.1 * t.std, t.name
        if t.kind == "ones":
            assert np.all(got == 1.0)
        if t.kind == "norm":
            assert 0.95 < float(got.mean()) < 1.05 and 0.05 < float(got.std()) < 0.2, t.name


def test_compressed_tensors_dequantizer_reads_it(small):
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    tensors = {}
    for f in sorted(small.glob("*.safetensors")):
        tensors.update(load_file(f))
    ref = CompressedTensorsDequantizer(small, dtype=torch.bfloat16).process(tensors)
    r = CheckpointReader(small)
    assert sorted(ref) == r.names()
    for name in r.names():
        if r.info(name).encoding != "int4_pack":
            continue
        np.testing.assert_array_equal(_bits(r.get(name)), ref[name].view(torch.int16).numpy().view(np.uint16),
                                      err_msg=name)


def _digests(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_bytes_do_not_depend_on_threads_but_on_the_seed(tmp_path):
    one = examples.build_kimi_k2_streamed(tmp_path / "one", SMALL, seed=5, workers=1)
    four = examples.build_kimi_k2_streamed(tmp_path / "four", SMALL, seed=5, workers=4)
    other = examples.build_kimi_k2_streamed(tmp_path / "other", SMALL, seed=6, workers=4)
    assert _digests(one) == _digests(four)
    name = "model.layers.1.mlp.experts.0.up_proj.weight_packed"
    a, b = _stored_numpy(one)[name], _stored_numpy(other)[name]
    assert a.shape == b.shape and np.mean(a == b) < 0.01


def test_small_variant_converts_and_verifies(small, tmp_path):
    from nvfp4_jax.pipeline import ConvertOptions, convert
    from nvfp4_jax.verify import run_verify

    tokens = examples.calibration_samples(small, 2, 8)
    report = convert(small, tmp_path / "out", ConvertOptions(calib_tokens=tokens, progress=False), log=lambda m: None)
    assert report["layers"] == 2
    assert run_verify(tmp_path / "out") == 0


def test_kimi_k2_thinking_size_from_an_independent_count():
    h, v, layers, experts = 7168, 163840, 61, 384
    non_layer = 2 * v * h * 2 + h * 2  # embed_tokens, lm_head, final norm (bf16)
    attention = (2 * h + 1536 * h + 1536 + 64 * (128 + 64) * 1536 + (512 + 64) * h + 512
                 + 64 * (128 + 128) * 512 + h * 64 * 128) * 2
    dense_mlp = 3 * 18432 * h * 2
    elems = 2048 * h  # each of an expert's three projections
    expert = 3 * (elems // 2 + elems // 32 * 2 + 2 * 8)  # int32 codes, bf16 group scales, int64 shape
    moe = experts * h * 2 + experts * 4 + 3 * 2048 * h * 2 + experts * expert
    want = non_layer + layers * attention + dense_mlp + (layers - 1) * moe
    got = examples.kimi_k2_source_bytes(examples.kimi_k2_shaped_config(layers, experts, v))
    assert got == want
    assert 590e9 < got < 600e9  # the 594 GB Moonshot ships


def _run(layers, source_gb, wall, cp, phases):
    return {"kind": "run", "layers": layers, "experts": 8, "calib_samples": 2, "calib_seq_len": 16,
            "source_GB": source_gb, "wall_s": wall, "cp_s": cp, "cat_s": cp / 10, "phases_s": phases}


def test_bench_marginal_and_projection_arithmetic():
    runs = [_run(1, 2.0, 30.0, 1.0, {"read": 2.0, "quantize": 10.0, "total": 25.0, "note": "x"}),
            _run(3, 6.0, 50.0, 3.0, {"read": 4.0, "quantize": 20.0, "total": 45.0})]
    (m,) = bench.marginal_rows(runs)
    per = m["per_moe_layer"]
    assert (m["from_layers"], m["to_layers"]) == (1, 3)
    assert per["source_GB"] == pytest.approx(2.0) and per["wall_s"] == pytest.approx(10.0)
    assert per["cp_s"] == pytest.approx(1.0) and per["cat_s"] == pytest.approx(0.1)
    assert per["phases_s"] == pytest.approx({"read": 1.0, "quantize": 5.0, "total": 10.0})
    assert m["wall_over_cp"] == pytest.approx(10.0)

    # 102 GB in all: the 1-layer run's 2 GB plus 100 GB at 5 s/GB (wall) and 0.5 s/GB (cp)
    p = bench.projection_row(runs, [m], 102e9)
    assert p["wall_s"] == pytest.approx(30.0 + 500.0) and p["cp_s"] == pytest.approx(1.0 + 50.0)
    assert p["phases_s"]["quantize"] == pytest.approx(10.0 + 250.0)
    assert p["wall_over_cp"] == pytest.approx(530.0 / 51.0)

    # one run: scaled by bytes
    p1 = bench.projection_row(runs[:1], [], 102e9)
    assert p1["wall_s"] == pytest.approx(30.0 * 51) and p1["cp_s"] == pytest.approx(51.0)
    assert bench.marginal_rows(runs[:1]) == []


@pytest.mark.parametrize("cache", ["off", "CACHE"])
def test_bench_warms_the_compile_cache_before_timed_runs_only_with_a_cache(tmp_path, monkeypatch, cache):
    calls = []

    def fake_run(work, nl, experts, calib, keep):
        calls.append((nl, keep))
        return _run(nl, 2.0 * nl, 10.0 * nl, 1.0 * nl, {"read": 1.0, "total": 5.0 * nl})

    monkeypatch.setattr(bench, "_bench_run", fake_run)
    monkeypatch.setattr(bench, "_run_line", lambda r: f"run L={r['layers']}")
    cache = str(tmp_path / "cc") if cache == "CACHE" else cache
    rows = bench.bench_convert(layers=(3, 2), experts=4, calib=(1, 8), workdir=tmp_path / "w", compile_cache=cache)
    timed = [(2, False), (3, False)]
    # with a cache: the largest checkpoint converted once first, its source kept for the timed run
    assert calls == (timed if cache == "off" else [(3, True)] + timed)
    assert [r["layers"] for r in rows if r["kind"] == "run"] == [2, 3]  # the warm-up is no row


def test_bench_quantize_baselines_time_the_converted_weights(tmp_path):
    """The child-process baselines read the weights the output quantized (those with a
    weight_scale_2), per layer, and quantize them; their ratios are phase seconds over theirs."""
    import json

    import ml_dtypes

    from nvfp4_jax.checkpoint.safetensors_io import save_file

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rng = np.random.default_rng(0)
    w = {f"model.layers.{i}.mlp.{p}.weight": rng.standard_normal((32, 64)).astype(ml_dtypes.bfloat16)
         for i in (0, 1) for p in ("gate_proj", "down_proj")}
    w["model.layers.1.input_layernorm.weight"] = np.ones(64, ml_dtypes.bfloat16)  # not quantized
    save_file(src / "model.safetensors", w)
    save_file(out / "model.safetensors", {f"{n[:-len('.weight')]}.weight_scale_2": np.ones((), np.float32)
                                          for n in w if "mlp" in n and "down" not in n or "layers.0.mlp.down" in n})
    assert bench._quantized_modules_by_layer(out) == {
        0: ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj"], 1: ["model.layers.1.mlp.gate_proj"]}
    for fn in (bench.quantize_kernels_baseline, bench.quantize_layer_baseline):
        b = fn(src, out)
        assert b["phase"] == "quantize" and b["weights"] == 3 and b["seconds"] > 0
    assert bench.baseline_ratios({"quantize": 6.0, "read": 1.0}, {"k": {"phase": "quantize", "seconds": 2.0}}) == {"k": 3.0}
