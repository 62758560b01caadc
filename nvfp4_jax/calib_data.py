"""Calibration input for ``convert``: token ids from text (``--calib``) or from a token file
(``--calib-tokens``), checked strictly.

The tokenizer is the source checkpoint's own, chosen from the files present:

* ``tokenizer.json``: the ``tokenizers`` library (Llama, Qwen, DeepSeek, ...);
* ``tiktoken.model`` + ``tokenizer_config.json``: Moonshot's Kimi tokenizer, rebuilt offline with
  ``tiktoken`` from the ranks file, the special tokens of ``added_tokens_decoder`` and the
  pre-tokenizer pattern of ``tokenization_kimi.py`` (no remote code is run).

Text files: ``.txt`` (any suffix but ``.jsonl``/``.json``) is tokenized whole and cut into windows of
``seq_len`` tokens; ``.jsonl`` holds one record per line, ``{"text": ...}`` or a chat
``{"messages": [...]}`` rendered with the source's chat template (``chat_template.jinja`` or
``tokenizer_config.json``), whose special-token strings become single special ids. Each record is
one sample, truncated to ``seq_len``.

Every problem is a :class:`CalibrationInputError` whose one-line message names the file and the line
or sample.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import numbers
from pathlib import Path
from typing import Optional

import numpy as np

from nvfp4_jax.errors import NVFP4Error

DEFAULT_TEXT_SEQ_LEN = 512  # window length for --calib text when --seq-len is not given

# The pre-tokenizer of Moonshot's tokenization_kimi.py, in tiktoken's regex syntax (``&&`` is class
# intersection, which Python's ``re`` cannot compile and tiktoken's engine can).
KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

TOKENIZER_JSON = "tokenizer.json"
TIKTOKEN_MODEL = "tiktoken.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"


class CalibrationInputError(NVFP4Error, ValueError):
    """Calibration input that cannot be used; the message names the file and line or sample."""


@dataclasses.dataclass(frozen=True)
class CalibrationRequest:
    """What the user asked for (the ``convert`` options that choose and shape calibration)."""
    text_file: Optional[str | Path] = None  # --calib
    token_file: Optional[str | Path] = None  # --calib-tokens
    input_scale_constant: Optional[float] = None  # --input-scale-constant (calibration-free)
    num_samples: Optional[int] = None
    seq_len: Optional[int] = None
    batch_size: Optional[int] = None


def load_calibration(src, request: CalibrationRequest) -> Optional[list[list[int]]]:
    """Token-id samples for ``request`` on the source checkpoint ``src`` (None: calibration-free or
    nothing asked for). Checks the options, every file read and every id against the source's
    vocabulary."""
    src = Path(src)
    check_one_source(calib=request.text_file, calib_tokens=request.token_file,
                     input_scale_constant=request.input_scale_constant)
    check_sizes(request.num_samples, request.seq_len, request.batch_size)
    if request.token_file is not None:
        path = Path(request.token_file)
        samples = read_token_file(path)
        check_token_ids(samples, source_vocab_size(src), where=f"{path}: input_ids")
        return samples
    if request.text_file is not None:
        return tokenize_file(Path(request.text_file), src, request.seq_len)
    return None


# ---------------------------------------------------------------------------------------------
# option checks (also for pipeline.ConvertOptions users)


def check_one_source(*, calib=None, calib_tokens=None, input_scale_constant=None) -> None:
    """At most one of calibration text, calibration tokens and a constant input scale."""
    given = [flag for flag, value in (("--calib", calib), ("--calib-tokens", calib_tokens),
                                      ("--input-scale-constant", input_scale_constant)) if value is not None]
    if len(given) > 1:
        raise CalibrationInputError(f"{' and '.join(given)} were given together; choose one calibration "
                                    "source (text, token ids, or a constant input scale)")


def check_sizes(num_samples=None, seq_len=None, batch_size=None) -> None:
    """Each size that is given (not None) must be a positive integer."""
    for name, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise CalibrationInputError(f"{name} ({flag}) must be a positive integer, got {value!r}")


def check_token_ids(samples, vocab_size: Optional[int], where: str) -> None:
    """``samples``: a non-empty list of non-empty lists of integer ids in [0, vocab_size)
    (any non-negative integer when ``vocab_size`` is None). ``where`` starts the message."""
    if not isinstance(samples, _SEQUENCES) or not len(samples):
        raise CalibrationInputError(f"{where}: expected a non-empty list of token-id lists")
    bound = f"[0, {vocab_size})" if vocab_size else "[0, vocab_size)"
    for i, sample in enumerate(samples):
        if not isinstance(sample, _SEQUENCES):
            raise CalibrationInputError(f"{where}[{i}]: expected a list of token ids, got {type(sample).__name__}")
        if not len(sample):
            raise CalibrationInputError(f"{where}[{i}]: empty sample")
        for j, tid in enumerate(sample):
            if not _is_int(tid) or tid < 0 or (vocab_size and tid >= vocab_size):
                shown = tid.item() if isinstance(tid, np.generic) else tid
                raise CalibrationInputError(
                    f"{where}[{i}][{j}] = {shown!r} is not a token id (an integer in {bound})")


_SEQUENCES = (list, tuple, np.ndarray)


def _is_int(value) -> bool:
    """An integer (Python or numpy), not a bool and not an integral float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def source_vocab_size(src) -> Optional[int]:
    """``vocab_size`` of the source's config.json (top level, else ``text_config``); None when the
    config does not say (the checkpoint reader reports a missing or broken config itself)."""
    path = Path(src) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and isinstance(cfg.get("vocab_size"), int) and cfg["vocab_size"] > 0:
            return cfg["vocab_size"]
    return None


