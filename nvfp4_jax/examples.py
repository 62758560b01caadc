"""Built-in example checkpoints, made on the fly from a seed, and built-in calibration text.

* ``llama-tiny``: a 2-layer Llama in bf16.
* ``kimi-k2-tiny``: Kimi-K2-shaped (DeepSeek-V3 architecture, ``model_type`` kimi_k2): 1 dense + 2
  MoE layers, 16 routed experts (top-2), a shared expert, MLA with q_lora/kv_lora, yarn RoPE, a
  sigmoid router with ``e_score_correction_bias``; routed experts stored as compressed-tensors
  ``pack-quantized`` INT4 (group 32, symmetric) as in Kimi-K2-Thinking; everything else bf16.
* ``kimi-k2.5-tiny``: Kimi-K2.5/K2.6/K2.7 as Moonshot ships them (``KimiK25ForConditionalGeneration``):
  the ``kimi-k2-tiny`` text model under ``language_model.`` with its config (and its INT4
  ``quantization_config``) inside ``text_config``, a small MoonViT-like ``vision_tower`` and an
  ``mm_projector`` (bf16 with biases); the text tensors equal ``kimi-k2-tiny``'s of the same seed.
* ``kimi-k2-shaped``: Kimi-K2's real tensor sizes (hidden 7168, expert intermediate 2048, dense
  intermediate 18432, MLA ranks 1536/512), layer 0 dense and the rest MoE, up to the real 384
  experts, for benchmarks: random INT4 codes, scales and bf16 bit patterns streamed to the shards
  (fast, memory bounded), instead of float draws quantized as the tiny examples do.

``llama-tiny`` carries a byte-level ``tokenizer.json`` (256 byte tokens + specials). The Kimi examples
carry Moonshot's file set instead (no ``tokenizer.json``): ``tiktoken.model`` (a small seeded BPE
vocabulary), ``tokenizer_config.json`` with the special tokens after the mergeable ranks,
``chat_template.jinja``, the remote-code file names (placeholders), shards named
``model-00001-of-000002.safetensors`` and Moonshot's ``quantization_config``.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from nvfp4_jax.calib_data import check_sizes, load_tokenizer
from nvfp4_jax.checkpoint.safetensors_io import encode_header, save_file, st_dtype

BF16 = ml_dtypes.bfloat16
INT4_GROUP = 32

CALIBRATION_TEXT = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
In 1905 Albert Einstein published four papers that changed physics: on the photoelectric effect,
Brownian motion, special relativity and the equivalence of mass and energy.
def quantize(w, amax):
    scale = amax / (6.0 * 448.0)
    return [round(x / scale) for x in w]
SELECT name, COUNT(*) AS n FROM orders WHERE total > 100 GROUP BY name ORDER BY n DESC;
La vie est belle. Das Wetter ist heute schön. El rápido zorro marrón salta sobre el perro perezoso.
量子化は、モデルの重みを少ないビット数で表現する手法です。 模型量化可以减少显存占用并提高推理速度。
Mixture-of-experts models route each token to a few experts; a router scores the experts with a
sigmoid, adds a correction bias, and picks the top-k within the best groups.
{"id": 42, "tags": ["fp4", "e2m1", "e4m3"], "ok": true, "ratio": 0.3125}
Rain fell softly on the tin roof while the kettle began to whistle in the kitchen.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } return sum / (double)n;
Photosynthesis converts light energy into chemical energy stored in glucose molecules.
The treaty was signed on 14 March 1883 in a small town near the river delta.
Prime numbers: 2 3 5 7 11 13 17 19 23 29 31 37 41 43 47 53 59 61 67 71 73 79 83 89 97.
"""


def calibration_samples(source, num_samples: int = 16, seq_len: int = 64) -> list[list[int]]:
    """``num_samples`` windows of ``seq_len`` ids of the built-in calibration text, tokenized with the
    tokenizer of checkpoint directory ``source`` (a file inside it, such as ``src / "tokenizer.json"``,
    names its directory)."""
    check_sizes(num_samples, seq_len)
    src = Path(source)
    ids = load_tokenizer(src if src.is_dir() else src.parent).encode(CALIBRATION_TEXT)
    out = []
    start = 0
    while len(out) < num_samples:
        if start + seq_len > len(ids):
            start = (start + 7) % max(len(ids) - seq_len, 1)  # wrap with a shift: new windows
        out.append(ids[start:start + seq_len])
        start += seq_len
    return out


# (num_samples, seq_len) of ``example NAME`` when not given. The Kimi example calibrates on so few
# tokens that some routed experts see none: its report shows them, with their shared, valid scales.
EXAMPLE_CALIBRATION = {"llama-tiny": (16, 64), "kimi-k2-tiny": (1, 8), "kimi-k2.5-tiny": (1, 8),
                       "kimi-k2-shaped": (16, 64)}


