"""The planned writer (one process) and the output formats: round trip, shard sizing, atomic rename,
resume (settings named, CRC checks), SIGKILL, compressed-tensors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.paths import TINY_LLAMA

from nvfp4_jax.checkpoint import (
    CheckpointError,
    CheckpointReader,
    PlannedWriter,
    WriterOptions,
    compressed_tensors_config,
    get_format,
    modelopt_configs,
    open_planned_writer,
    to_compressed_tensors,
)
from nvfp4_jax.checkpoint.safetensors_io import read_header, st_dtype

GOLDEN = TINY_LLAMA / "modelopt_nvfp4"

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)

# Module sizes for the synthetic "model": per layer a q_proj and a down_proj, NVFP4-shaped.
MODULES = {"self_attn.q_proj": (64, 128), "mlp.down_proj": (128, 96)}
NUM_LAYERS = 4


def nvfp4_module(rng, n, k):
    """Random but well-formed NVFP4 tensors of one linear (ModelOpt names and dtypes)."""
    return {
        "weight": rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
        "weight_scale": rng.uniform(0.01, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn),
        "weight_scale_2": np.float32(rng.uniform(1e-4, 1e-2)),
        "input_scale": np.float32(rng.uniform(1e-3, 1.0)),
    }


def layer_tensors(layer: int) -> list[tuple[str, np.ndarray]]:
    """Deterministic tensors of one layer, in a fixed order."""
    rng = np.random.default_rng(layer)
    out = [(f"model.layers.{layer}.input_layernorm.weight", rng.standard_normal(64).astype(ml_dtypes.bfloat16))]
    for mod, (n, k) in MODULES.items():
        for p, a in nvfp4_module(rng, n, k).items():
            out.append((f"model.layers.{layer}.{mod}.{p}", a))
    return out


def head_tensors():
    rng = np.random.default_rng(1000)
    return [("model.embed_tokens.weight", rng.standard_normal((32, 64)).astype(ml_dtypes.bfloat16)),
            ("lm_head.weight", rng.standard_normal((32, 64)).astype(ml_dtypes.bfloat16))]


def source_config():
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "num_hidden_layers": NUM_LAYERS, "vocab_size": 32,
            "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}


def stored_specs(tensors, fmt="modelopt"):
    """(name, dtype, shape, nbytes) of ``[(name, array), ...]`` as the format stores them."""
    specs = []
    for name, a in tensors:
        for n, b in get_format(fmt).encode(name, a):
            b = np.asarray(b)
            specs.append((n, st_dtype(b.dtype), b.shape, b.nbytes))
    return specs


def planned_units(fmt="modelopt"):
    """The synthetic model's output layout, as PlannedWriter takes it (after the format's renaming)."""
    units = [("head", head_tensors())] + [(f"layer.{i}", layer_tensors(i)) for i in range(NUM_LAYERS)]
    return [(unit, stored_specs(ts, fmt)) for unit, ts in units]


def write_tensors(out, units, fmt="modelopt"):
    """A one-process writer for ``[(unit, [(name, array), ...]), ...]``, every unit added and finished."""
    w = open_planned_writer(out, [(u, stored_specs(ts, fmt)) for u, ts in units], WriterOptions(fmt=fmt))
    for unit, ts in units:
        for name, a in ts:
            w.add(name, a)
        w.finish_unit(unit)
    return w


def write_all(out, extra_files=(), *, stop_after=None, **options):
    """Convert the synthetic model unit by unit; stop_after=k leaves the run unfinished after k units.
    options: WriterOptions fields (default shard_size 20000, settings preset "all")."""
    options = WriterOptions(**{"shard_size": 20_000, "settings": {"preset": "all"}, **options})
    fmt = options.fmt
    w = open_planned_writer(out, planned_units(fmt), options)
    units = [("head", head_tensors)] + [(f"layer.{i}", lambda i=i: layer_tensors(i)) for i in range(NUM_LAYERS)]
    done = 0
    for unit, make in units:
        if w.is_done(unit):
            continue
        if stop_after is not None and done == stop_after:
            # crash in the middle of a unit: part of it is written, never finished
            for name, a in make()[:5]:
                w.add(name, a)
            w.close()
            return None
        for name, a in make():
            w.add(name, a)
        w.finish_unit(unit, {"tensors": len(make())})
        done += 1
    exclude = ["lm_head", "model.embed_tokens"]
    qc, hf = get_format(fmt).configs(exclude, "0.47.0")
    report = {"note": "test", "producer": {"name": "modelopt", "version": "nvfp4_jax-test"}}
    return w.finalize({**source_config(), "quantization_config": qc}, hf, extra_files, report)


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def all_expected():
    return dict(head_tensors() + [t for i in range(NUM_LAYERS) for t in layer_tensors(i)])


def test_round_trip_dtypes_shapes_and_index(tmp_path):
    tok = tmp_path / "tokenizer_config.json"
    tok.write_text('{"x": 1}')
    out = write_all(tmp_path / "out", [tok])
    assert out == tmp_path / "out" and not (tmp_path / "out.partial").exists()
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(files) - set(shards) == {"config.json", "hf_quant_config.json", "model.safetensors.index.json",
                                         "nvfp4_report.json", "tokenizer_config.json", "nvfp4_checksums.json"}
    expected = all_expected()
    # the checksum manifest: CRC-32 of each tensor's bytes in its shard, recomputed here from the file
    import zlib

    from nvfp4_jax.checkpoint.safetensors_io import read_header

    sums = json.loads((out / "nvfp4_checksums.json").read_text())
    assert sums["algorithm"] == "crc32" and sorted(sums["files"]) == shards
    for shard in shards:
        raw = (out / shard).read_bytes()
        entries, _ = read_header(out / shard)
        assert sums["files"][shard] == {n: f"{zlib.crc32(raw[e.start:e.end]):08x}" for n, e in entries.items()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(expected)  # every tensor exactly once
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in expected.values())
    # torch reads every dtype (F8_E4M3 included) with the right shape and bytes
    seen = set()
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert name not in seen and index["weight_map"][name] == shard
                seen.add(name)
                t, ref = f.get_tensor(name), expected[name]
                assert tuple(t.shape) == ref.shape
                want = {np.dtype(ml_dtypes.bfloat16): torch.bfloat16, np.dtype(np.uint8): torch.uint8,
                        np.dtype(ml_dtypes.float8_e4m3fn): torch.float8_e4m3fn, np.dtype(np.float32): torch.float32}
                assert t.dtype == want[ref.dtype], name
                assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == ref.tobytes(), name
    assert seen == set(expected)
    for name in seen:
        if name.endswith(("weight_scale_2", "input_scale")):
            assert index["weight_map"][name] and expected[name].shape == ()
    # config: source keys kept, quantization_config replaced; hf_quant_config as ModelOpt writes it
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt" and cfg["num_hidden_layers"] == NUM_LAYERS
    report = json.loads((out / "nvfp4_report.json").read_text())
    assert list(report["units"]) == ["head"] + [f"layer.{i}" for i in range(NUM_LAYERS)]
    # the source reader refuses an NVFP4 checkpoint as input (quant_method modelopt is not a source format)
    with pytest.raises(CheckpointError, match="'modelopt'"):
        CheckpointReader(out)


def test_shards_follow_the_size_rule(tmp_path):
    """Tensors fill shards in add order; a shard is closed before the tensor that would push its data
    past shard_size, and a tensor larger than shard_size has a shard of its own."""
    shard_size = 20_000
    out = write_all(tmp_path / "out", shard_size=shard_size)
    order = [n for _, specs in planned_units() for n, *_ in specs]
    sizes = {n: a.nbytes for n, a in all_expected().items()}
    shards = [list(read_header(p)[0]) for p in sorted(out.glob("*.safetensors"))]
    assert [n for names in shards for n in names] == order
    for i, names in enumerate(shards):
        data = sum(sizes[n] for n in names)
        assert data <= shard_size or len(names) == 1, i
        if i + 1 < len(shards):
            assert data + sizes[shards[i + 1][0]] > shard_size, i


def test_modelopt_configs_match_golden():
    qc, hf = modelopt_configs(["lm_head", "model.embed_tokens"], "0.47.0")
    assert json.dumps(hf, indent=4) == (GOLDEN / "hf_quant_config.json").read_text()
    golden_cfg = json.loads((GOLDEN / "config.json").read_text())
    assert json.dumps(qc) == json.dumps(golden_cfg["quantization_config"])  # key order too


def test_existing_output_refused_unless_overwrite(tmp_path):
    from nvfp4_jax.guards import OutputPathError

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputPathError, match="already exists"):
        open_planned_writer(out, planned_units())
    # --overwrite replaces only a directory this tool wrote: a foreign one is refused and kept
    with pytest.raises(OutputPathError, match="not written by nvfp4-jax"):
        write_all(out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    (out / "old.txt").unlink()
    out.rmdir()
    write_all(out)
    first = dir_bytes(out)
    write_all(out, overwrite=True)  # our own output: replaced
    assert dir_bytes(out) == first
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_duplicate_tensor_and_wrong_quant_config_errors(tmp_path):
    w = open_planned_writer(tmp_path / "out", [("u", [("a", "F32", (), 4)])])
    w.add("a", np.zeros((), np.float32))
    with pytest.raises(CheckpointError, match="'a' was added twice"):
        w.add("a", np.zeros((), np.float32))
    w.finish_unit("u")
    with pytest.raises(CheckpointError, match="quant_method"):
        w.finalize({"quantization_config": {"quant_method": "fp8"}}, None)
    assert not (tmp_path / "out").exists()


def test_leftover_partial_needs_resume_or_overwrite(tmp_path):
    ref = dir_bytes(write_all(tmp_path / "ref"))
    write_all(tmp_path / "out", stop_after=3)
    with pytest.raises(CheckpointError, match="--resume to continue"):
        write_all(tmp_path / "out")
    assert dir_bytes(write_all(tmp_path / "out", overwrite=True)) == ref  # starts over


def test_add_accepts_jax_arrays(tmp_path):
    import jax.numpy as jnp

    w = write_tensors(tmp_path / "out", [("u", [("b", jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)),
                                                 ("f8", jnp.full((2, 16), 3.0, jnp.float8_e4m3fn)),
                                                 ("s", jnp.float32(2.5))])])
    qc, hf = modelopt_configs([], "x")
    out = w.finalize({"quantization_config": qc}, hf)
    with safe_open(out / "model-00001-of-00001.safetensors", "pt") as f:
        assert f.get_tensor("b").dtype == torch.bfloat16 and f.get_tensor("b")[1, 2].item() == 5.0
        assert f.get_tensor("f8").dtype == torch.float8_e4m3fn and f.get_tensor("f8").float().sum().item() == 96.0
        assert f.get_tensor("s").shape == () and f.get_tensor("s").item() == 2.5


DRIVER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    import tests.test_writer as tw
    from nvfp4_jax.checkpoint.writer import PlannedWriter as W
    orig_finish, orig_add = W.finish_unit, W.add
    finished = []
    def finish(self, unit, info=None):
        orig_finish(self, unit, info)
        finished.append(unit)
        print("done", unit, flush=True)
    def add(self, name, array):
        orig_add(self, name, array)
        if len(finished) == 3 and os.environ.get("HOLD_INSIDE_FOURTH_UNIT"):
            print("writing", name, flush=True)
            sys.stdin.readline()  # held here, part of the unit written, until the test kills it
    W.finish_unit, W.add = finish, add
    tw.write_all(sys.argv[1], resume=True)
    print("finalized", flush=True)
    """
)