# ---------------------------------------------------------------------------------------------
# files


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; an empty, binary or undecodable file is an error."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CalibrationInputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data.strip():
        raise CalibrationInputError(f"{path}: the file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CalibrationInputError(f"{path}:{line}: not UTF-8 text (byte {e.start}); a binary file?") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise CalibrationInputError(f"{path}:{line}: NUL byte in text; a binary file?")
    return text


def read_json(path: Path) -> object:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise CalibrationInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_token_file(path: Path) -> list[list[int]]:
    """``{"input_ids": [[...], ...]}``, one sample per list (ids checked by :func:`check_token_ids`)."""
    doc = read_json(path)
    samples = doc.get("input_ids") if isinstance(doc, dict) else None
    if not isinstance(samples, list):
        raise CalibrationInputError(f"{path}: expected a JSON object whose 'input_ids' is a list of token-id lists")
    return samples


def tokenize_file(path: Path, src: Path, seq_len: Optional[int]) -> list[list[int]]:
    """Samples of the text file ``path`` tokenized with the tokenizer of ``src``."""
    if path.suffix == ".json":
        raise CalibrationInputError(f"{path}: --calib takes text (.txt) or records (.jsonl); token ids go "
                                    "in --calib-tokens")
    tokenizer = load_tokenizer(src)
    seq_len = seq_len or DEFAULT_TEXT_SEQ_LEN
    vocab = source_vocab_size(src)
    if path.suffix == ".jsonl":
        samples = []
        for line_no, record in _jsonl_records(path):
            ids = tokenizer.encode_record(record, f"{path}:{line_no}")
            _check_in_vocab(ids, vocab, where=f"{path}:{line_no}")
            samples.append(ids[:seq_len])
        if not samples:
            raise CalibrationInputError(f"{path}: no records")
        return samples
    ids = tokenizer.encode(read_text(path))
    _check_in_vocab(ids, vocab, where=str(path))
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]


def _check_in_vocab(ids: list[int], vocab: Optional[int], where: str) -> None:
    """Ids the tokenizer produced must fit the model (a tokenizer/config mismatch otherwise)."""
    if not ids:
        raise CalibrationInputError(f"{where}: the text gives no tokens")
    if vocab and max(ids) >= vocab:
        raise CalibrationInputError(f"{where}: the source's tokenizer gives id {max(ids)}, outside the model's "
                                    f"vocabulary [0, {vocab}) (config.json vocab_size)")