def example_calibration(name: str, source, num_samples=None, seq_len=None) -> list[list[int]]:
    """The built-in calibration samples of example ``name`` (its defaults for sizes not given)."""
    default_samples, default_len = EXAMPLE_CALIBRATION[name]
    return calibration_samples(source, default_samples if num_samples is None else num_samples,
                               default_len if seq_len is None else seq_len)


def byte_level_tokenizer(path: Path, specials=("<|bos|>", "<|eos|>", "<|pad|>")) -> None:
    """Write a byte-level BPE ``tokenizer.json`` (ids 0..255 = bytes, then specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(alphabet)}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": specials[0], "eos_token": specials[1], "pad_token": specials[2],
         "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))


def _byte_of(c: str) -> int:
    # GPT-2 byte-to-unicode map: printable bytes map to themselves, the rest to 256 + n
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if ord(c) in printable:
        return ord(c)
    rest = [b for b in range(256) if b not in printable]
    return rest[ord(c) - 256]


# --------------------------------------------------------------------------- Kimi's tokenizer files

# Moonshot reserves 256 special ids right after the mergeable ranks (163584..163839); the examples
# reserve fewer, keeping the named tokens at Kimi's offsets (id = first special id + offset).
KIMI_NUM_SPECIAL = 32
KIMI_SPECIALS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
                 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
                 11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
                 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
                 KIMI_NUM_SPECIAL - 2: "[UNK]", KIMI_NUM_SPECIAL - 1: "[PAD]"}

# In the style of Kimi-K2's chat_template.jinja: role header, <|im_middle|>, content, <|im_end|>.
KIMI_CHAT_TEMPLATE = """\
{%- macro render_content(msg) -%}
  {%- if msg['content'] is string -%}
    {{ msg['content'] }}
  {%- elif msg['content'] is not none -%}
    {%- for part in msg['content'] -%}
      {%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}
  <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- set role_name = message.get('name') or message['role'] -%}
  {%- if message['role'] == 'user' -%}
    <|im_user|>{{ role_name }}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>{{ role_name }}<|im_middle|>
  {%- else -%}
    <|im_system|>{{ role_name }}<|im_middle|>
  {%- endif -%}
  {%- if message['role'] == 'assistant' and message.get('reasoning_content') -%}
    <think>{{ message['reasoning_content'] }}</think>
  {%- endif -%}
  {{ render_content(message) }}<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""

# Moonshot's repos ship these as remote code; the examples only mirror the names.
KIMI_REMOTE_CODE = {
    "configuration_deepseek.py": "the DeepseekV3Config class",
    "modeling_deepseek.py": "the DeepseekV3 model",
    "tokenization_kimi.py": "the TikTokenTokenizer class (its pre-tokenizer pattern is in nvfp4_jax.calib_data)",
}


def bpe_ranks(text: str, num_ranks: int, seed: int = 0) -> dict[bytes, int]:
    """A byte-level BPE vocabulary of ``num_ranks`` tokens: the 256 single bytes (rank = byte
    value), then merges learned from ``text`` (most frequent adjacent pair first, ties broken by
    the pair's bytes), then, when the text runs out of repeated pairs, merges of seeded random
    pairs of tokens already in the vocabulary."""
    ranks = {bytes([b]): b for b in range(256)}
    # a rough word split for training only (encoding uses the tokenizer's own pattern)
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in re.findall(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+", text))
    while len(ranks) < num_ranks:
        pairs = Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += n
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]), default=None)
        if best is None or best[1] < 2:
            break
        merged = best[0][0] + best[0][1]
        ranks[merged] = len(ranks)
        words = Counter({_merge_pair(w, best[0], merged): n for w, n in words.items()})
    rng = np.random.default_rng(seed)
    tokens = list(ranks)
    while len(ranks) < num_ranks:
        a, b = rng.integers(0, len(tokens), 2)
        merged = tokens[a] + tokens[b]
        if merged not in ranks and len(merged) <= 16:
            ranks[merged] = len(ranks)
            tokens.append(merged)
    return ranks


def _merge_pair(word: tuple, pair: tuple, merged: bytes) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def kimi_special_tokens(first_id: int) -> dict[int, str]:
    """id -> text of the reserved special tokens starting at ``first_id`` (unnamed ones are
    ``<|reserved_token_ID|>`` as in tokenization_kimi.py)."""
    return {first_id + k: KIMI_SPECIALS.get(k, f"<|reserved_token_{first_id + k}|>") for k in range(KIMI_NUM_SPECIAL)}


