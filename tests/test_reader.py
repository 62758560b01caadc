"""CheckpointReader: decoding against independent references, and up-front validation errors."""

import json
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import bf16_tensors, make_bf16_checkpoint, make_fp8_checkpoint, make_int4_checkpoint
from nvfp4_jax.checkpoint import CheckpointError, CheckpointReader


def _bits(x) -> np.ndarray:
    """Raw bit patterns of a bf16 array (jax or numpy) for exact comparison."""
    return np.asarray(x).astype(ml_dtypes.bfloat16).view(np.uint16)


def _torch_bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_plain_tensors_match_torch_values(tmp_path, num_shards):
    """bf16/f16/f32 sources, single file or sharded: names, shapes, dtypes and values (cast to bf16)."""
    src = make_bf16_checkpoint(tmp_path / "m", num_shards=num_shards)
    ref = bf16_tensors()
    r = CheckpointReader(src)
    assert r.names() == sorted(ref)
    for name, t in ref.items():
        info = r.info(name)
        assert info.shape == tuple(t.shape) and info.encoding == "plain"
        assert info.source_dtype == {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}[t.dtype]
        got = r.get(name)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(_bits(got), _torch_bf16_bits(t))
    # float32 request keeps f32 sources exact
    np.testing.assert_array_equal(np.asarray(r.get("model.norm.weight", jnp.float32)), ref["model.norm.weight"].numpy())


def test_extra_files_are_non_weight_files(tmp_path):
    src = make_bf16_checkpoint(tmp_path / "m", num_shards=2)
    names = sorted(p.name for p in CheckpointReader(src).extra_files())
    assert names == ["generation_config.json", "modeling_tiny.py", "tokenizer_config.json"]


def test_fp8_block_decoder_matches_numpy_with_partial_edge_blocks(tmp_path):
    """N=300, K=200: the last row block has 44 rows and the last column block 72 columns."""
    src = make_fp8_checkpoint(tmp_path / "fp8", shape=(300, 200))
    raw = load_file(src / "model-00001-of-00002.safetensors") | load_file(src / "model-00002-of-00002.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    q = raw[name].view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    s = raw[name + "_scale_inv"].numpy()
    assert s.shape == (3, 2)
    # independent reference: explicit loop over blocks, float32 product, then round to bf16
    ref = np.empty((300, 200), np.float32)
    for i in range(3):
        for j in range(2):
            blk = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].astype(np.float32)
            ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = blk * np.float32(s[i, j])
    ref_bf16 = ref.astype(ml_dtypes.bfloat16)

    r = CheckpointReader(src)
    info = r.info(name)
    assert (info.shape, info.source_dtype, info.encoding) == ((300, 200), "F8_E4M3", "fp8_block")
    assert name + "_scale_inv" not in r.names()
    got = r.get(name)
    assert got.dtype == jnp.bfloat16 and got.shape == (300, 200)
    np.testing.assert_array_equal(_bits(got), ref_bf16.view(np.uint16))
    # a float32 request is the bf16 value widened (SPEC 8: decoded values are rounded to bf16)
    np.testing.assert_array_equal(np.asarray(r.get(name, jnp.float32)), ref_bf16.astype(np.float32))
    # non-quantized tensors of an FP8 checkpoint are plain
    assert r.info("model.layers.0.mlp.gate.e_score_correction_bias").encoding == "plain"


def test_int4_decoder_matches_compressed_tensors_decompression(tmp_path):
    """The package that wrote the checkpoint decompresses it; our JAX decoder must agree bit for bit."""
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    src = make_int4_checkpoint(tmp_path / "int4")
    tensors = load_file(src / "model.safetensors")
    ref = CompressedTensorsDequantizer(src, dtype=torch.bfloat16).process(dict(tensors))

    r = CheckpointReader(src)
    assert sorted(ref) == r.names()  # same logical names as the package's own decompression
    n_int4 = 0
    for name in r.names():
        got = r.get(name)
        assert got.shape == tuple(ref[name].shape), name
        np.testing.assert_array_equal(_bits(got), _torch_bf16_bits(ref[name]), err_msg=name)
        n_int4 += r.info(name).encoding == "int4_pack"
    assert n_int4 == 6
    assert r.info("model.layers.1.self_attn.o_proj.weight").encoding == "plain"
    assert r.info("model.layers.1.mlp.experts.0.down_proj.weight").shape == (96, 64)