def test_sigkill_leaves_no_output_and_resumes_identically(tmp_path):
    ref = dir_bytes(write_all(tmp_path / "ref"))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(Path(__file__).resolve().parents[1])))
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, str(driver), str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**env, "HOLD_INSIDE_FOURTH_UNIT": "1"}, cwd=Path(__file__).parents[1])
    try:
        lines = []
        while not lines or not lines[-1].startswith("writing"):  # head, layer.0, layer.1 done; layer.2 begun
            line = proc.stdout.readline()
            assert line, f"driver exited early: {lines}"
            lines.append(line.strip())
        proc.send_signal(signal.SIGKILL)  # the driver waits on stdin: killed inside layer.2, always
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lines[:3] == ["done head", "done layer.0", "done layer.1"] and len(lines) == 4
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    manifest = json.loads((tmp_path / "out.partial" / "manifest.json").read_text())
    assert list(manifest["units"]) == ["head", "layer.0", "layer.1"]
    res = subprocess.run([sys.executable, str(driver), str(out)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parents[1], timeout=300)
    assert res.returncode == 0, res.stderr
    assert "done head" not in res.stdout and "done layer.0" not in res.stdout  # skipped, not redone
    assert dir_bytes(out) == ref
    assert not (tmp_path / "out.partial").exists()


# --------------------------------------------------------------------------- one-process planned writer


def test_planned_writer_writes_each_tensor_once_in_place(tmp_path):
    """No body or scratch file: the final shards exist from the start, at their final size, and
    the only other files are the plan and the manifest (gone once finalized)."""
    w = open_planned_writer(tmp_path / "out", planned_units(), WriterOptions(shard_size=20_000))
    part = tmp_path / "out.partial"
    sizes = {f: part.joinpath(f).stat().st_size for f in w.files}
    assert sorted(p.name for p in part.iterdir()) == sorted([*w.files, "plan.json", ".nvfp4-jax-partial"])
    for name, a in head_tensors():
        w.add(name, a)
    w.finish_unit("head")
    assert sorted(p.name for p in part.iterdir()) == sorted([*w.files, "plan.json", "manifest.json", ".nvfp4-jax-partial"])
    assert {f: part.joinpath(f).stat().st_size for f in w.files} == sizes
    assert '"head"' in (part / "manifest.json").read_text()
    w.close()


@pytest.mark.parametrize("stop_after", [0, 2, 4])
def test_resume_is_byte_identical(tmp_path, stop_after):
    ref = dir_bytes(write_all(tmp_path / "ref"))
    assert write_all(tmp_path / "out", stop_after=stop_after) is None
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "plan.json").exists()
    assert dir_bytes(write_all(tmp_path / "out", resume=True)) == ref


