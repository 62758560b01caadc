"""Output path guards and the run fingerprint (issue 9): nothing the tool did not write is deleted,
and a resume names every setting that differs."""

import json

import pytest

from nvfp4_jax import fingerprint, guards


def _our_output(path):
    path.mkdir(parents=True)
    (path / "nvfp4_report.json").write_text(json.dumps({"producer": {"name": "modelopt", "version": "nvfp4_jax-0.1.0"}}))


@pytest.mark.parametrize("out_rel, how", [("src", "is"), ("src/inner", "is inside"), (".", "contains"),
                                          ("src.partial/..", "contains")])
def test_output_overlapping_the_source_is_refused(tmp_path, out_rel, how):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(guards.OutputPathError, match=how):
        guards.check_output_path(tmp_path / out_rel, [src])


def test_output_whose_partial_is_the_source_is_refused(tmp_path):
    src = tmp_path / "m.partial"
    src.mkdir()
    with pytest.raises(guards.OutputPathError, match=str(src)):
        guards.check_output_path(tmp_path / "m", [src])


def test_output_beside_the_source_and_calibration_file_is_allowed(tmp_path):
    (tmp_path / "src").mkdir()
    calib = tmp_path / "calib.txt"
    calib.write_text("x")
    guards.check_output_path(tmp_path / "out", [tmp_path / "src", calib])


def test_calibration_file_inside_the_output_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(guards.OutputPathError, match="contains"):
        guards.check_output_path(out, [out / "calib.txt"])


def test_overwrite_replaces_only_our_outputs(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(guards.OutputPathError, match="already exists"):
        guards.check_replaceable(foreign, overwrite=False)
    with pytest.raises(guards.OutputPathError, match="not written by nvfp4-jax"):
        guards.check_replaceable(foreign, overwrite=True)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(guards.OutputPathError, match="not a directory"):
        guards.check_replaceable(a_file, overwrite=True)
    ours = tmp_path / "ours"
    _our_output(ours)
    guards.check_replaceable(ours, overwrite=True)
    guards.check_replaceable(tmp_path / "absent", overwrite=False)
    assert (foreign / "keep.txt").read_text() == "precious" and a_file.read_text() == "x"


def test_report_of_another_producer_is_not_ours(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "nvfp4_report.json").write_text(json.dumps({"producer": {"version": "0.47.0"}}))
    assert not guards.written_by_this_tool(other)
    (other / "nvfp4_report.json").write_text("not json")
    assert not guards.written_by_this_tool(other)


def test_partial_without_our_plan_is_not_removable(tmp_path):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    with pytest.raises(guards.OutputPathError, match="not made by nvfp4-jax"):
        guards.check_partial_removable(partial)
    (partial / "plan.json").write_text(json.dumps({"digest": "abc"}))
    guards.check_partial_removable(partial)


def test_free_space_check_names_the_sizes(tmp_path):
    guards.check_free_space(tmp_path / "new" / "out", 1)
    with pytest.raises(guards.OutputPathError, match="not enough free space"):
        guards.check_free_space(tmp_path / "out", 1 << 62)


def test_differences_name_each_setting():
    a = {"moe_policy": "layer-max", "source tensor headers": "a" * 64, "preset": "all"}
    b = {"moe_policy": "expert", "source tensor headers": "b" * 64, "preset": "all", "new": 1}
    lines = fingerprint.differences(a, b)
    assert len(lines) == 3
    assert lines[0].startswith("moe_policy: 'layer-max' in the interrupted run, 'expert' now")
    assert any(line.startswith("source tensor headers: aaaaaaaaaaaa...") for line in lines)
    assert any(line.startswith("new: '(not recorded)'") for line in lines)
    assert fingerprint.differences(a, dict(a)) == []


def test_tokens_fingerprint_sees_any_change():
    base = fingerprint.tokens_fingerprint([[1, 2, 3], [4, 5]])
    assert base == fingerprint.tokens_fingerprint([[1, 2, 3], [4, 5]])
    assert base != fingerprint.tokens_fingerprint([[1, 2, 3], [4, 6]])
    assert base != fingerprint.tokens_fingerprint([[1, 2], [3, 4, 5]])
    assert fingerprint.tokens_fingerprint(None) == {"calibration tokens": None}


def test_source_sample_crc_sees_replaced_contents(tmp_path):
    from nvfp4_jax import examples
    from nvfp4_jax.checkpoint.safetensors_io import read_header

    src = examples.build_llama_tiny(tmp_path / "src", seed=1)
    name = "model.layers.0.mlp.up_proj.weight"
    with _Reader(src) as r:
        before = fingerprint.source_sample_crc(r, [name])
        assert before == fingerprint.source_sample_crc(r, [name])
        other = fingerprint.source_sample_crc(r, ["model.layers.0.mlp.down_proj.weight"])
    assert other != before
    shard = next(src.glob("*.safetensors"))
    e = read_header(shard)[0][name]
    with open(shard, "r+b") as f:  # the tensor's first byte, as another source would differ
        f.seek(e.start)
        b = f.read(1)
        f.seek(e.start)
        f.write(bytes([b[0] ^ 0x40]))
    with _Reader(src) as r:
        assert fingerprint.source_sample_crc(r, [name]) != before


class _Reader:
    def __init__(self, path):
        from nvfp4_jax.checkpoint.reader import CheckpointReader

        self.r = CheckpointReader(path)

    def __enter__(self):
        return self.r

    def __exit__(self, *exc):
        self.r.close()