def kimi_tokenizer_files(path: Path, vocab_size: int, seed: int = 0) -> None:
    """Write Moonshot's tokenizer file set for a ``vocab_size`` model: ``tiktoken.model``,
    ``tokenizer_config.json`` (specials in ``added_tokens_decoder`` after the ranks),
    ``chat_template.jinja`` and the remote-code placeholders."""
    num_ranks = vocab_size - KIMI_NUM_SPECIAL
    if num_ranks < 256:
        raise ValueError(f"a Kimi tokenizer needs vocab_size >= {256 + KIMI_NUM_SPECIAL}, got {vocab_size}")
    ranks = bpe_ranks(CALIBRATION_TEXT, num_ranks, seed)
    (path / "tiktoken.model").write_text(
        "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])))
    specials = kimi_special_tokens(num_ranks)
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, t in specials.items()}
    named = [t for t in KIMI_SPECIALS.values() if t not in ("[BOS]", "[EOS]", "[UNK]", "[PAD]")]
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder, "additional_special_tokens": named,
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]", "clean_up_tokenization_spaces": False, "eos_token": "[EOS]",
        "extra_special_tokens": {}, "model_max_length": 1048576, "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer", "unk_token": "[UNK]"}, indent=2))
    (path / "chat_template.jinja").write_text(KIMI_CHAT_TEMPLATE)
    remote_code_placeholders(path, KIMI_REMOTE_CODE)


def remote_code_placeholders(path: Path, files: dict[str, str]) -> None:
    """A placeholder per remote-code file name of ``files`` (name -> what Moonshot's file holds)."""
    for name, what in files.items():
        (path / name).write_text(f"# Placeholder: Moonshot's repository ships {what} under this name.\n"
                                 "# nvfp4-jax never runs remote code; this built-in example only mirrors the file set.\n")


def _normal(rng, shape, std) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(BF16)


def int4_pack(w: np.ndarray, group: int = INT4_GROUP) -> dict[str, np.ndarray]:
    """Symmetric group-wise INT4 in compressed-tensors ``pack-quantized`` layout.

    Returns ``weight_packed`` int32 [N, K/8] (element i of 8 in bits 4i..4i+3, stored as q + 8),
    ``weight_scale`` bf16 [N, K/group], ``weight_shape`` int64 [2]. Decoded value: ``q * scale``.
    """
    n, k = w.shape
    wf = w.astype(np.float32).reshape(n, k // group, group)
    scale = (np.abs(wf).max(-1) / 7.0).astype(BF16)
    scale = np.where(scale.astype(np.float32) == 0, BF16(1.0), scale).astype(BF16)
    q = np.clip(np.rint(wf / scale.astype(np.float32)[..., None]), -8, 7).astype(np.int64).reshape(n, k)
    nib = (q + 8).astype(np.uint32).reshape(n, k // 8, 8)
    packed = np.zeros((n, k // 8), np.uint32)
    for i in range(8):
        packed |= nib[..., i] << np.uint32(4 * i)
    return {"weight_packed": packed.view(np.int32), "weight_scale": scale,
            "weight_shape": np.asarray([n, k], np.int64)}


def _write(path: Path, tensors: dict[str, np.ndarray], config: dict, shard_bytes: float = 2e9,
           total_digits: int = 5) -> None:
    def write_shard(file: Path, names: list[str]) -> None:
        save_file(file, {n: tensors[n] for n in names}, {"format": "pt"})

    _write_shards(path, config, {n: t.nbytes for n, t in tensors.items()}, write_shard, (shard_bytes, total_digits))


def _write_shards(path: Path, config: dict, sizes: dict[str, int], write_shard, layout: tuple[float, int]) -> None:
    """config.json, generation_config.json and the tensors of ``sizes`` (name -> bytes, in file
    order) cut into shards of at most ``layout[0]`` bytes (a larger tensor gets one of its own),
    named with a ``layout[1]``-digit total; ``write_shard(file, names)`` writes each file. One
    shard is ``model.safetensors`` without an index."""
    shard_bytes, total_digits = layout
    shards, cur, size = [], [], 0
    for n, nb in sizes.items():
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nb
    shards.append(cur)
    _write_shard_files(path, config, shards, (sizes, write_shard), total_digits)


def _write_shard_files(path: Path, config: dict, shards: list[list[str]], tensors: tuple, total_digits: int) -> None:
    """config.json, generation_config.json, one file per list of ``shards`` and the index;
    ``tensors`` is (name -> bytes, ``write_shard(file, names)``)."""
    sizes, write_shard = tensors
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}, indent=2))
    if len(shards) == 1:
        write_shard(path / "model.safetensors", shards[0])
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):0{total_digits}d}.safetensors"
        write_shard(path / fname, names)
        weight_map.update({n: fname for n in names})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}, indent=2))


def llama_tiny_config(vocab: int = 259) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": vocab,
        "bos_token_id": 256, "eos_token_id": 257, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "bfloat16",
    }