# --------------------------------------------------------------------------- errors, at construction


def test_index_naming_a_tensor_absent_from_its_file(tmp_path):
    src = make_bf16_checkpoint(tmp_path / "m", num_shards=2)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.0.ghost.weight"] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(src)
    assert "model.layers.0.ghost.weight" in str(e.value) and "model-00002-of-00002.safetensors" in str(e.value)


def test_index_naming_a_missing_file(tmp_path):
    src = make_bf16_checkpoint(tmp_path / "m", num_shards=2)
    (src / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        CheckpointReader(src)


def test_truncated_file(tmp_path):
    src = make_bf16_checkpoint(tmp_path / "m", num_shards=2)
    f = src / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*truncated"):
        CheckpointReader(src)


def test_truncated_inside_header(tmp_path):
    src = make_bf16_checkpoint(tmp_path / "m")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        CheckpointReader(src)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_header_offsets_disagreeing_with_dtype_and_shape(tmp_path):
    src = make_bf16_checkpoint(tmp_path / "m")
    f = src / "model.safetensors"

    def edit(h):
        h["model.norm.weight"]["shape"] = [65]  # f32 [65] needs 260 bytes, offsets span 256

    _rewrite_header(f, edit)
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(src)
    assert "model.safetensors" in str(e.value) and "model.norm.weight" in str(e.value)


def test_header_describing_more_data_than_the_file_has(tmp_path):
    src = make_bf16_checkpoint(tmp_path / "m")
    f = src / "model.safetensors"

    def edit(h):
        last = max((v for k, v in h.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][1])
        end = last["data_offsets"][1]
        h["extra.tensor"] = {"dtype": "U8", "shape": [16], "data_offsets": [end, end + 16]}

    _rewrite_header(f, edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        CheckpointReader(src)


def test_unknown_quant_method(tmp_path):
    src = make_bf16_checkpoint(tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(src)
    assert "'awq'" in str(e.value) and "config.json" in str(e.value)


def test_int4_tensors_without_compressed_tensors_config(tmp_path):
    src = make_int4_checkpoint(tmp_path / "int4")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["quantization_config"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"experts\.0\.down_proj\.weight_packed"):
        CheckpointReader(src)


def test_compressed_tensors_config_that_is_not_int4_pack_quantized(tmp_path):
    src = make_int4_checkpoint(tmp_path / "int4")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["format"] = "float-quantized"
    for g in cfg["quantization_config"]["config_groups"].values():
        g.pop("format", None)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="float-quantized"):
        CheckpointReader(src)


def test_fp8_weight_without_scale(tmp_path):
    src = make_fp8_checkpoint(tmp_path / "fp8", shape=(130, 140), num_shards=1)
    f = src / "model.safetensors"
    t = load_file(f)
    del t["model.layers.0.mlp.down_proj.weight_scale_inv"]
    from safetensors.torch import save_file

    save_file(t, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*weight_scale_inv"):
        CheckpointReader(src)


def test_tensor_outside_the_index_is_an_error_naming_both(tmp_path):
    """A tensor a shard holds but the index omits would be dropped from the output without a word:
    the reader refuses, naming the tensor, the shard and the index."""
    src = make_bf16_checkpoint(tmp_path / "m", num_shards=2)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    dropped = sorted(idx["weight_map"])[0]
    shard = idx["weight_map"].pop(dropped)
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(src)
    msg = str(e.value)
    assert dropped in msg and shard in msg and "model.safetensors.index.json" in msg and "does not list it" in msg


def test_shard_not_in_the_index_is_an_error(tmp_path):
    src = make_bf16_checkpoint(tmp_path / "m", num_shards=2)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    gone = sorted(set(idx["weight_map"].values()))[1]
    idx["weight_map"] = {n: f for n, f in idx["weight_map"].items() if f != gone}
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=f"{gone} is not referenced by the index"):
        CheckpointReader(src)
