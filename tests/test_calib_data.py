"""Calibration input: the source's tokenizer (tokenizer.json or Kimi's tiktoken files), chat records,
the built-in Kimi example as Moonshot lays it out, and every strict-input error."""

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from nvfp4_jax import calib_data, examples
from nvfp4_jax.calib_data import CalibrationInputError, CalibrationRequest, load_calibration, load_tokenizer

# Written out here from ../shared/KIMI.md (tokenization_kimi.py), not taken from the code under test.
KIMI_MD_ALTERNATIVES = [
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
]
KIMI_MD_PATTERN = "|".join(KIMI_MD_ALTERNATIVES)
MOONSHOT_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]

# Han runs, apostrophe suffixes in both cases, digit runs longer than 3, mixed whitespace and newlines
PATTERN_TEXT = ("模型量化可以减少显存 and English混合 I'm sure they'll say it's DON'T-STOP we've\n"
                "12345678 items cost 3.14159 dollars!!\n\n\tTabs  and   spaces \r\nCRLF   \n 你好，世界。 café ŁÓDŹ naïve's\n")
SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"]
# Besides common merges, some that can only form where a wrong pattern fails to split (across a
# 3-digit run, an upper-case apostrophe suffix, a Latin/Han boundary, a CR LF pair): the test then
# sees each alternative of the pattern.
MERGES = [b"th", b"the", b" the", b"in", b"ing", b"'s", b"'ll", b"12", b"123", b"  ", b"\n\n", b"er",
          b" a", b" an", b" and", "中".encode(), "模型".encode()[:4], b"es", b"ar", b"at",
          b"67", b"N'", b"h\xe6", b"\r\n"]


def _test_vocab() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for m in MERGES:
        ranks.setdefault(m, len(ranks))
    return ranks


def _write_tiktoken_source(d: Path, ranks, template: str | None = None, vocab: int | None = None) -> dict[str, int]:
    """A directory laid out like Moonshot's tokenizer: tiktoken.model, tokenizer_config.json (specials
    right after the ranks), optional chat_template.jinja, and a config.json with vocab_size."""
    d.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (d / "tiktoken.model").write_text("\n".join(lines) + "\n")
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIALS)}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in specials.items()},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))
    if template is not None:
        (d / "chat_template.jinja").write_text(template)
    (d / "config.json").write_text(json.dumps({"vocab_size": vocab or len(ranks) + len(SPECIALS)}))
    return specials


def _reference_encoding(ranks, specials) -> tiktoken.Encoding:
    return tiktoken.Encoding("reference", pat_str=KIMI_MD_PATTERN, mergeable_ranks=dict(ranks),
                             special_tokens=dict(specials))


@pytest.fixture
def tiktoken_src(tmp_path):
    ranks = _test_vocab()
    specials = _write_tiktoken_source(tmp_path / "src", ranks)
    return tmp_path / "src", ranks, specials


# --------------------------------------------------------------------------- tiktoken tokenizer


def test_tiktoken_ids_equal_the_tiktoken_library(tiktoken_src):
    src, ranks, specials = tiktoken_src
    ours = load_tokenizer(src).encode(PATTERN_TEXT)
    ref = _reference_encoding(ranks, specials).encode(PATTERN_TEXT)
    assert ours == ref
    assert len(ref) < len(PATTERN_TEXT.encode())  # merges were applied
    assert bytes().join(_reference_encoding(ranks, specials).decode_single_token_bytes(i) for i in ours) == \
        PATTERN_TEXT.encode()


def test_pattern_text_exercises_every_alternative():
    """Without any one alternative of the pattern, or with a part of one changed, the test text gives
    other ids: a tokenizer with a wrong pattern fails the test above."""
    ranks = _test_vocab()

    def ids(pattern):
        return tiktoken.Encoding("p", pat_str=pattern, mergeable_ranks=dict(ranks), special_tokens={}).encode(PATTERN_TEXT)

    ref = ids(KIMI_MD_PATTERN)
    variants = ["|".join(KIMI_MD_ALTERNATIVES[:i] + KIMI_MD_ALTERNATIVES[i + 1:]) for i in range(len(KIMI_MD_ALTERNATIVES))]
    variants += [KIMI_MD_PATTERN.replace("(?i:", "(?:"), KIMI_MD_PATTERN.replace("{1,3}", "+"),
                 KIMI_MD_PATTERN.replace("&&[^\\p{Han}]", ""), KIMI_MD_PATTERN.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)?", "")]
    assert all(v != KIMI_MD_PATTERN for v in variants)
    assert all(ids(v) != ref for v in variants)


