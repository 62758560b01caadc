"""Model code used only for calibration forwards (see docs/INTERFACES.md).

    fam = get_family(config)            # config.json as a dict
    hidden = fam.embed(params, input_ids, dtype=jnp.bfloat16)
    for layer in range(fam.num_layers()):
        hidden, stats = fam.layer_forward(layer, params, hidden, dtype=jnp.bfloat16)
    logits = fam.head(params, hidden)

Modules: ops (linears, norms, activations), rope, attention, moe (routed-expert dispatch),
stats (the LayerStats pytrees), family (the `Family` base), one module per family, registry.

Flax NNX modules over the same functions (nnx_modules.py; identical numerics):

    model = CausalLM.from_checkpoint(path, dtype=jnp.bfloat16)   # DecoderLayer per layer, nnx.Param
    logits, stats = model(input_ids)
"""

from .deepseek_v3 import DeepseekV3Family
from .family import Family
from .llama import LlamaFamily
from .nnx_modules import CausalLM, DecoderLayer
from .ops import ModelConfigError
from .qwen3_moe import Qwen3MoeFamily
from .registry import FAMILIES, family_name, get_family
from .stats import LayerStats, RoutedExpertStats, merge_layer_stats

__all__ = [
    "CausalLM",
    "DecoderLayer",
    "FAMILIES",
    "DeepseekV3Family",
    "Family",
    "LayerStats",
    "LlamaFamily",
    "ModelConfigError",
    "Qwen3MoeFamily",
    "RoutedExpertStats",
    "family_name",
    "get_family",
    "merge_layer_stats",
]