def build_llama_tiny(path, seed: int = 0) -> Path:
    path = Path(path)
    cfg = llama_tiny_config()
    rng = np.random.default_rng(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    t = {"model.embed_tokens.weight": _normal(rng, (v, h), 1.0), "model.norm.weight": np.ones(h, BF16),
         "lm_head.weight": _normal(rng, (v, h), 0.05)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        t.update({
            p + "input_layernorm.weight": (1 + _normal(rng, (h,), 0.1).astype(np.float32)).astype(BF16),
            p + "post_attention_layernorm.weight": (1 + _normal(rng, (h,), 0.1).astype(np.float32)).astype(BF16),
            p + "self_attn.q_proj.weight": _normal(rng, (h, h), 0.05),
            p + "self_attn.k_proj.weight": _normal(rng, (kv, h), 0.05),
            p + "self_attn.v_proj.weight": _normal(rng, (kv, h), 0.05),
            p + "self_attn.o_proj.weight": _normal(rng, (h, h), 0.05),
            p + "mlp.gate_proj.weight": _normal(rng, (i, h), 0.05),
            p + "mlp.up_proj.weight": _normal(rng, (i, h), 0.05),
            p + "mlp.down_proj.weight": _normal(rng, (h, i), 0.05),
        })
    _write(path, t, cfg)
    byte_level_tokenizer(path)
    return path


#: the sizes of kimi-k2-tiny; kimi_k2_config(**sizes) overrides any of them
KIMI_K2_TINY_SIZES = {"hidden": 128, "intermediate": 256, "moe_intermediate": 64, "layers": 3, "experts": 16,
                      "top_k": 2, "heads": 4, "q_lora": 64, "kv_lora": 32, "nope": 32, "rope": 16, "v_head": 32,
                      "vocab": 512, "first_dense": 1, "n_group": 1, "topk_group": 1}


def _sizes(defaults: dict, given: dict, what: str) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TypeError(f"{what}: unknown size(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def kimi_k2_config(**sizes) -> dict:
    """A Kimi-K2 config.json (real keys, including those vLLM/SGLang need), resized from
    :data:`KIMI_K2_TINY_SIZES`; ``vocab`` counts the tokenizer's ranks and its reserved special ids
    ([BOS] and [EOS] the first two)."""
    (hidden, intermediate, moe_intermediate, layers, experts, top_k, heads, q_lora, kv_lora, nope, rope, v_head,
     vocab, first_dense, n_group, topk_group) = _sizes(KIMI_K2_TINY_SIZES, sizes, "kimi_k2_config").values()
    first_special = vocab - KIMI_NUM_SPECIAL
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "model_type": "kimi_k2", "aux_loss_alpha": 0.001, "bos_token_id": first_special,
        "eos_token_id": first_special + 1,
        "ep_size": 1, "first_k_dense_replace": first_dense, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": intermediate, "kv_lora_rank": kv_lora,
        "max_position_embeddings": 262144, "moe_intermediate_size": moe_intermediate, "moe_layer_freq": 1,
        "n_group": n_group, "n_routed_experts": experts, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": heads, "num_experts_per_tok": top_k, "num_hidden_layers": layers,
        "num_key_value_heads": heads, "num_nextn_predict_layers": 0, "pretraining_tp": 1,
        "q_lora_rank": q_lora, "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "rms_norm_eps": 1e-6,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": topk_group, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": v_head, "vocab_size": vocab,
        "quantization_config": {
            "config_groups": {"group_0": {
                "input_activations": None, "output_activations": None, "targets": ["Linear"],
                "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                            "group_size": INT4_GROUP, "num_bits": 4, "observer": "minmax",
                            "observer_kwargs": {}, "strategy": "group", "symmetric": True, "type": "int"}}},
            "format": "pack-quantized",
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                       "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        },
    }


@dataclass(frozen=True)
class KimiTensor:
    """One tensor of a Kimi-K2 checkpoint before it is drawn: ``name`` (for an INT4 routed expert
    the module, whose ``weight_packed``/``weight_scale``/``weight_shape`` are stored), ``shape``
    (the decoded weight's), ``kind`` (``ones``, ``norm``: 1 + noise of ``std``, ``normal``: zero
    mean and ``std``, ``bias``: the router's float32 correction bias, ``int4``) and ``std``."""

    name: str
    shape: tuple[int, ...]
    kind: str
    std: float = 0.0


def kimi_k2_tensors(cfg: dict, std: float = 0.02) -> list[KimiTensor]:
    """Every tensor of a Kimi-K2 checkpoint for ``cfg``, in file order, as Moonshot ships it:
    routed experts INT4, everything else bf16 (the router's bias float32)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    heads, nope, rope, vh = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    ql, kvl = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    mi, di, ne = cfg["moe_intermediate_size"], cfg["intermediate_size"], cfg["n_routed_experts"]
    si = mi * cfg["n_shared_experts"]
    out = [KimiTensor("model.embed_tokens.weight", (v, h), "normal", 1.0), KimiTensor("model.norm.weight", (h,), "ones"),
           KimiTensor("lm_head.weight", (v, h), "normal", std)]

    def mlp(prefix: str, inner: int, kind: str = "normal") -> list[KimiTensor]:
        shapes = (("gate_proj", (inner, h)), ("up_proj", (inner, h)), ("down_proj", (h, inner)))
        return [KimiTensor(prefix + name + ("" if kind == "int4" else ".weight"), shape, kind, std)
                for name, shape in shapes]

    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [KimiTensor(p + "input_layernorm.weight", (h,), "norm", 0.1),
                KimiTensor(p + "post_attention_layernorm.weight", (h,), "norm", 0.1),
                KimiTensor(p + "self_attn.q_a_proj.weight", (ql, h), "normal", std),
                KimiTensor(p + "self_attn.q_a_layernorm.weight", (ql,), "norm", 0.1),
                KimiTensor(p + "self_attn.q_b_proj.weight", (heads * (nope + rope), ql), "normal", std),
                KimiTensor(p + "self_attn.kv_a_proj_with_mqa.weight", (kvl + rope, h), "normal", std),
                KimiTensor(p + "self_attn.kv_a_layernorm.weight", (kvl,), "norm", 0.1),
                KimiTensor(p + "self_attn.kv_b_proj.weight", (heads * (nope + vh), kvl), "normal", std),
                KimiTensor(p + "self_attn.o_proj.weight", (h, heads * vh), "normal", std)]
        if layer < cfg["first_k_dense_replace"]:
            out += mlp(p + "mlp.", di)
            continue
        out += [KimiTensor(p + "mlp.gate.weight", (ne, h), "normal", std * 4),
                KimiTensor(p + "mlp.gate.e_score_correction_bias", (ne,), "bias", 0.01)]
        out += mlp(p + "mlp.shared_experts.", si)
        for e in range(ne):
            out += mlp(p + f"mlp.experts.{e}.", mi, "int4")
    return out


def _draw(rng, t: KimiTensor) -> np.ndarray:
    """A non-INT4 tensor of :func:`kimi_k2_tensors` drawn from ``rng`` (float normal draws)."""
    if t.kind == "ones":
        return np.ones(t.shape, BF16)
    if t.kind == "norm":
        return (1 + _normal(rng, t.shape, t.std).astype(np.float32)).astype(BF16)
    if t.kind == "bias":
        return (rng.standard_normal(t.shape, dtype=np.float32) * np.float32(t.std)).astype(np.float32)
    return _normal(rng, t.shape, t.std)


def build_kimi_k2(path, cfg: dict, seed: int = 0, std: float = 0.02) -> Path:
    """Write a DeepSeek-V3/Kimi-K2 checkpoint for ``cfg`` with seeded random weights, laid out as
    Moonshot ships it: routed experts as INT4 pack-quantized (quantized from float draws),
    everything else bf16, tokenizer files as :func:`kimi_tokenizer_files` writes them."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    t = {}
    for spec in kimi_k2_tensors(cfg, std):
        if spec.kind == "int4":
            for part, arr in int4_pack(_normal(rng, spec.shape, spec.std)).items():
                t[f"{spec.name}.{part}"] = arr
        else:
            t[spec.name] = _draw(rng, spec)
    # at least two shards, as Moonshot's 62 (their names carry a 6-digit total)
    half = sum(a.nbytes for a in t.values()) // 2 + max(a.nbytes for a in t.values())
    _write(path, t, cfg, shard_bytes=min(2e9, half), total_digits=6)
    kimi_tokenizer_files(path, cfg["vocab_size"], seed)
    return path


def build_kimi_k2_tiny(path, seed: int = 0) -> Path:
    return build_kimi_k2(path, kimi_k2_config(), seed)


# --------------------------------------------------------------------------- kimi-k2.5-tiny, the wrapper

KIMI_K25_TEXT_PREFIX = "language_model."
# Moonshot's K2.5 repositories add these (remote code for the wrapper and its image/video processor)
KIMI_K25_REMOTE_CODE = {
    "configuration_kimi_k25.py": "the KimiK25Config class",
    "modeling_kimi_k25.py": "the KimiK25ForConditionalGeneration model (MoonViT vision tower, projector)",
    "kimi_k25_processor.py": "the multimodal processor",
    "kimi_k25_vision_processing.py": "the image/video preprocessing",
    "media_utils.py": "media loading helpers",
    "tool_declaration_ts.py": "the tool-declaration renderer of the chat template",
}


#: the sizes of kimi-k2.5-tiny's vision tower; kimi_k25_vision_config(**sizes) overrides any of them
KIMI_K25_VISION_TINY_SIZES = {"hidden": 32, "blocks": 2, "heads": 2, "intermediate": 64, "patch": 14, "pos_emb": 4,
                              "merge": (2, 2), "text_hidden": 128}


def kimi_k25_vision_config(**sizes) -> dict:
    """A MoonViT ``vision_config`` in the keys of Kimi-K2.5's, resized from
    :data:`KIMI_K25_VISION_TINY_SIZES`."""
    hidden, blocks, heads, intermediate, patch, pos_emb, merge, text_hidden = _sizes(
        KIMI_K25_VISION_TINY_SIZES, sizes, "kimi_k25_vision_config").values()
    return {"model_type": "moonvit3d", "patch_size": patch, "init_pos_emb_height": pos_emb,
            "init_pos_emb_width": pos_emb, "init_pos_emb_time": 4, "pos_emb_type": "divided_fixed",
            "vt_hidden_size": hidden, "vt_num_hidden_layers": blocks, "vt_num_attention_heads": heads,
            "vt_intermediate_size": intermediate, "merge_kernel_size": list(merge), "merge_type": "sd2_tpool",
            "video_attn_type": "spatial_temporal", "mm_projector_type": "patchmerger",
            "mm_hidden_size": hidden, "projector_hidden_act": "gelu", "projector_ln_eps": 1e-5,
            "text_hidden_size": text_hidden}


def kimi_k25_config(text: dict | None = None, vision: dict | None = None) -> dict:
    """A Kimi-K2.5 config.json: the wrapper's keys, ``text_config`` (a Kimi-K2 config with its INT4
    ``quantization_config``, only there, as in Moonshot's file) and ``vision_config``."""
    text = text or kimi_k2_config()
    vision = vision or kimi_k25_vision_config(text_hidden=text["hidden_size"])
    first_special = text["bos_token_id"]
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config",
                     "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration"},
        "model_type": "kimi_k25", "bos_token_id": first_special, "eos_token_id": first_special + 1,
        "pad_token_id": text["vocab_size"] - 1, "media_placeholder_token_id": first_special + 21,
        "ignore_index": -100, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "text_config": text, "vision_config": vision,
    }