def _jsonl_records(path: Path):
    for line_no, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationInputError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise CalibrationInputError(f"{path}:{line_no}: a .jsonl record must be a JSON object")
        yield line_no, record


# ---------------------------------------------------------------------------------------------
# tokenizers


class SourceTokenizer:
    """The source checkpoint's tokenizer, as calibration uses it."""

    def __init__(self, src: Path, encode_text, encode_special, config: dict):
        self.src = src
        self._encode_text = encode_text  # plain text, with the tokenizer's own added tokens (BOS, ...)
        self._encode_special = encode_special  # rendered chat: special strings as ids, nothing added
        self._config = config
        self._template = None

    def encode(self, text: str) -> list[int]:
        return list(self._encode_text(text))

    def encode_record(self, record: dict, where: str) -> list[int]:
        """Ids of one .jsonl record: ``text`` as plain text, ``messages`` rendered as chat."""
        if "messages" in record:
            return list(self._encode_special(self.render_chat(record["messages"], where)))
        text = record.get("text")
        if not isinstance(text, str):
            raise CalibrationInputError(f"{where}: a record needs a 'text' string or a 'messages' list")
        if not text:
            raise CalibrationInputError(f"{where}: empty 'text'")
        return self.encode(text)

    def render_chat(self, messages, where: str) -> str:
        """``messages`` rendered with the source's chat template (no generation prompt)."""
        _check_messages(messages, where)
        if self._template is None:
            self._template = _compile_chat_template(self.src, self._config)
        if not self._template:
            raise CalibrationInputError(f"{where}: chat 'messages' need the source's chat template; none in "
                                        f"{self.src} ({CHAT_TEMPLATE} or '{TOKENIZER_CONFIG}' chat_template)")
        template, template_file = self._template
        import jinja2

        try:
            text = template.render(messages=messages, add_generation_prompt=False,
                                   bos_token=_token_text(self._config.get("bos_token")),
                                   eos_token=_token_text(self._config.get("eos_token")))
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            raise CalibrationInputError(f"{where}: the chat template {template_file} failed: {e}") from None
        if not text:
            raise CalibrationInputError(f"{where}: the chat template {template_file} rendered nothing")
        return text


def load_tokenizer(src) -> SourceTokenizer:
    """The tokenizer of checkpoint directory ``src``: ``tokenizer.json`` if present, else
    ``tiktoken.model`` with ``tokenizer_config.json``."""
    src = Path(src)
    if (src / TOKENIZER_JSON).is_file():
        return _load_tokenizers_json(src)
    if (src / TIKTOKEN_MODEL).is_file():
        return _load_tiktoken(src)
    raise CalibrationInputError(f"{src}: no tokenizer to tokenize calibration text (neither {TOKENIZER_JSON} nor "
                                f"{TIKTOKEN_MODEL}); pass --calib-tokens instead")


def _load_tokenizers_json(src: Path) -> SourceTokenizer:
    from tokenizers import Tokenizer

    path = src / TOKENIZER_JSON
    read_text(path)  # empty / binary files get the plain message
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception
        raise CalibrationInputError(f"{path}: not a valid tokenizers file ({str(e).splitlines()[0]})") from None
    config = _tokenizer_config(src, required=False)
    return SourceTokenizer(src, lambda t: tok.encode(t).ids,
                           lambda t: tok.encode(t, add_special_tokens=False).ids, config)


