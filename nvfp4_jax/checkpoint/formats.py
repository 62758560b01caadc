"""Output formats: ModelOpt NVFP4 (default) and compressed-tensors ``nvfp4-pack-quantized``.

ModelOpt (SPEC section 6): tensors ``weight`` (uint8 packed FP4), ``weight_scale`` (F8_E4M3),
``weight_scale_2`` (f32 []), ``input_scale`` (f32 []); ``hf_quant_config.json`` plus a
``quantization_config`` in config.json, both built by :func:`modelopt_configs`.

compressed-tensors: the same bytes under other names, with the tensor scales inverted
(``weight_global_scale = 1 / weight_scale_2``, ``input_global_scale = 1 / input_scale``, f32
``[1]``), exactly what compressed-tensors' own ``ModelOptNvfp4Converter`` does; the config is the
library's ``NVFP4`` preset scheme (:func:`compressed_tensors_config`).
"""

from __future__ import annotations

import fnmatch

import numpy as np

NVFP4_GROUP = 16


def modelopt_configs(exclude_modules, producer_version: str) -> tuple[dict, dict]:
    """``(quantization_config for config.json, hf_quant_config.json)`` as ModelOpt writes them.

    Key order follows ModelOpt 0.47 (golden/tiny_llama/modelopt_nvfp4).
    """
    exclude = list(exclude_modules)
    producer = {"name": "modelopt", "version": str(producer_version)}
    hf_quant_config = {
        "producer": dict(producer),
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": NVFP4_GROUP,
            "exclude_modules": list(exclude),
        },
    }
    args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_GROUP}
    quantization_config = {
        "config_groups": {
            "group_0": {
                "input_activations": dict(args),
                "weights": dict(args),
                "targets": ["Linear"],
            }
        },
        "ignore": list(exclude),
        "quant_algo": "NVFP4",
        "producer": dict(producer),
        "quant_method": "modelopt",
    }
    return quantization_config, hf_quant_config


def _inverse_f32_1(a) -> np.ndarray:
    x = np.asarray(a, dtype=np.float32).reshape(1)
    with np.errstate(divide="raise", invalid="raise"):
        return (np.float32(1.0) / x).astype(np.float32)  # one correctly rounded f32 division


def to_compressed_tensors(name: str, array) -> list[tuple[str, object]]:
    """Map one ModelOpt tensor to its compressed-tensors ``nvfp4-pack-quantized`` name(s)/value(s).

    ``X.weight`` uint8 -> ``X.weight_packed`` (same bytes); ``X.weight_scale`` unchanged (F8_E4M3);
    ``X.weight_scale_2`` -> ``X.weight_global_scale = 1/x``; ``X.input_scale`` ->
    ``X.input_global_scale = 1/x`` (float32 ``[1]``); anything else (bf16 weights, norms, ...) is
    passed through.
    """
    mod, _, param = name.rpartition(".")
    if param == "weight" and np.dtype(getattr(array, "dtype", None)) == np.uint8:
        return [(f"{mod}.weight_packed", array)]
    if param == "weight_scale_2":
        return [(f"{mod}.weight_global_scale", _inverse_f32_1(array))]
    if param == "input_scale":
        return [(f"{mod}.input_global_scale", _inverse_f32_1(array))]
    return [(name, array)]


def _ct_ignore_entry(entry: str) -> str:
    """A ModelOpt exclude entry as a compressed-tensors ignore entry (exact name or ``re:``)."""
    if entry.startswith("re:") or not any(c in entry for c in "*?["):
        return entry
    return "re:" + fnmatch.translate(entry)


def compressed_tensors_config(ignore, version: str | None = None) -> dict:
    """config.json ``quantization_config`` for compressed-tensors ``nvfp4-pack-quantized``.

    The scheme is compressed-tensors' ``NVFP4`` preset (weights: float 4-bit, tensor_group, group
    16, symmetric, static; activations: the same with dynamic "local", i.e. a static
    ``input_global_scale`` and dynamic block scales), targets ``Linear``.  ``ignore`` entries
    with ModelOpt wildcards become ``re:`` regexes.
    """
    # the field set compressed-tensors itself dumps for its NVFP4 preset
    weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": NVFP4_GROUP,
               "strategy": "tensor_group", "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
    inputs = dict(weights, dynamic="local", observer="static_minmax")

    qc = {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
                "format": "nvfp4-pack-quantized",
            }
        },
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": [_ct_ignore_entry(e) for e in ignore],
        "sparsity_config": {},
        "transform_config": {},
    }
    if version is not None:
        qc["version"] = version
    return qc