def kimi_k25_vision_tensors(vision: dict, seed: int, std: float = 0.02) -> dict[str, np.ndarray]:
    """The MoonViT vision tower and patch-merger projector of ``vision`` (bf16, with biases)."""
    rng = np.random.default_rng([seed, 25])  # a stream of its own: the text tensors stay kimi-k2-tiny's
    h, inner, p, e = (vision[k] for k in ("vt_hidden_size", "vt_intermediate_size", "patch_size", "init_pos_emb_height"))
    merged = h * int(np.prod(vision["merge_kernel_size"]))
    linear = {"vision_tower.patch_embed.proj": (h, 3, p, p)}
    norms = []
    for b in range(vision["vt_num_hidden_layers"]):
        blk = f"vision_tower.encoder.blocks.{b}."
        linear.update({blk + "wqkv": (3 * h, h), blk + "wo": (h, h), blk + "mlp.fc0": (inner, h), blk + "mlp.fc1": (h, inner)})
        norms += [blk + "norm0", blk + "norm1"]
    norms += ["vision_tower.encoder.final_layernorm", "mm_projector.pre_norm"]
    linear.update({"mm_projector.proj.0": (merged, merged), "mm_projector.proj.2": (vision["text_hidden_size"], merged)})
    t = {"vision_tower.patch_embed.pos_emb.weight": _normal(rng, (e, e, h), 1.0)}
    for name, shape in linear.items():
        t[name + ".weight"] = _normal(rng, shape, std)
        t[name + ".bias"] = _normal(rng, shape[:1], std)
    for name in norms:
        t[name + ".weight"] = (1 + _normal(rng, (h,), 0.1).astype(np.float32)).astype(BF16)
        t[name + ".bias"] = _normal(rng, (h,), 0.01)
    return dict(sorted(t.items()))