def test_planned_resume_checks_the_finished_units_bytes(tmp_path):
    ref = dir_bytes(write_all(tmp_path / "ref"))
    write_all(tmp_path / "out", stop_after=3)
    part = tmp_path / "out.partial"
    name = "model.layers.1.mlp.down_proj.weight"  # in a finished unit
    shard = next(p for p in sorted(part.glob("model-*.safetensors")) if name in read_header(p)[0])
    at = read_header(shard)[0][name].start + 7
    with open(shard, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"\(layer.1\) in .* do not match their checksum"):
        write_all(tmp_path / "out", resume=True)
    assert not (tmp_path / "out").exists()
    with open(shard, "r+b") as f:  # repaired: the resume goes through
        f.seek(at)
        f.write(b)
    assert dir_bytes(write_all(tmp_path / "out", resume=True)) == ref


def test_resume_with_other_settings_names_each_one(tmp_path):
    """A resume whose output-changing settings differ from the partial output's is refused with
    every differing setting named, before anything is touched; the original settings resume."""
    ref = dir_bytes(write_all(tmp_path / "ref"))
    write_all(tmp_path / "out", stop_after=2)
    before = dir_bytes(tmp_path / "out.partial")
    with pytest.raises(CheckpointError, match=r"other settings: preset 'all' \(this run: 'mlp_only'\), "
                                              r"shard_size 20000 \(this run: 30000\)"):
        write_all(tmp_path / "out", resume=True, shard_size=30_000, settings={"preset": "mlp_only"})
    with pytest.raises(CheckpointError, match=r"num_processes 1 \(this run: 2\)"):
        PlannedWriter(tmp_path / "out", planned_units(), WriterOptions(
            shard_size=20_000, num_processes=2, resume=True, settings={"preset": "all"})).prepare()
    assert dir_bytes(tmp_path / "out.partial") == before
    assert dir_bytes(write_all(tmp_path / "out", resume=True)) == ref