def test_txt_is_cut_into_windows_of_seq_len(tiktoken_src, tmp_path):
    src, ranks, specials = tiktoken_src
    f = tmp_path / "calib.txt"
    f.write_text(PATTERN_TEXT * 3)
    samples = load_calibration(src, CalibrationRequest(text_file=f, seq_len=16))
    ref = _reference_encoding(ranks, specials).encode(PATTERN_TEXT * 3)
    assert samples == [ref[i:i + 16] for i in range(0, len(ref), 16)]


def test_chat_records_render_with_the_template_and_specials_are_single_ids(tmp_path):
    ranks = _test_vocab()
    template = ("{{ bos_token }}{% for m in messages %}"
                "{% if m.role == 'user' %}<|im_user|>{% else %}<|im_assistant|>{% endif %}"
                "{{ m.role }}<|im_middle|>{{ m.content }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_assistant|>{% endif %}")
    specials = _write_tiktoken_source(tmp_path / "src", ranks, template=template)
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "What's 1234 x 2?"},
                                          {"role": "assistant", "content": "It's 2468."}]}) + "\n\n"
                 + json.dumps({"text": "plain 模型 text"}) + "\n")
    samples = load_calibration(tmp_path / "src", CalibrationRequest(text_file=f))
    ref = _reference_encoding(ranks, specials)
    expected_chat = ("[BOS]<|im_user|>user<|im_middle|>What's 1234 x 2?<|im_end|>"
                     "<|im_assistant|>assistant<|im_middle|>It's 2468.<|im_end|>")
    assert samples == [ref.encode(expected_chat, allowed_special="all"), ref.encode("plain 模型 text")]
    chat = samples[0]
    for token in ("[BOS]", "<|im_user|>", "<|im_middle|>", "<|im_end|>", "<|im_assistant|>"):
        assert specials[token] in chat, token
    assert chat.count(specials["<|im_end|>"]) == 2 and chat[0] == specials["[BOS]"]
    assert not any(ref.decode_single_token_bytes(i) == b"<" for i in chat)  # no special spelled out


def test_chat_template_from_tokenizer_config(tiktoken_src, tmp_path):
    src, ranks, specials = tiktoken_src
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}]
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    assert load_calibration(src, CalibrationRequest(text_file=f)) == [[ord("h"), ord("i"), specials["[EOS]"]]]


# --------------------------------------------------------------------------- tokenizer.json


def test_tokenizer_json_source(tmp_path):
    from tokenizers import Tokenizer

    src = tmp_path / "src"
    src.mkdir()
    examples.byte_level_tokenizer(src)
    (src / "config.json").write_text(json.dumps({"vocab_size": 259}))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    f = tmp_path / "calib.jsonl"
    f.write_text(json.dumps({"text": PATTERN_TEXT}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "ok"}]}))
    samples = load_calibration(src, CalibrationRequest(text_file=f, seq_len=1000))
    ref = Tokenizer.from_file(str(src / "tokenizer.json"))
    assert samples[0] == ref.encode(PATTERN_TEXT).ids
    assert samples[1] == [256, ord("o"), ord("k"), 257]  # <|bos|> ok <|eos|>, specials as single ids


def test_tokenizer_json_is_preferred_over_tiktoken(tiktoken_src):
    src, _, _ = tiktoken_src
    examples.byte_level_tokenizer(src)
    assert load_tokenizer(src).encode("the") == [ord("t"), ord("h"), ord("e")]


# --------------------------------------------------------------------------- the built-in Kimi example


@pytest.fixture(scope="module")
def kimi_example(tmp_path_factory):
    """``example kimi-k2-tiny`` through the CLI with its default calibration."""
    from nvfp4_jax.cli import main

    d = tmp_path_factory.mktemp("kimi")
    assert main(["example", "kimi-k2-tiny", str(d / "out"), "--source", str(d / "src")]) == 0
    return d / "src", d / "out"


