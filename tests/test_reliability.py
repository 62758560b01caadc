"""Nothing lost, nothing silently wrong (issue 9): each case a new user hit, reproduced, with the
behaviour now promised: the exit code, the message, no OUT, and the source and its neighbours
byte-identical."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nvfp4_jax import examples, pipeline
from nvfp4_jax.checkpoint.safetensors_io import FileCache, read_header, save_file
from nvfp4_jax.cli import main as cli_main
from nvfp4_jax.errors import NVFP4Error
from nvfp4_jax.interrupts import Interrupted, signals_raise
from nvfp4_jax.pipeline import ConvertOptions, convert
from tests.checkpoint_files import tree_bytes
from tests.cli_process import start_cli, wait_for_first_layer


def _tokens(src, n=4, seq=16):
    return examples.calibration_samples(src, n, seq)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return examples.build_llama_tiny(tmp_path_factory.mktemp("rel") / "src", seed=7)


def _interrupted(src, out, opts: ConvertOptions, monkeypatch, after_units: int = 1) -> None:
    """A run stopped (by an error) after ``after_units`` finished layers: OUT.partial is left."""
    real = pipeline._quantize_and_write
    calls = {"n": 0}

    def stop_after(*a, **k):
        if calls["n"] >= after_units:
            raise KeyboardInterrupt("test stop")
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "_quantize_and_write", stop_after)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, opts, log=lambda m: None)
    monkeypatch.setattr(pipeline, "_quantize_and_write", real)
    assert not out.exists() and Path(f"{out}.partial").exists()


# 1. a resume that differs from the interrupted run is refused before any work, naming each setting

@pytest.mark.parametrize("change, named", [
    ({"moe_policy": "per-expert"}, "moe_policy"),
    ({"batch_size": 2}, "batch_size"),
    ({"calib_tokens": "other"}, "calibration tokens"),
    ({"calib_tokens": None, "input_scale_constant": 1.0}, "input_scale_constant"),
    ({"preset": "mlp_only", "shard_size": 7e4}, "preset"),
])
def test_resume_with_other_settings_is_refused_and_changes_nothing(llama, tmp_path, monkeypatch, change, named):
    out = tmp_path / "out"
    base = ConvertOptions(calib_tokens=_tokens(llama), progress=False)
    _interrupted(llama, out, base, monkeypatch)
    before = tree_bytes(Path(f"{out}.partial"))
    fields = dict(change)
    if fields.get("calib_tokens") == "other":
        fields["calib_tokens"] = _tokens(llama, 4, 12)
    other = ConvertOptions(**{**base.__dict__, **fields, "resume": True})
    with pytest.raises(NVFP4Error) as e:
        convert(llama, out, other, log=lambda m: None)
    msg = str(e.value)
    assert "cannot resume" in msg and named in msg
    if "shard_size" in fields:
        assert "shard_size" in msg  # every differing setting is named, not only the first
    assert tree_bytes(Path(f"{out}.partial")) == before and not out.exists()


def test_resume_from_another_source_of_the_same_shapes_is_refused(llama, tmp_path, monkeypatch):
    other = examples.build_llama_tiny(tmp_path / "other", seed=8)  # same names, dtypes, shapes
    out = tmp_path / "out"
    opts = ConvertOptions(input_scale_constant=1.0, progress=False)
    _interrupted(llama, out, opts, monkeypatch)
    before = tree_bytes(Path(f"{out}.partial"))
    with pytest.raises(NVFP4Error, match=r"cannot resume: the source tensors of layer\.0 .* are not those"):
        convert(other, out, ConvertOptions(**{**opts.__dict__, "resume": True}), log=lambda m: None)
    assert tree_bytes(Path(f"{out}.partial")) == before and not out.exists()


def test_same_resume_completes_byte_identical_and_says_resumed(llama, tmp_path, monkeypatch):
    opts = ConvertOptions(calib_tokens=_tokens(llama), progress=False, shard_size=1e5)
    clean = tmp_path / "clean"
    convert(llama, clean, opts, log=lambda m: None)
    out = tmp_path / "out"
    _interrupted(llama, out, opts, monkeypatch)
    report = convert(llama, out, ConvertOptions(**{**opts.__dict__, "resume": True}), log=lambda m: None)
    assert report["resumed"] is True
    a, b = tree_bytes(clean), tree_bytes(out)
    a.pop("nvfp4_report.json"), b.pop("nvfp4_report.json")
    assert a == b


def test_resume_without_a_partial_run_says_so(llama, tmp_path):
    lines = []
    report = convert(llama, tmp_path / "out", ConvertOptions(input_scale_constant=1.0, progress=False, resume=True),
                     log=lines.append)
    assert report["resumed"] is False
    assert any("no interrupted run" in line for line in lines)


# 2. --overwrite and example never delete what the tool did not write

def test_output_equal_to_inside_or_above_the_source_is_refused(llama, tmp_path, capsys):
    before = tree_bytes(llama.parent)
    for out in (llama, llama / "sub", llama.parent):
        code = cli_main(["convert", str(llama), str(out), "--input-scale-constant", "1.0", "--overwrite", "--quiet"])
        assert code == 2
        assert "which this run reads" in capsys.readouterr().err
    assert tree_bytes(llama.parent) == before


def test_overwrite_of_a_foreign_directory_or_a_file_is_refused(llama, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, why in ((foreign, "not written by nvfp4-jax"), (a_file, "not a directory")):
        code = cli_main(["convert", str(llama), str(out), "--input-scale-constant", "1.0", "--overwrite", "--quiet"])
        assert code == 2 and why in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine" and a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "foreign"]  # no .partial, no .old-PID


def test_example_never_deletes_or_overwrites_what_it_did_not_create(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    assert cli_main(["example", "llama-tiny", str(out)]) == 2
    assert "not written by nvfp4-jax" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    existing = examples.build_llama_tiny(tmp_path / "existing", seed=1)
    before = tree_bytes(existing)
    assert cli_main(["example", "llama-tiny", str(tmp_path / "o2"), "--source", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert tree_bytes(existing) == before and not (tmp_path / "o2").exists()


def test_free_space_is_checked_from_the_plan_before_calibration(llama, tmp_path, monkeypatch):
    import shutil as shutil_mod

    from nvfp4_jax import guards

    monkeypatch.setattr(guards.shutil, "disk_usage", lambda p: shutil_mod._ntuple_diskusage(10**9, 10**9 - 10, 10))
    called = []
    monkeypatch.setattr(pipeline, "_embed", lambda run: called.append(1) or [])
    with pytest.raises(NVFP4Error, match="not enough free space"):
        convert(llama, tmp_path / "out", ConvertOptions(calib_tokens=_tokens(llama), progress=False), log=lambda m: None)
    assert not called and not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# 3. non-finite values anywhere the run reads

def _rewrite(src: Path, name: str, edit) -> None:
    shard = next(p for p in src.glob("*.safetensors") if name in read_header(p)[0])
    cache = FileCache()
    tensors = {n: np.array(cache.read(e)) for n, e in read_header(shard)[0].items()}
    cache.close()
    edit(tensors)
    save_file(shard, tensors, {"format": "pt"})


@pytest.mark.parametrize("name, calibrated", [("model.layers.1.input_layernorm.weight", True),
                                               ("model.norm.weight", False),
                                               ("model.embed_tokens.weight", True)])
def test_nan_in_a_tensor_that_is_not_quantized_is_a_named_error(tmp_path, name, calibrated):
    src = examples.build_llama_tiny(tmp_path / "src", seed=2)

    def put_nan(t):
        a = t[name].astype(np.float32)
        a.reshape(-1)[3] = np.nan
        t[name] = a.astype(ml_dtypes.bfloat16)

    _rewrite(src, name, put_nan)
    opts = ConvertOptions(calib_tokens=_tokens(src) if calibrated else None,
                          input_scale_constant=None if calibrated else 1.0, progress=False)
    with pytest.raises(NVFP4Error, match=rf"{name.replace('.', '[.]')}.* holds nan at index"):
        convert(src, tmp_path / "out", opts, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_statistics_merge_keeps_nan():
    from nvfp4_jax.calibration import CalibStats

    a, b = CalibStats(), CalibStats()
    a.input_amax["m"] = 1.0
    b.input_amax["m"] = float("nan")
    assert np.isnan(a.merge(b).input_amax["m"]) and np.isnan(b.merge(a).input_amax["m"])


# 4. a tensor the index omits is an error, not a silent drop

def test_tensor_in_a_shard_but_not_in_the_index_is_an_error(tmp_path, capsys):
    src = examples.build_kimi_k2_tiny(tmp_path / "src", seed=3)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = sorted(index["weight_map"].items())[0]
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    code = cli_main(["convert", str(src), str(tmp_path / "out"), "--input-scale-constant", "1.0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and name in err and shard in err and "does not list it" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# 5. conflicting calibration options

def test_conflicting_calibration_options_are_an_error(llama, tmp_path, capsys):
    tok = tmp_path / "t.json"
    tok.write_text(json.dumps({"input_ids": _tokens(llama)}))
    code = cli_main(["convert", str(llama), str(tmp_path / "out"), "--calib-tokens", str(tok),
                     "--input-scale-constant", "1.0", "--quiet"])
    assert code == 2 and "were given together" in capsys.readouterr().err


# 6. signals: SIGTERM (and SIGINT) leave a resumable partial and print one clean line

def test_a_signal_swallowed_inside_a_library_still_stops_the_run(llama, tmp_path, monkeypatch):
    """The signal's exception raised inside code that catches everything (JAX's compilation cache
    read turns it into a warning): the run stops at the next layer, OUT is not made final."""
    real = pipeline._quantize_and_write

    def swallowed(*a, **k):
        try:
            signal.raise_signal(signal.SIGTERM)
        except Exception:
            pass
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "_quantize_and_write", swallowed)
    out = tmp_path / "out"
    with pytest.raises(Interrupted) as e:
        with signals_raise():
            convert(llama, out, ConvertOptions(calib_tokens=_tokens(llama), progress=False), log=lambda m: None)
    assert e.value.signum == signal.SIGTERM
    assert not out.exists() and Path(f"{out}.partial").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_leaves_a_resumable_partial_and_one_line(tmp_path, sig):
    src = examples.build_kimi_k2_tiny(tmp_path / "src", seed=4)
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps({"input_ids": _tokens(src, 4, 16)}))
    args = ["convert", src, None, "--calib-tokens", tok, "--shard-size", "300000", "--quiet"]
    clean = tmp_path / "clean"
    p = start_cli(*[clean if a is None else a for a in args])
    assert p.wait(timeout=600) == 0, p.stderr.read()
    out = tmp_path / "out"
    p = start_cli(*[out if a is None else a for a in args])
    wait_for_first_layer(out, p)
    if p.poll() is not None:
        pytest.skip("the run finished before the signal could be sent")
    p.send_signal(sig)
    code = p.wait(timeout=120)
    err = p.stderr.read()
    assert code == 128 + sig, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith(f"interrupted by {signal.Signals(sig).name}")
    assert not out.exists() and Path(f"{out}.partial").exists()
    p = start_cli(*[out if a is None else a for a in args], "--resume")
    assert p.wait(timeout=600) == 0, p.stderr.read()
    a, b = tree_bytes(clean), tree_bytes(out)
    a.pop("nvfp4_report.json"), b.pop("nvfp4_report.json")
    assert a == b


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_sigkill_at_a_random_point_then_resume_is_byte_identical(tmp_path, seed):
    """Whatever the moment of a SIGKILL (drawn from the clean run's duration), --resume finishes
    with the bytes of an uninterrupted run (or the run had already finished them)."""
    import random

    src = examples.build_llama_tiny(tmp_path / "src", seed=seed)
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps({"input_ids": _tokens(src, 4, 16)}))
    args = ["convert", src, None, "--calib-tokens", tok, "--shard-size", "60000", "--quiet"]
    clean = tmp_path / "clean"
    t0 = time.monotonic()
    p = start_cli(*[clean if a is None else a for a in args])
    assert p.wait(timeout=600) == 0, p.stderr.read()
    duration = time.monotonic() - t0
    out = tmp_path / "out"
    p = start_cli(*[out if a is None else a for a in args])
    time.sleep(random.Random(seed).uniform(0.2, 1.0) * duration)
    p.kill()
    p.wait()
    if not out.exists():
        p = start_cli(*[out if a is None else a for a in args], "--resume")
        assert p.wait(timeout=600) == 0, p.stderr.read()
    a, b = tree_bytes(clean), tree_bytes(out)
    a.pop("nvfp4_report.json"), b.pop("nvfp4_report.json")
    assert a == b