def test_planned_writer_refuses_a_tensor_outside_the_plan_and_missing_ones(tmp_path):
    w = open_planned_writer(tmp_path / "out", planned_units(), WriterOptions(shard_size=20_000))
    with pytest.raises(CheckpointError, match="not in the output plan"):
        w.add("model.layers.9.x", np.zeros(3, np.float32))
    for name, a in head_tensors():
        w.add(name, a)
    w.finish_unit("head")
    qc, hf = modelopt_configs([], "x")
    with pytest.raises(CheckpointError, match="did not finish layer.0"):
        w.finalize({**source_config(), "quantization_config": qc}, hf)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- compressed-tensors format


def test_to_compressed_tensors_renames_and_inverts():
    rng = np.random.default_rng(0)
    t = nvfp4_module(rng, 16, 32)
    m = dict(x for p, a in t.items() for x in to_compressed_tensors(f"m.{p}", a))
    assert set(m) == {"m.weight_packed", "m.weight_scale", "m.weight_global_scale", "m.input_global_scale"}
    assert m["m.weight_packed"] is t["weight"] and m["m.weight_scale"] is t["weight_scale"]
    for new, old in (("weight_global_scale", "weight_scale_2"), ("input_global_scale", "input_scale")):
        a = m[f"m.{new}"]
        assert a.dtype == np.float32 and a.shape == (1,)
        assert a[0] == np.float32(1.0) / t[old]
    bf = np.ones((2, 2), ml_dtypes.bfloat16)
    assert to_compressed_tensors("lm_head.weight", bf) == [("lm_head.weight", bf)]


def test_compressed_tensors_config_matches_the_package():
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
    from compressed_tensors.quantization import QuantizationConfig

    ours = compressed_tensors_config(["lm_head", "model.layers.0.self_attn*"])
    parsed = QuantizationConfig.model_validate(ours)
    lib = ModelOptNvfp4Converter(ignore=["lm_head"], targets=["Linear"])._build_quant_config()
    a, b = parsed.config_groups["group_0"], lib.config_groups["config_group_0"]
    assert a.model_dump() == b.model_dump()
    assert parsed.format == "nvfp4-pack-quantized" and parsed.quantization_status == "compressed"
    assert ours["ignore"][1].startswith("re:")
    import re

    assert re.match(ours["ignore"][1][3:], "model.layers.0.self_attn.q_proj")
    assert not re.match(ours["ignore"][1][3:], "model.layers.10.self_attn.q_proj")