def test_kimi_example_mirrors_moonshots_file_set(kimi_example):
    src, _ = kimi_example
    files = {p.name for p in src.iterdir()}
    assert "tokenizer.json" not in files
    assert {"tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "configuration_deepseek.py",
            "modeling_deepseek.py", "tokenization_kimi.py", "model-00001-of-000002.safetensors",
            "model-00002-of-000002.safetensors", "model.safetensors.index.json"} <= files
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["model_type"] == "kimi_k2" and qc["ignore"] == MOONSHOT_IGNORE
    assert (qc["format"], qc["quant_method"]) == ("pack-quantized", "compressed-tensors")
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "TikTokenTokenizer"
    n_ranks = len((src / "tiktoken.model").read_text().splitlines())
    added = {int(i): e["content"] for i, e in tok_cfg["added_tokens_decoder"].items()}
    assert min(added) == n_ranks and max(added) == cfg["vocab_size"] - 1  # specials right after the ranks
    assert added[cfg["bos_token_id"]] == "[BOS]" and added[cfg["eos_token_id"]] == "[EOS]"
    assert {"<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"} <= set(added.values())


def test_kimi_example_default_calibration_leaves_experts_without_tokens(kimi_example):
    from nvfp4_jax.checkpoint.safetensors_io import FileCache, read_header

    _, out = kimi_example
    report = json.loads((out / "nvfp4_report.json").read_text())
    assert report["calibration"]["samples"] >= 1
    assert sum(report["experts_without_tokens"].values()) > 0
    cache, scales = FileCache(), {}
    for f in sorted(out.glob("*.safetensors")):
        for name, e in read_header(f)[0].items():
            if name.endswith("input_scale") and ".experts." in name:
                scales[name] = float(np.array(cache.read(e)))
    cache.close()
    assert len(scales) == 2 * 16 * 3
    assert all(np.isfinite(s) and s > 0 for s in scales.values())
    for name, s in scales.items():  # gate/up share their input scale, tokens or not
        if ".gate_proj." in name:
            assert scales[name.replace(".gate_proj.", ".up_proj.")] == s


