"""verify --source: the output against its source catches what the contract check cannot."""

import json

import ml_dtypes
import numpy as np
import pytest

from nvfp4_jax import examples
from nvfp4_jax.checkpoint.safetensors_io import read_header
from nvfp4_jax.pipeline import ConvertOptions, convert
from nvfp4_jax.verify_source import verify_against_source


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("vsrc")
    src = examples.build_llama_tiny(root / "src", seed=3)
    out = root / "out"
    convert(src, out, ConvertOptions(input_scale_constant=1.0, progress=False), log=lambda m: None)
    return src, out


def _copy(out, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def _locate(ckpt, name):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"] \
        if (ckpt / "model.safetensors.index.json").exists() else None
    files = [ckpt / index[name]] if index else sorted(ckpt.glob("*.safetensors"))
    for f in files:
        entries, _ = read_header(f)
        if name in entries:
            return f, entries[name]
    raise KeyError(name)


def _patch(ckpt, name, offset, new_bytes):
    f, e = _locate(ckpt, name)
    with open(f, "r+b") as fh:
        fh.seek(e.start + offset)
        fh.write(new_bytes)


def test_clean_output_matches_its_source(converted):
    src, out = converted
    assert verify_against_source(out, src) == []


def test_flipped_byte_in_a_packed_weight_is_caught(converted, tmp_path):
    src, out = converted
    bad = _copy(out, tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    f, e = _locate(bad, name)
    raw = f.read_bytes()[e.start:e.end]
    at = next(i for i, b in enumerate(raw) if b & 0x07 and b & 0x70)  # two non-zero FP4 values
    _patch(bad, name, at, bytes([raw[at] ^ 0x88]))  # flip both sign bits of that byte
    k2 = e.shape[-1]
    found = verify_against_source(bad, src)
    assert [x.name for x in found] == [name]
    assert f"2 FP4 value(s) are not the nearest E2M1" in found[0].message
    assert f"[{at // k2}, {2 * (at % k2)}]" in found[0].message


def test_nan_in_a_bf16_tensor_is_caught(converted, tmp_path):
    src, out = converted
    bad = _copy(out, tmp_path)
    name = "model.norm.weight"
    nan = np.array([np.nan], ml_dtypes.bfloat16).tobytes()
    _patch(bad, name, 2 * 5, nan)
    found = verify_against_source(bad, src)
    assert [x.name for x in found] == [name]
    assert "NaN/Inf" in found[0].message and "[5]" in found[0].message


def test_changed_unquantized_value_and_block_scale_are_caught(converted, tmp_path):
    src, out = converted
    bad = _copy(out, tmp_path)
    emb = "model.embed_tokens.weight"
    f, e = _locate(bad, emb)
    b = bytearray(f.read_bytes()[e.start:e.start + 2])
    _patch(bad, emb, 0, bytes([b[0] ^ 1, b[1]]))
    scale = "model.layers.1.self_attn.o_proj.weight_scale"
    f, e = _locate(bad, scale)
    s = f.read_bytes()[e.start]
    _patch(bad, scale, 0, bytes([min(s + 16, 0x7E)]))  # two binades up
    found = {x.name: x.message for x in verify_against_source(bad, src)}
    # the larger scale also leaves that block's codes no longer nearest: reported on the weight
    assert set(found) == {emb, scale, "model.layers.1.self_attn.o_proj.weight"}
    assert "1 value(s) differ" in found[emb]
    assert "block scale(s) do not follow" in found[scale]


def test_dropped_tensor_is_caught(converted, tmp_path):
    src, out = converted
    bad = _copy(out, tmp_path)
    name = "model.layers.0.input_layernorm.weight"
    f, _ = _locate(bad, name)
    from nvfp4_jax.checkpoint.safetensors_io import FileCache, save_file

    entries, _ = read_header(f)
    cache = FileCache()
    kept = {n: np.array(cache.read(e)) for n, e in entries.items() if n != name}
    cache.close()
    save_file(f, kept, {"format": "pt"})
    index_path = bad / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        del index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    found = verify_against_source(bad, src)
    assert [(x.name, "missing from the output" in x.message) for x in found] == [(name, True)]


def test_plain_verify_catches_changed_bytes_and_nan_through_the_checksums(converted, tmp_path):
    """Without --source: the checksum manifest written at convert time catches a flipped byte in
    a packed weight, and the value scan a NaN in a bf16 tensor."""
    from nvfp4_jax.verify import verify

    src, out = converted
    assert verify(out) == []
    bad = _copy(out, tmp_path)
    w = "model.layers.1.mlp.gate_proj.weight"
    f, e = _locate(bad, w)
    b = f.read_bytes()[e.start + 10]
    _patch(bad, w, 10, bytes([b ^ 0x01]))
    norm = "model.layers.1.post_attention_layernorm.weight"
    _patch(bad, norm, 0, np.array([np.inf], ml_dtypes.bfloat16).tobytes())
    found: dict[str, list[str]] = {}
    for x in verify(bad):
        found.setdefault(x.name, []).append(x.message)
    assert set(found) == {w, norm}
    assert len(found[w]) == 1 and "differs from" in found[w][0] and "nvfp4_checksums.json" in found[w][0]
    assert sorted(m.split(" ")[0] for m in found[norm]) == ["1", "CRC-32"]
    assert any("1 NaN/Inf value(s), the first at flat index 0" in m for m in found[norm])
