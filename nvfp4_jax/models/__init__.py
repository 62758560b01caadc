"""Model code used only for calibration forwards (see docs/INTERFACES.md).

    fam = get_family(config)            # config.json as a dict
    hidden = fam.embed(params, input_ids, dtype=jnp.bfloat16)
    for layer in range(fam.num_layers()):
        hidden, stats = fam.layer_forward(layer, params, hidden, dtype=jnp.bfloat16)
    logits = fam.head(params, hidden)

Flax NNX modules over the same functions (nnx_modules.py; identical numerics):

    model = CausalLM.from_checkpoint(path, dtype=jnp.bfloat16)   # DecoderLayer per layer, nnx.Param
    logits, stats = model(input_ids)
"""

from .common import Family, LayerStats, ModelConfigError
from .deepseek_v3 import DeepseekV3Family
from .llama import LlamaFamily
from .nnx_modules import CausalLM, DecoderLayer, StaticStrDict
from .qwen3_moe import Qwen3MoeFamily
from .registry import FAMILIES, family_name, get_family

__all__ = [
    "CausalLM",
    "DecoderLayer",
    "StaticStrDict",
    "FAMILIES",
    "DeepseekV3Family",
    "Family",
    "LayerStats",
    "LlamaFamily",
    "ModelConfigError",
    "Qwen3MoeFamily",
    "family_name",
    "get_family",
]
