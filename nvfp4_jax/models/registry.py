"""get_family(config): the model family for a config.json, keyed by its model_type."""

from __future__ import annotations

from typing import Any, Mapping

from .common import Family, ModelConfigError
from .deepseek_v3 import DeepseekV3Family
from .llama import LlamaFamily
from .qwen3_moe import Qwen3MoeFamily

FAMILIES: dict[str, type[Family]] = {
    "llama": LlamaFamily,
    "mistral": LlamaFamily,
    "qwen2": LlamaFamily,
    "qwen3": LlamaFamily,
    "qwen3_moe": Qwen3MoeFamily,
    "deepseek_v3": DeepseekV3Family,
    "kimi_k2": DeepseekV3Family,
}


def family_name(config: Mapping[str, Any]) -> str:
    """"llama" | "qwen3_moe" | "deepseek_v3" for a config.json, without building the family."""
    return _family_class(config).name


def _family_class(config: Mapping[str, Any]) -> type[Family]:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelConfigError(
            f"config.json model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def get_family(config: Mapping[str, Any]) -> Family:
    """The family bound to `config` (the dict of config.json)."""
    return _family_class(config)(config)