def test_compressed_tensors_package_decompresses_our_output(tmp_path):
    """Write the second format and let compressed-tensors dequantize it; compare with E2M1 * scales."""
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    out = write_all(tmp_path / "ct", fmt="compressed-tensors")
    assert not (out / "hf_quant_config.json").exists()
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.uint8
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.mlp.down_proj.weight_global_scale"].shape == (1,)
    deq = CompressedTensorsDequantizer(out, dtype=torch.float32).process(dict(tensors))
    expected = all_expected()
    n = 0
    for name, t in deq.items():
        mod, _, p = name.rpartition(".")
        if p != "weight" or f"{mod}.weight_scale_2" not in expected:
            continue
        packed = expected[name]
        codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], -1)
        scale = np.repeat(expected[f"{mod}.weight_scale"].astype(np.float32), 16, axis=1)
        ref = E2M1[codes] * scale * expected[f"{mod}.weight_scale_2"]
        # the package unpacks to bf16, divides the scale by 1/weight_scale_2 (a few f32 ulps from
        # multiplying by weight_scale_2) and rounds the product to bf16: at most one bf16 ulp apart
        ref_bf16 = ref.astype(ml_dtypes.bfloat16).astype(np.float32)
        got = t.numpy()
        np.testing.assert_allclose(got, ref, rtol=2**-8, atol=0, err_msg=name)
        assert np.mean(got == ref_bf16) > 0.99, name
        n += 1
    assert n == NUM_LAYERS * len(MODULES)
    assert "lm_head.weight" in deq and "model.layers.0.mlp.down_proj.input_global_scale" in deq


def test_transformers_loads_compressed_tensors_output(tmp_path):
    """A tiny Llama written in the second format loads through transformers' compressed-tensors
    integration without missing/unexpected keys, and its decompressed weights are E2M1 * scales."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32, head_dim=32)
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
              "mlp.down_proj": (64, 128)}
    rng = np.random.default_rng(0)
    tensors, ref = [], {}
    for m, (n, k) in shapes.items():
        t = nvfp4_module(rng, n, k)
        tensors += [(f"model.layers.0.{m}.{p}", a) for p, a in t.items()]
        codes = np.stack([t["weight"] & 0xF, t["weight"] >> 4], -1).reshape(n, -1)
        ref[m] = E2M1[codes] * np.repeat(t["weight_scale"].astype(np.float32), 16, 1) * t["weight_scale_2"]
    for name, shape in [("model.embed_tokens.weight", (32, 64)), ("lm_head.weight", (32, 64)),
                        ("model.norm.weight", (64,)), ("model.layers.0.input_layernorm.weight", (64,)),
                        ("model.layers.0.post_attention_layernorm.weight", (64,))]:
        tensors.append((name, rng.standard_normal(shape).astype(ml_dtypes.bfloat16)))
    w = write_tensors(tmp_path / "out", [("all", tensors)], fmt="compressed-tensors")
    out = w.finalize({**cfg.to_dict(), "quantization_config": compressed_tensors_config(["lm_head"])}, None)

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model(torch.tensor([[1, 2, 3]]))  # the first forward decompresses
    for m in shapes:
        got = model.model.layers[0].get_submodule(m).weight.detach().float().numpy()
        np.testing.assert_array_equal(got, ref[m].astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=m)


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_format_names_round_trip_and_match_what_it_stores(fmt):
    """Logical -> stored -> logical gives the name back, and stored_spec names/shapes what encode writes."""
    f = get_format(fmt)
    t = nvfp4_module(np.random.default_rng(1), 16, 32)
    for param, a in t.items():
        name = f"model.layers.0.mlp.down_proj.{param}"
        a = np.asarray(a)
        ((stored, b),) = f.encode(name, a)
        b = np.asarray(b)
        assert f.stored_spec(name, st_dtype(a.dtype), a.shape) == (stored, st_dtype(b.dtype), b.shape)
        assert f.logical_name(stored) == name
        if param in ("weight_scale_2", "input_scale"):  # read back as the multiplying f32 scale
            want = t[param] if fmt == "modelopt" else np.float32(1.0) / b.reshape(-1)[0]
            assert f.tensor_scale(b) == want and f.tensor_scale(b).dtype == np.float32
    assert f.logical_name("model.norm.weight") == "model.norm.weight"