def build_kimi_k25(path, cfg: dict | None = None, seed: int = 0, std: float = 0.02) -> Path:
    """Write a Kimi-K2.5 checkpoint laid out as Moonshot ships it: the text tensors of
    :func:`build_kimi_k2` for ``cfg["text_config"]`` and ``seed`` under ``language_model.``, the
    vision tower and projector, shards ``model-0000N-of-0000NN.safetensors`` (one for the head,
    embeddings and norm, one per decoder layer, one for ``mm_projector.*``, one for
    ``vision_tower.*``) and the K2.5 file set (tokenizer files of kimi-k2-tiny, remote-code names)."""
    path = Path(path)
    cfg = cfg or kimi_k25_config()
    text = cfg["text_config"]
    rng = np.random.default_rng(seed)
    t = {}
    for spec in kimi_k2_tensors(text, std):
        name = KIMI_K25_TEXT_PREFIX + spec.name
        if spec.kind == "int4":
            for part, arr in int4_pack(_normal(rng, spec.shape, spec.std)).items():
                t[f"{name}.{part}"] = arr
        else:
            t[name] = _draw(rng, spec)
    t.update(kimi_k25_vision_tensors(cfg["vision_config"], seed, std))
    layer_of = {n: n.split(".")[3] for n in t if n.startswith(KIMI_K25_TEXT_PREFIX + "model.layers.")}
    shards = [[n for n in t if n.startswith(KIMI_K25_TEXT_PREFIX) and n not in layer_of]]
    shards += [[n for n in t if layer_of.get(n) == str(layer)] for layer in range(text["num_hidden_layers"])]
    shards += [[n for n in t if n.startswith(root)] for root in ("mm_projector.", "vision_tower.")]

    def write_shard(file: Path, names: list[str]) -> None:
        save_file(file, {n: t[n] for n in names}, {"format": "pt"})

    _write_shard_files(path, cfg, shards, ({n: a.nbytes for n, a in t.items()}, write_shard), 6)
    kimi_tokenizer_files(path, text["vocab_size"], seed)
    remote_code_placeholders(path, KIMI_K25_REMOTE_CODE)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"auto_map": {"AutoImageProcessor": "kimi_k25_vision_processing.KimiK25VisionProcessor",
                      "AutoProcessor": "kimi_k25_processor.KimiK25Processor"},
         "patch_size": cfg["vision_config"]["patch_size"], "merge_kernel_size": cfg["vision_config"]["merge_kernel_size"]},
        indent=2))
    return path


