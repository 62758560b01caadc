"""get_family(config): the forward of a config.json's model family (see nvfp4_jax.families)."""

from __future__ import annotations

from typing import Any, Mapping

from nvfp4_jax.families import spec_for_model_type, supported_model_types

from .family import Family
from .ops import ModelConfigError
from .deepseek_v3 import DeepseekV3Family
from .llama import LlamaFamily
from .qwen3_moe import Qwen3MoeFamily

# FamilySpec.forward -> the forward class
FAMILIES: dict[str, type[Family]] = {
    "llama": LlamaFamily,
    "qwen3_moe": Qwen3MoeFamily,
    "deepseek_v3": DeepseekV3Family,
}


def family_name(config: Mapping[str, Any]) -> str:
    """"llama" | "qwen3_moe" | "deepseek_v3" for a config.json, without building the family."""
    return _family_class(config).name


def _family_class(config: Mapping[str, Any]) -> type[Family]:
    # the top-level model_type: the forward runs on this config as it is
    model_type = config.get("model_type")
    spec = spec_for_model_type(model_type)
    if spec is None:
        raise ModelConfigError(f"config.json model_type {model_type!r} is not supported; "
                               f"supported: {sorted(supported_model_types())}")
    return FAMILIES[spec.forward]


def get_family(config: Mapping[str, Any]) -> Family:
    """The family bound to `config` (the dict of config.json)."""
    return _family_class(config)(config)
