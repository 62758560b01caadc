"""Kimi-K2.5 checkpoints in NVIDIA's spelling: decoder layers named ``language_model.layers.N``
(no ``.model``), as in nvidia/Kimi-K2.5-NVFP4 (../shared/KIMI.md; vLLM's and SGLang's kimi_k25.py
map ``language_model.layers.`` back to ``language_model.model.layers.`` for these "legacy NVFP4
checkpoints").

Property: the same source in either spelling is read as the same decoder layers and converts to
the same tensors, byte for byte, under the renamed names; the output verifies.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvfp4_jax import examples
from nvfp4_jax.checkpoint.reader import CheckpointReader
from nvfp4_jax.pipeline import ConvertOptions, convert
from nvfp4_jax.plan import build_plan
from nvfp4_jax.verify import verify

MOONSHOT = "language_model.model.layers."
NVIDIA = "language_model.layers."


def _respell(name: str) -> str:
    return NVIDIA + name[len(MOONSHOT):] if name.startswith(MOONSHOT) else name


def _copy_respelled(src: Path, dst: Path) -> Path:
    """src with every decoder-layer tensor renamed to NVIDIA's spelling (shards and index)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata()
        save_file({_respell(k): v for k, v in load_file(shard).items()}, str(dst / shard.name), metadata=metadata)
    for index in src.glob("*.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {_respell(k): v for k, v in data["weight_map"].items()}
        (dst / index.name).write_text(json.dumps(data, indent=2))
    return dst


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(d.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("k25-spelling")
    moonshot = examples.build_kimi_k25_tiny(d / "moonshot", seed=3)
    nvidia = _copy_respelled(moonshot, d / "nvidia")
    assert any(n.startswith(NVIDIA) for n in CheckpointReader(nvidia).names())
    return moonshot, nvidia


def test_layers_are_recognised_in_nvidia_spelling(sources):
    moonshot, nvidia = sources
    opts = ConvertOptions(preset="mlp_only", input_scale_constant=1.0)
    a, b = build_plan(CheckpointReader(moonshot), opts), build_plan(CheckpointReader(nvidia), opts)
    assert b.layer_ids == a.layer_ids == (0, 1, 2)
    assert set(b.non_layer_names) == set(a.non_layer_names)  # head, embeddings, vision: no layer tensor
    assert set(b.all_linear) == {_respell(m) for m in a.all_linear}
    assert b.quantized == {_respell(m) for m in a.quantized}


def test_converts_to_the_same_tensors(sources, tmp_path):
    moonshot, nvidia = sources
    tokens = examples.calibration_samples(moonshot, 2, 16)
    convert(moonshot, tmp_path / "a", ConvertOptions(calib_tokens=tokens, progress=False))
    convert(nvidia, tmp_path / "b", ConvertOptions(calib_tokens=tokens, progress=False))
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert set(b) == {_respell(k) for k in a}
    assert any(k.endswith(".input_scale") for k in b)
    different = [k for k, v in a.items() if not torch.equal(v, b[_respell(k)])]
    assert not different, different[:5]
    assert verify(tmp_path / "b") == []
    excluded = json.loads((tmp_path / "b" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert any(e.startswith(NVIDIA) for e in excluded), excluded[:8]