def build_kimi_k25_tiny(path, seed: int = 0) -> Path:
    return build_kimi_k25(path, kimi_k25_config(), seed)


# --------------------------------------------------------------------------- kimi-k2-shaped, streamed

# Random bytes are drawn in chunks of this size, each from its own seeded generator (seed, tensor,
# chunk), so a file's bytes do not depend on the thread count, and memory stays at a few chunks
# per thread however large the tensor.
CHUNK_BYTES = 1 << 25
# A bf16 mantissa m uniform in [1, 2) has a root mean square of sqrt(7/3) = 1.53.
_RMS_MANTISSA = 1.53
# Uniform INT4 codes -8..7 have a root mean square of sqrt(21.5) = 4.64.
_RMS_INT4 = 4.64
# A bf16 "normal" value here is sign * m * 2**(e - k), k uniform in 0..3: root mean square
# 1.53 * 2**e * sqrt((1 + 1/4 + 1/16 + 1/64) / 4) = 0.88 * 2**e.
_RMS_PATTERN = 0.88


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """One stored tensor of the streamed build: ``fill`` says how its bytes are made (``codes``:
    random int32 words, every nibble a valid INT4 code, uniform over -8..7, so a weight's mean is
    half a scale below zero, harmless for a benchmark; ``scale``: positive bf16 of exponent
    ``exponent``; ``normal``: zero-mean bf16 of exponents ``exponent``-3..``exponent``; ``small``:
    drawn whole by :func:`_draw`, or ``value``), ``index`` its place in the checkpoint (its seed)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fill: str
    index: int
    exponent: int = 0
    source: KimiTensor | None = None
    value: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def chunks(self) -> int:
        return max(1, -(-self.nbytes // CHUNK_BYTES)) if self.fill != "small" else 1


def _bf16_exponent(x: float) -> int:
    """The biased bf16 exponent e of the power of two 2**(e - 127) nearest ``x`` (in log)."""
    return 127 + int(round(np.log2(x)))


def kimi_k2_stored(cfg: dict, std: float = 0.02) -> list[StoredTensor]:
    """The stored tensors of :func:`kimi_k2_tensors` for the streamed build, in file order."""
    out: list[StoredTensor] = []
    for t in kimi_k2_tensors(cfg, std):
        if t.kind == "int4":
            n, k = t.shape
            scale_exp = _bf16_exponent(t.std / (_RMS_INT4 * _RMS_MANTISSA))
            out += [StoredTensor(f"{t.name}.weight_packed", np.dtype(np.int32), (n, k // 8), "codes", len(out)),
                    StoredTensor(f"{t.name}.weight_scale", np.dtype(BF16), (n, k // INT4_GROUP), "scale",
                                 len(out) + 1, scale_exp),
                    StoredTensor(f"{t.name}.weight_shape", np.dtype(np.int64), (2,), "small", len(out) + 2,
                                 value=np.asarray([n, k], np.int64))]
        elif t.kind == "normal":
            out.append(StoredTensor(t.name, np.dtype(BF16), t.shape, "normal", len(out),
                                    _bf16_exponent(t.std / _RMS_PATTERN)))
        else:
            dtype = np.float32 if t.kind == "bias" else BF16
            out.append(StoredTensor(t.name, np.dtype(dtype), t.shape, "small", len(out), source=t))
    return out


def kimi_k2_source_bytes(cfg: dict) -> int:
    """Bytes of tensor data of the Kimi-K2 checkpoint for ``cfg`` (headers not counted)."""
    return sum(s.nbytes for s in kimi_k2_stored(cfg))


def _chunk(spec: StoredTensor, chunk: int, seed: int) -> np.ndarray:
    """Bytes ``chunk * CHUNK_BYTES`` onwards (at most CHUNK_BYTES) of ``spec``'s data."""
    if spec.fill == "small":
        arr = spec.value if spec.value is not None else _draw(np.random.default_rng([seed, spec.index]), spec.source)
        return np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    nbytes = min(CHUNK_BYTES, spec.nbytes - chunk * CHUNK_BYTES)
    words = np.random.Generator(np.random.PCG64([seed, spec.index, chunk])).bit_generator.random_raw(-(-nbytes // 8))
    raw = words.view(np.uint8)[:nbytes]
    if spec.fill == "codes":
        return raw
    u = raw.view(np.uint16)  # in place below: one chunk-sized temporary at most
    if spec.fill == "scale":
        u &= np.uint16(0x7F)
        u |= np.uint16(spec.exponent << 7)
        return raw
    lower = u >> np.uint16(7)  # sign and mantissa random, exponent lowered by 0..3 (two more random bits)
    lower &= np.uint16(3)
    np.subtract(np.uint16(spec.exponent), lower, out=lower)
    lower <<= np.uint16(7)
    u &= np.uint16(0x807F)
    u |= lower
    return raw


def _ordered_map(fn, jobs, workers: int):
    """``fn(*job)`` for every job, in order, at most ``2 * workers`` in flight (bounded memory)."""
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for job in jobs:
            pending.append(pool.submit(fn, *job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _stream_shard(file: Path, specs: list[StoredTensor], seed: int, workers: int) -> None:
    head = encode_header([(s.name, st_dtype(s.dtype), s.shape, s.nbytes) for s in specs], {"format": "pt"})
    with open(file, "wb") as f:
        f.write(head)
        for data in _ordered_map(_chunk, ((s, c, seed) for s in specs for c in range(s.chunks)), workers):
            f.write(data)


def build_kimi_k2_streamed(path, cfg: dict, seed: int = 0, shard_bytes: float = 5e9, workers: int | None = None) -> Path:
    """The Kimi-K2 checkpoint for ``cfg`` made fast, for benchmarks at the real expert count:
    routed experts' INT4 codes and bf16 group scales written directly as random bits (no float
    weights drawn and packed), other weights random bf16 bit patterns of about the same spread as
    :func:`build_kimi_k2`'s, streamed chunk by chunk into shards of at most ``shard_bytes`` (at
    least two) with ``workers`` threads: memory stays at a few chunks per thread."""
    path = Path(path)
    stored = kimi_k2_stored(cfg)
    by_name = {s.name: s for s in stored}
    half = sum(s.nbytes for s in stored) // 2 + max(s.nbytes for s in stored)
    workers = workers or min(8, os.cpu_count() or 1)

    def write_shard(file: Path, names: list[str]) -> None:
        _stream_shard(file, [by_name[n] for n in names], seed, workers)

    _write_shards(path, cfg, {s.name: s.nbytes for s in stored}, write_shard, (min(shard_bytes, half), 6))
    kimi_tokenizer_files(path, cfg["vocab_size"], seed)
    return path


def kimi_k2_shaped_config(layers: int = 2, experts: int = 384, vocab: int = 4096) -> dict:
    """Kimi-K2's real per-layer sizes (hidden 7168, dense intermediate 18432, expert intermediate
    2048, 64 heads, MLA ranks 1536/512, top-8 routing); layer 0 dense, the other ``layers`` - 1
    MoE with ``experts`` routed experts. Kimi-K2-Thinking is ``(61, 384, 163840)``."""
    return kimi_k2_config(hidden=7168, intermediate=18432, moe_intermediate=2048, layers=layers,
                          experts=experts, top_k=min(8, experts), heads=64, q_lora=1536, kv_lora=512,
                          nope=128, rope=64, v_head=128, vocab=vocab, first_dense=1)


def build_kimi_k2_shaped(path, layers: int = 2, experts: int = 384, seed: int = 0, vocab: int = 4096) -> Path:
    """Kimi-K2's real per-layer tensor sizes: layer 0 dense, ``layers`` - 1 MoE layers of
    ``experts`` routed experts (a 384-expert MoE layer is 9.8 GB), built by
    :func:`build_kimi_k2_streamed`; ``vocab`` 4096 instead of Kimi's 163840 keeps the embeddings small."""
    return build_kimi_k2_streamed(path, kimi_k2_shaped_config(layers, experts, vocab), seed)


EXAMPLES = {"llama-tiny": build_llama_tiny, "kimi-k2-tiny": build_kimi_k2_tiny, "kimi-k2.5-tiny": build_kimi_k25_tiny}
