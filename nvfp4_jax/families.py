"""One spec per model family: what the checkpoint names and config.json of a family look like.

A :class:`FamilySpec` is plain data read by the checkpoint layout (linears, fused groups, engine
names, exclude lists), by ``verify`` (required config keys) and by the model registry (which
forward runs it). Adding a family means one spec here plus its forward in ``nvfp4_jax.models``.

    spec = family_spec(config)                         # config.json as a dict
    layer_index("model.layers.3.mlp.up_proj.weight")   # 3
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping

from nvfp4_jax.errors import NVFP4Error

__all__ = [
    "FusedGroup",
    "FamilySpec",
    "KIMI_K25",
    "SPECS",
    "UnsupportedModelError",
    "family_spec",
    "find_family_spec",
    "generic_family_spec",
    "layer_index",
    "model_type",
    "spec_for_model_type",
    "supported_model_types",
]

DECODER_PREFIX = "model.layers."
_INDEX = re.compile(r"[0-9]+")


def layer_index(name: str, prefix: str = DECODER_PREFIX) -> int | None:
    """The decoder layer of a tensor or module name (``prefix`` + index + ``.`` or end), or None."""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].partition(".")[0]
    return int(head) if _INDEX.fullmatch(head) else None


class UnsupportedModelError(NVFP4Error, ValueError):
    """config.json names a model_type this project has no family spec for."""


@dataclass(frozen=True)
class FusedGroup:
    """Checkpoint linears that the engines run as one GEMM (SPEC section 4).

    kind: the group's name in reports ("qkv", "gate_up", "qkv_a").
    leaves: the members' last name parts, in the engines' shard order.
    engine_leaf: the fused module's last name part per engine ("vllm", "sglang").
    needs: a config key that must be set for the group to exist (DeepSeek's q_a/kv_a fusion needs
        ``q_lora_rank``), or None.
    """

    kind: str
    leaves: tuple[str, ...]
    engine_leaf: Mapping[str, str]
    needs: str | None = None


@dataclass(frozen=True)
class FamilySpec:
    """Name rules and config facts of one model family.

    name: the family (``Layout.family``, the report's "family").
    model_types: config.json ``model_type`` values of the family.
    forward: the forward that calibrates it (key of ``nvfp4_jax.models.registry.FAMILIES``).
    layer_prefix: what decoder-layer names start with, before the layer index.
    text_config_key: where the decoder's config lives in a wrapper's config.json, or None.
    fused: the fused groups the engines build.
    routers: name endings of MoE router modules (kept unquantized).
    mtp_after_last_layer: layers numbered from ``num_hidden_layers`` on are multi-token
        prediction layers, which calibration never runs and presets never quantize.
    default_preset: the preset used when the user names none.
    required_config_keys: config.json keys both engines read for this family; missing ones are a
        verify error saying ``required_config_reason``.
    engine_renames: ``(engine, old, new)``: how an engine's weight loader renames checkpoint names
        (``name.replace(old, new)`` where ``old`` occurs, in order) before it builds its modules.
    alt_layer_prefixes: other spellings of ``layer_prefix`` found in published checkpoints of the
        family (NVIDIA's Kimi-K2.5 NVFP4: ``language_model.layers.``), read as decoder layers too.
    """

    name: str
    model_types: tuple[str, ...]
    forward: str
    fused: tuple[FusedGroup, ...]
    layer_prefix: str = DECODER_PREFIX
    text_config_key: str | None = None
    routers: tuple[str, ...] = (".mlp.gate", ".block_sparse_moe.gate")
    mtp_after_last_layer: bool = False
    default_preset: str = "all"
    required_config_keys: tuple[str, ...] = ()
    required_config_reason: str = ""
    engine_renames: tuple[tuple[str, str, str], ...] = ()
    alt_layer_prefixes: tuple[str, ...] = ()

    @property
    def text_prefix(self) -> str:
        """What the text model's tensor names start with in a wrapper (``language_model.``); empty
        for a plain text model. Tensors outside it (vision tower, projector) are passed through."""
        return self.layer_prefix[:-len(DECODER_PREFIX)] if self.layer_prefix.endswith(DECODER_PREFIX) else ""

    def is_text(self, name: str) -> bool:
        """Whether a tensor or module belongs to the text model (always, for a plain text model)."""
        return name.startswith(self.text_prefix)

    def engine_rename(self, name: str, engine: str) -> str:
        """``name`` as ``engine``'s weight loader renames it (``engine_renames``)."""
        for eng, old, new in self.engine_renames:
            if eng == engine and old in name:
                name = name.replace(old, new)
        return name

    def text_config(self, config: Mapping) -> Mapping:
        """The decoder's config: ``config[text_config_key]`` for a wrapper; otherwise the top
        level, or its ``text_config`` when only that one has ``num_hidden_layers``."""
        if self.text_config_key is None:
            return _nested_text_config(config)
        tc = config.get(self.text_config_key)
        if not isinstance(tc, Mapping):
            raise UnsupportedModelError(f"config.json has no {self.text_config_key!r} object, which the "
                                        f"{self.name} family keeps its decoder's config in")
        return tc

    def layer_index(self, name: str) -> int | None:
        """The decoder layer of a name in ``layer_prefix`` or one of ``alt_layer_prefixes``, or None."""
        for prefix in (self.layer_prefix, *self.alt_layer_prefixes):
            li = layer_index(name, prefix)
            if li is not None:
                return li
        return None

    def fused_groups(self, config: Mapping) -> tuple[FusedGroup, ...]:
        """The fused groups this config has (those whose ``needs`` key is set)."""
        tc = self.text_config(config)
        return tuple(g for g in self.fused if g.needs is None or tc.get(g.needs))


_QKV = FusedGroup("qkv", ("q_proj", "k_proj", "v_proj"), {"vllm": "qkv_proj", "sglang": "qkv_proj"})
_GATE_UP = FusedGroup("gate_up", ("gate_proj", "up_proj"), {"vllm": "gate_up_proj", "sglang": "gate_up_proj"})
_QKV_A = FusedGroup("qkv_a", ("q_a_proj", "kv_a_proj_with_mqa"),
                    {"vllm": "fused_qkv_a_proj", "sglang": "fused_qkv_a_proj_with_mqa"}, needs="q_lora_rank")

LLAMA = FamilySpec("llama", ("llama", "qwen2", "qwen3", "mistral"), "llama", (_QKV, _GATE_UP))
QWEN3_MOE = FamilySpec("qwen3_moe", ("qwen3_moe",), "qwen3_moe", (_QKV, _GATE_UP))
DEEPSEEK_V3 = FamilySpec(
    "deepseek_v3", ("deepseek_v3", "kimi_k2"), "deepseek_v3", (_GATE_UP, _QKV_A),
    mtp_after_last_layer=True, default_preset="mlp_only",
    required_config_keys=("topk_method", "scoring_func", "moe_layer_freq"),
    required_config_reason="vLLM and SGLang read it for DeepSeek-V3/Kimi-K2 routing and fail without "
                           "it (transformers 5's DeepseekV3Config does not write it)")

# Kimi-K2.5/K2.6/K2.7 (KimiK25ForConditionalGeneration): the Kimi-K2 text model under
# ``language_model.`` with its config in ``text_config``, plus a MoonViT vision tower and projector.
# Renames as the engines' kimi_k25.py load_weights apply them: vLLM maps ``language_model.lm_head``
# to ``lm_head`` and ``language_model.model`` to ``language_model``; SGLang maps NVIDIA's
# ``language_model.layers.`` to ``language_model.model.layers.``, then strips ``language_model.``.
# NVIDIA's Kimi-K2.5-NVFP4 spells the layers ``language_model.layers.N`` (both engines map it back
# for "legacy NVFP4 checkpoints"), so a checkpoint in that spelling is read as the same layers.
KIMI_K25 = dataclasses.replace(
    DEEPSEEK_V3, name="kimi_k25", model_types=("kimi_k25",), layer_prefix="language_model.model.layers.",
    alt_layer_prefixes=("language_model.layers.",), text_config_key="text_config",
    engine_renames=(("vllm", "language_model.lm_head", "lm_head"), ("vllm", "language_model.model", "language_model"),
                    ("vllm", "mm_projector.proj.0", "mm_projector.linear_1"),
                    ("vllm", "mm_projector.proj.2", "mm_projector.linear_2"),
                    ("sglang", "language_model.layers.", "language_model.model.layers."),
                    ("sglang", "language_model.", "")))

SPECS: tuple[FamilySpec, ...] = (LLAMA, QWEN3_MOE, DEEPSEEK_V3, KIMI_K25)

_BY_MODEL_TYPE = {mt: spec for spec in SPECS for mt in spec.model_types}


def supported_model_types() -> tuple[str, ...]:
    return tuple(_BY_MODEL_TYPE)


def _nested_text_config(config: Mapping) -> Mapping:
    tc = config.get("text_config")
    if isinstance(tc, Mapping) and "num_hidden_layers" in tc and "num_hidden_layers" not in config:
        return tc
    return config


def model_type(config: Mapping) -> str | None:
    """config.json's model_type; for a wrapper without a spec of its own, its text_config's."""
    mt = config.get("model_type")
    if mt not in _BY_MODEL_TYPE:
        tc = config.get("text_config")
        if isinstance(tc, Mapping) and tc.get("model_type") in _BY_MODEL_TYPE:
            return tc.get("model_type")
    return mt


def spec_for_model_type(name: str | None) -> FamilySpec | None:
    """The spec that lists model_type ``name``, or None."""
    return _BY_MODEL_TYPE.get(name)


def find_family_spec(config: Mapping) -> FamilySpec | None:
    """The spec for a config.json dict, or None when its model_type has none."""
    return spec_for_model_type(model_type(config))


def family_spec(config: Mapping) -> FamilySpec:
    """The spec for a config.json dict; raises UnsupportedModelError naming the model_type."""
    spec = find_family_spec(config)
    if spec is None:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type(config)!r} in config.json; supported: "
            f"{', '.join(supported_model_types())}")
    return spec


def generic_family_spec(config: Mapping) -> FamilySpec:
    """The spec whose name rules fit an unsupported config best (verify checks such checkpoints
    with them): DeepSeek's when the config has MLA's kv_lora_rank, else Llama's."""
    return DEEPSEEK_V3 if _nested_text_config(config).get("kv_lora_rank") else LLAMA