def _load_tiktoken(src: Path) -> SourceTokenizer:
    import tiktoken

    config = _tokenizer_config(src, required=True)
    cfg_path = src / TOKENIZER_CONFIG
    auto_map = json.dumps(config.get("auto_map", {}))
    if config.get("tokenizer_class") != "TikTokenTokenizer" and "tokenization_kimi" not in auto_map:
        raise CalibrationInputError(
            f"{cfg_path}: {TIKTOKEN_MODEL} with tokenizer_class {config.get('tokenizer_class')!r}: only Kimi's "
            "TikTokenTokenizer (tokenization_kimi.py) pre-tokenizer is known; pass --calib-tokens instead")
    ranks = read_tiktoken_ranks(src / TIKTOKEN_MODEL)
    specials = _added_tokens(cfg_path, config, ranks)
    enc = tiktoken.Encoding(name=f"kimi:{src.name}", pat_str=KIMI_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials)
    encode = lambda t: enc.encode(t, allowed_special="all")  # noqa: E731  (special strings -> their ids)
    return SourceTokenizer(src, encode, encode, config)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """``base64(token bytes) rank`` per line, as ``tiktoken.load.load_tiktoken_bpe`` reads it,
    checked: every single byte has a rank, no token or rank twice."""
    ranks: dict[bytes, int] = {}
    seen_rank: dict[int, int] = {}
    for line_no, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error):
            raise CalibrationInputError(f"{path}:{line_no}: expected 'base64-token rank', got {line[:60]!r}") from None
        if not token or rank < 0:
            raise CalibrationInputError(f"{path}:{line_no}: empty token or negative rank")
        if token in ranks or rank in seen_rank:
            raise CalibrationInputError(f"{path}:{line_no}: token or rank {rank} appears twice")
        ranks[token] = rank
        seen_rank[rank] = line_no
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CalibrationInputError(f"{path}: no rank for byte 0x{missing[0]:02x} ({len(missing)} of the 256 "
                                    "single bytes missing); not a byte-level BPE vocabulary")
    return ranks


def _added_tokens(cfg_path: Path, config: dict, ranks: dict[bytes, int]) -> dict[str, int]:
    """Special tokens (``added_tokens_decoder``: id -> {content, ...}) as tiktoken wants them."""
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise CalibrationInputError(f"{cfg_path}: added_tokens_decoder must be an object of id -> token")
    taken = set(ranks.values())
    specials: dict[str, int] = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not key.isdigit() or not isinstance(content, str) or not content:
            raise CalibrationInputError(f"{cfg_path}: added_tokens_decoder entry {key!r} needs an integer id "
                                        "and a 'content' string")
        tid = int(key)
        if tid in taken or content in specials:
            raise CalibrationInputError(f"{cfg_path}: added token {content!r} (id {tid}) collides with another "
                                        "token or id")
        specials[content] = tid
        taken.add(tid)
    return specials


def _tokenizer_config(src: Path, required: bool) -> dict:
    path = src / TOKENIZER_CONFIG
    if not path.is_file():
        if required:
            raise CalibrationInputError(f"{src}: {TIKTOKEN_MODEL} needs {TOKENIZER_CONFIG} (its special tokens), "
                                        "not found")
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise CalibrationInputError(f"{path}: expected a JSON object")
    return config


def _token_text(token) -> str:
    """A tokenizer_config token entry: a string or a serialized AddedToken ``{"content": ...}``."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


# ---------------------------------------------------------------------------------------------
# chat


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise CalibrationInputError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, (str, list)):
            raise CalibrationInputError(f"{where}: messages[{i}] needs a 'role' string and a 'content' "
                                        "string or list")


def _compile_chat_template(src: Path, config: dict):
    """(jinja template, file it came from): ``chat_template.jinja``, else tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates of which ``default`` is used); an
    empty tuple when the source has none."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    jinja_file = src / CHAT_TEMPLATE
    if jinja_file.is_file():
        source, origin = read_text(jinja_file), jinja_file
    else:
        source, origin = config.get("chat_template"), src / TOKENIZER_CONFIG
        if isinstance(source, list):
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(source, str) or not source:
            return ()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, indent=None):  # as transformers renders it: no HTML escaping, non-ASCII kept
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source), origin
    except jinja2.TemplateSyntaxError as e:
        raise CalibrationInputError(f"{origin}:{e.lineno}: chat template syntax error ({e.message})") from None