def test_kimi_example_converts_from_chat_text_without_tokenizer_json(kimi_example, tmp_path, capsys):
    from nvfp4_jax.cli import main
    from nvfp4_jax.verify import verify

    src, _ = kimi_example
    f = tmp_path / "calib.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (
        {"messages": [{"role": "user", "content": "Summarise mixture-of-experts routing."},
                      {"role": "assistant", "content": "Each token picks its top-k experts."}]},
        {"text": "The quick brown fox jumps over the lazy dog."})))
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--calib", str(f), "--quiet"]) == 0, capsys.readouterr().err
    assert json.loads((out / "nvfp4_report.json").read_text())["calibration"]["samples"] == 2
    assert verify(out) == []
    tok = load_tokenizer(src)
    chat_ids = tok.encode_record(json.loads(f.read_text().splitlines()[0]), "line 1")
    specials = {e["content"]: int(i) for i, e in
                json.loads((src / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
    assert chat_ids.count(specials["<|im_end|>"]) == 3  # default system message + 2 turns


def test_calibration_samples_accepts_the_source_dir_or_a_file_in_it(kimi_example):
    src, _ = kimi_example
    assert examples.calibration_samples(src, 2, 8) == examples.calibration_samples(src / "tokenizer.json", 2, 8)


# --------------------------------------------------------------------------- strict input


def _tokens_file(tmp_path, ids) -> Path:
    f = tmp_path / "calib_tokens.json"
    f.write_text(json.dumps({"input_ids": ids}))
    return f


@pytest.mark.parametrize("ids, shown", [
    ([[1, 2], [3, -1]], r"input_ids\[1\]\[1\] = -1"),
    ([[1, 2.5]], r"input_ids\[0\]\[1\] = 2.5"),
    ([[1.0]], r"input_ids\[0\]\[0\] = 1.0"),
    ([[True, 1]], r"input_ids\[0\]\[0\] = True"),
    ([["7"]], r"input_ids\[0\]\[0\] = '7'"),
    ([[1, 5000]], r"input_ids\[0\]\[1\] = 5000 .*\[0, 287\)"),  # 256 bytes + 24 merges + 7 specials
    ([[1], []], r"input_ids\[1\]: empty sample"),
    ([[1], 2], r"input_ids\[1\]: expected a list"),
    ([], r"input_ids: expected a non-empty list"),
])
def test_token_ids_must_be_integers_in_vocab(tiktoken_src, tmp_path, ids, shown):
    src, _, _ = tiktoken_src
    f = _tokens_file(tmp_path, ids)
    with pytest.raises(CalibrationInputError, match="calib_tokens.json: " + shown):
        load_calibration(src, CalibrationRequest(token_file=f))


def test_numpy_ids_are_integers_too():
    calib_data.check_token_ids(np.asarray([[1, 2], [3, 4]], np.int64), 5, where="opts")
    calib_data.check_token_ids([np.asarray([1, 2], np.int32)], 5, where="opts")
    with pytest.raises(CalibrationInputError, match=r"opts\[0\]\[0\] = 1.0"):
        calib_data.check_token_ids(np.asarray([[1.0]]), 5, where="opts")
    with pytest.raises(CalibrationInputError, match=r"opts\[0\]\[1\] = 5"):
        calib_data.check_token_ids(np.asarray([[1, 5]]), 5, where="opts")
    calib_data.check_sizes(np.int64(2), np.int32(3), 1)


def test_vocab_comes_from_text_config_too(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "kimi_k25", "text_config": {"vocab_size": 10}}))
    assert calib_data.source_vocab_size(src) == 10
    with pytest.raises(CalibrationInputError, match=r"input_ids\[0\]\[0\] = 10 .*\[0, 10\)"):
        load_calibration(src, CalibrationRequest(token_file=_tokens_file(tmp_path, [[10]])))
    assert load_calibration(src, CalibrationRequest(token_file=_tokens_file(tmp_path, [[9, 0]]))) == [[9, 0]]


def test_token_file_structure_errors(tiktoken_src, tmp_path):
    src, _, _ = tiktoken_src
    f = tmp_path / "calib_tokens.json"
    f.write_text('{"input_ids": [[1, 2]')
    with pytest.raises(CalibrationInputError, match=r"calib_tokens.json:1: not valid JSON"):
        load_calibration(src, CalibrationRequest(token_file=f))
    f.write_text('{"ids": [[1]]}')
    with pytest.raises(CalibrationInputError, match=r"calib_tokens.json: expected a JSON object whose 'input_ids'"):
        load_calibration(src, CalibrationRequest(token_file=f))


@pytest.mark.parametrize("content, shown", [
    (b"", r"calib.txt: the file is empty"),
    (b"  \n\n", r"calib.txt: the file is empty"),
    (b"good line\n\xff\xfe\x00binary", r"calib.txt:2: not UTF-8 text"),
    (b"text\nmore\x00\x01\x02", r"calib.txt:2: NUL byte"),
])
def test_empty_and_binary_text_files(tiktoken_src, tmp_path, content, shown):
    src, _, _ = tiktoken_src
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    with pytest.raises(CalibrationInputError, match=shown):
        load_calibration(src, CalibrationRequest(text_file=f))


@pytest.mark.parametrize("lines, shown", [
    (['{"text": "ok"}', '{"txt": "no text field"}'], r"calib.jsonl:2: a record needs a 'text' string or a 'messages' list"),
    (['{"text": 5}'], r"calib.jsonl:1: a record needs"),
    (['{"text": ""}'], r"calib.jsonl:1: empty 'text'"),
    (['{"text": "ok"}', '', '{"text": "ok"'], r"calib.jsonl:3: not valid JSON"),
    (['["text"]'], r"calib.jsonl:1: a .jsonl record must be a JSON object"),
    (['{"messages": []}'], r"calib.jsonl:1: 'messages' must be a non-empty list"),
    (['{"messages": [{"role": "user"}]}'], r"calib.jsonl:1: messages\[0\] needs a 'role'"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"calib.jsonl:1: chat 'messages' need the source's chat template"),
])
def test_bad_jsonl_records(tiktoken_src, tmp_path, lines, shown):
    src, _, _ = tiktoken_src  # no chat template in this source
    f = tmp_path / "calib.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(CalibrationInputError, match=shown):
        load_calibration(src, CalibrationRequest(text_file=f))


def test_chat_template_errors_name_the_template_and_line(tmp_path):
    src = tmp_path / "src"
    _write_tiktoken_source(src, _test_vocab(), template="{% for m in messages %}\n{{ m.content }\n")
    f = tmp_path / "calib.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(CalibrationInputError, match=r"chat_template.jinja:2: chat template syntax error"):
        load_calibration(src, CalibrationRequest(text_file=f))
    (src / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(CalibrationInputError, match=r"calib.jsonl:1: the chat template .*roles must alternate"):
        load_calibration(src, CalibrationRequest(text_file=f))


def test_tokenizer_ids_outside_the_model_vocab(tmp_path):
    src = tmp_path / "src"
    _write_tiktoken_source(src, _test_vocab(), vocab=200)  # config smaller than the tokenizer
    f = tmp_path / "calib.txt"
    f.write_text("the end")
    with pytest.raises(CalibrationInputError, match=r"calib.txt: the source's tokenizer gives id \d+, outside .*\[0, 200\)"):
        load_calibration(src, CalibrationRequest(text_file=f))


def _corrupt(src: Path, name: str, content: bytes):
    (src / name).write_bytes(content)


@pytest.mark.parametrize("name, content, shown", [
    ("tiktoken.model", b"YQ== 0\nYg== 1\nnot-base64!! 2\n", r"tiktoken.model:3: expected 'base64-token rank'"),
    ("tiktoken.model", b"YQ== 0\nYg== x\n", r"tiktoken.model:2: expected"),
    ("tiktoken.model", b"YQ== 0\nYQ== 1\n", r"tiktoken.model:2: token or rank"),
    ("tiktoken.model", b"YQ== 0\nYg== 1\n", r"tiktoken.model: no rank for byte 0x00"),
    ("tiktoken.model", b"", r"tiktoken.model: the file is empty"),
    ("tiktoken.model", b"\x80\x81\x82", r"tiktoken.model:1: not UTF-8"),
    ("tokenizer_config.json", b'{"added_tokens_decoder": {', r"tokenizer_config.json:1: not valid JSON"),
    ("tokenizer_config.json", b'{"tokenizer_class": "TikTokenTokenizer", "added_tokens_decoder": {"x": {}}}',
     r"tokenizer_config.json: added_tokens_decoder entry 'x'"),
    ("tokenizer_config.json", b'{"tokenizer_class": "TikTokenTokenizer", "added_tokens_decoder": {"3": {"content": "[X]"}}}',
     r"tokenizer_config.json: added token '\[X\]' \(id 3\) collides"),
    ("tokenizer_config.json", b'{"tokenizer_class": "Other"}', r"tokenizer_config.json: tiktoken.model with tokenizer_class 'Other'"),
])
def test_corrupt_tiktoken_files(tiktoken_src, tmp_path, name, content, shown):
    src, _, _ = tiktoken_src
    _corrupt(src, name, content)
    f = tmp_path / "calib.txt"
    f.write_text("some text")
    with pytest.raises(CalibrationInputError, match=shown):
        load_calibration(src, CalibrationRequest(text_file=f))


@pytest.mark.parametrize("content, shown", [
    (b'{"version": "1.0", "model": ', r"tokenizer.json: not a valid tokenizers file"),
    (b'{"model": {"type": "Nope"}}', r"tokenizer.json: not a valid tokenizers file"),
    (b"", r"tokenizer.json: the file is empty"),
])
def test_corrupt_tokenizer_json(tmp_path, content, shown):
    src = tmp_path / "src"
    src.mkdir()
    _corrupt(src, "tokenizer.json", content)
    f = tmp_path / "calib.txt"
    f.write_text("some text")
    with pytest.raises(CalibrationInputError, match=shown):
        load_calibration(src, CalibrationRequest(text_file=f))


def test_no_tokenizer_names_the_directory(tmp_path):
    src = tmp_path / "bare-src"
    src.mkdir()
    f = tmp_path / "calib.txt"
    f.write_text("some text")
    with pytest.raises(CalibrationInputError, match=r"bare-src: no tokenizer .*tokenizer.json.*tiktoken.model"):
        load_calibration(src, CalibrationRequest(text_file=f))
    (src / "tiktoken.model").write_text("YQ== 0\n")
    with pytest.raises(CalibrationInputError, match=r"bare-src: tiktoken.model needs tokenizer_config.json"):
        load_calibration(src, CalibrationRequest(text_file=f))


def test_missing_calibration_file(tiktoken_src, tmp_path):
    src, _, _ = tiktoken_src
    with pytest.raises(CalibrationInputError, match=r"nope.txt: cannot read"):
        load_calibration(src, CalibrationRequest(text_file=tmp_path / "nope.txt"))
    (tmp_path / "ids.json").write_text('{"input_ids": [[1]]}')
    with pytest.raises(CalibrationInputError, match=r"ids.json: --calib takes text"):
        load_calibration(src, CalibrationRequest(text_file=tmp_path / "ids.json"))


@pytest.mark.parametrize("sizes, shown", [
    ({"num_samples": 0}, r"num_samples \(--num-samples\) must be a positive integer, got 0"),
    ({"seq_len": -4}, r"seq_len \(--seq-len\) must be a positive integer, got -4"),
    ({"batch_size": 0}, r"batch_size \(--batch-size\) must be a positive integer, got 0"),
    ({"batch_size": 2.0}, r"batch_size .* got 2.0"),
    ({"seq_len": True}, r"seq_len .* got True"),
])
def test_non_positive_sizes(sizes, shown):
    with pytest.raises(CalibrationInputError, match=shown):
        calib_data.check_sizes(**sizes)


def test_sizes_that_are_given_and_positive_pass():
    calib_data.check_sizes(1, 2, 3)
    calib_data.check_sizes()


def test_conflicting_sources_are_an_error():
    with pytest.raises(CalibrationInputError, match="--calib and --calib-tokens were given together"):
        calib_data.check_one_source(calib="a.txt", calib_tokens="b.json")
    with pytest.raises(CalibrationInputError, match="--calib-tokens and --input-scale-constant"):
        calib_data.check_one_source(calib_tokens=[[1]], input_scale_constant=1.0)
    with pytest.raises(CalibrationInputError, match="--calib and --calib-tokens and --input-scale-constant"):
        calib_data.check_one_source(calib="a", calib_tokens="b", input_scale_constant=1.0)
    calib_data.check_one_source(input_scale_constant=1.0)


@pytest.mark.parametrize("extra, shown", [
    (["--calib-tokens", "{tokens}", "--input-scale-constant", "1.0"], "--calib-tokens and --input-scale-constant"),
    (["--calib", "{text}", "--calib-tokens", "{tokens}"], "--calib and --calib-tokens were given together"),
    (["--calib", "{text}", "--batch-size", "0"], "batch_size (--batch-size) must be a positive integer, got 0"),
    (["--calib", "{text}", "--num-samples", "-1"], "num_samples (--num-samples) must be a positive integer, got -1"),
    (["--calib", "{text}", "--seq-len", "0"], "seq_len (--seq-len) must be a positive integer, got 0"),
    (["--calib-tokens", "{bad_tokens}"], "calib_bad.json: input_ids[0][1] = 'x'"),
])
def test_cli_refuses_bad_calibration_input_with_one_line(tiktoken_src, tmp_path, capsys, extra, shown):
    from nvfp4_jax.cli import main

    src, _, _ = tiktoken_src
    files = {"text": tmp_path / "calib.txt", "tokens": tmp_path / "calib_ok.json", "bad_tokens": tmp_path / "calib_bad.json"}
    files["text"].write_text("some text")
    files["tokens"].write_text('{"input_ids": [[1, 2]]}')
    files["bad_tokens"].write_text('{"input_ids": [[1, "x"]]}')
    args = [a.format(**files) for a in extra]
    assert main(["convert", str(src), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert shown in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
