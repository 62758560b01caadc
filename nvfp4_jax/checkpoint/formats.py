"""Output formats: ModelOpt NVFP4 (default) and compressed-tensors ``nvfp4-pack-quantized``.

One class per format owns everything format-specific: the stored names of a quantized linear's
tensors in both directions (logical ``<module>.<param>`` <-> stored name, dtype and shape), the
config blocks, the check of a quantization_config and the detection from a checkpoint's configs.
:data:`FORMATS` is the registry by name.

ModelOpt (SPEC section 6): tensors ``weight`` (uint8 packed FP4), ``weight_scale`` (F8_E4M3),
``weight_scale_2`` (f32 []), ``input_scale`` (f32 []); ``hf_quant_config.json`` plus a
``quantization_config`` in config.json.

compressed-tensors: the same bytes under other names, with the tensor scales inverted
(``weight_global_scale = 1 / weight_scale_2``, ``input_global_scale = 1 / input_scale``, f32
``[1]``), exactly what compressed-tensors' own ``ModelOptNvfp4Converter`` does; the config is the
library's ``NVFP4`` preset scheme.
"""

from __future__ import annotations

import fnmatch
from typing import Optional

import numpy as np

from .safetensors_io import CheckpointError

NVFP4_GROUP = 16
QUANTIZED_PARAMS = ("weight", "weight_scale", "weight_scale_2", "input_scale")  # logical, ModelOpt terms
CT_FORMAT = "nvfp4-pack-quantized"


class FormatError(CheckpointError):
    """A checkpoint's configs name a quantization this format cannot read (the message says which)."""


def _inverse_f32_1(a) -> np.ndarray:
    x = np.asarray(a, dtype=np.float32).reshape(1)
    with np.errstate(divide="raise", invalid="raise"):
        return (np.float32(1.0) / x).astype(np.float32)  # one correctly rounded f32 division


def declared_group_sizes(qc: dict) -> set:
    """Every ``group_size`` a quantization_config declares (top level or in config_groups)."""
    sizes = set()
    if isinstance(qc.get("group_size"), int):
        sizes.add(qc["group_size"])
    for g in (qc.get("config_groups") or {}).values():
        if isinstance(g, dict):
            if isinstance(g.get("group_size"), int):
                sizes.add(g["group_size"])
            for sub in g.values():
                if isinstance(sub, dict) and isinstance(sub.get("group_size"), int):
                    sizes.add(sub["group_size"])
    return sizes


def output_config(source_config: dict, quantization_config: dict) -> dict:
    """The output's config.json: the source's, structure kept (a wrapper's ``text_config`` and
    ``vision_config`` too), with ``quantization_config`` at the top level, where the engines read
    it, and the source's own block dropped from every nested config (Kimi-K2.5 keeps its INT4
    block in ``text_config``; engines copy a nested block to the top level)."""
    out = {k: ({n: v for n, v in sub.items() if n != "quantization_config"} if isinstance(sub, dict) else sub)
           for k, sub in source_config.items()}
    out["quantization_config"] = quantization_config
    return out


class OutputFormat:
    """The interface of an output format; the ModelOpt names are the logical ones."""

    name = ""
    stored_params: dict[str, str] = {}  # logical param of a quantized linear -> stored param

    def stored_name(self, name: str, dtype: str) -> str:
        """The stored name of the logical tensor ``name`` of safetensors dtype ``dtype``."""
        mod, _, param = name.rpartition(".")
        if param in self.stored_params and (param != "weight" or dtype == "U8"):
            return f"{mod}.{self.stored_params[param]}"
        return name

    def stored_spec(self, name: str, dtype: str, shape: tuple) -> tuple[str, str, tuple]:
        """(stored name, dtype, shape) of a logical tensor, as :meth:`encode` writes it."""
        return self.stored_name(name, dtype), dtype, tuple(shape)

    def encode(self, name: str, array) -> list[tuple[str, object]]:
        """The stored ``(name, array)`` pairs of one logical tensor."""
        return [(name, array)]

    def logical_name(self, stored: str) -> str:
        """The logical ``<module>.<param>`` of a stored tensor name (inverse of :meth:`stored_name`)."""
        mod, _, param = stored.rpartition(".")
        back = {v: k for k, v in self.stored_params.items()}
        return f"{mod}.{back[param]}" if param in back else stored

    def tensor_scale(self, stored_value) -> np.float32:
        """A stored weight_scale_2 / input_scale as the ModelOpt (multiplying) f32 scale."""
        return np.float32(np.asarray(stored_value).reshape(-1)[0])

    def configs(self, exclude, producer_version: str) -> tuple[dict, Optional[dict]]:
        """(config.json quantization_config, hf_quant_config.json or None)."""
        raise NotImplementedError

    def check_config(self, qc) -> None:
        """Raise CheckpointError unless ``qc`` is this format's quantization_config."""
        raise NotImplementedError

    @staticmethod
    def claims(qc: dict, hf_quant: Optional[dict]) -> bool:
        """Whether a checkpoint with these configs is in this format (NVFP4 or not)."""
        raise NotImplementedError

    def check_nvfp4(self, qc: dict, hf_quant: Optional[dict]) -> None:
        """Raise FormatError unless a checkpoint this format claims holds NVFP4."""
        raise NotImplementedError


class ModelOpt(OutputFormat):
    name = "modelopt"
    stored_params = {p: p for p in QUANTIZED_PARAMS}

    def configs(self, exclude, producer_version: str) -> tuple[dict, dict]:
        return modelopt_configs(exclude, producer_version)

    def check_config(self, qc) -> None:
        _require_dict(qc)
        if qc.get("quant_method") != "modelopt":
            raise CheckpointError(f"quantization_config.quant_method is {qc.get('quant_method')!r}; "
                                  "the modelopt format needs 'modelopt'")

    @staticmethod
    def claims(qc: dict, hf_quant: Optional[dict]) -> bool:
        method = qc.get("quant_method")
        return method == "modelopt" or (method is None and bool(_hf_algo(hf_quant)))

    def check_nvfp4(self, qc: dict, hf_quant: Optional[dict]) -> None:
        algo = qc.get("quant_algo") or _hf_algo(hf_quant)
        if algo != "NVFP4":
            raise FormatError(f"ModelOpt checkpoint with quant_algo {algo!r}, not NVFP4")


class CompressedTensors(OutputFormat):
    name = "compressed-tensors"
    stored_params = {"weight": "weight_packed", "weight_scale": "weight_scale",
                     "weight_scale_2": "weight_global_scale", "input_scale": "input_global_scale"}

    def stored_spec(self, name: str, dtype: str, shape: tuple) -> tuple[str, str, tuple]:
        param = name.rpartition(".")[2]
        stored = self.stored_name(name, dtype)
        if param in ("weight_scale_2", "input_scale"):
            return stored, "F32", (1,)
        return stored, dtype, tuple(shape)

    def encode(self, name: str, array) -> list[tuple[str, object]]:
        return to_compressed_tensors(name, array)

    def tensor_scale(self, stored_value) -> np.float32:
        return np.float32(np.float32(1.0) / np.float32(np.asarray(stored_value).reshape(-1)[0]))

    def configs(self, exclude, producer_version: str) -> tuple[dict, None]:
        return compressed_tensors_config(exclude), None

    def check_config(self, qc) -> None:
        _require_dict(qc)
        if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != CT_FORMAT:
            raise CheckpointError(
                f"quantization_config is quant_method {qc.get('quant_method')!r}, format {qc.get('format')!r}; "
                f"the compressed-tensors format needs 'compressed-tensors' / '{CT_FORMAT}'")

    @staticmethod
    def declared_format(qc: dict) -> Optional[str]:
        """The compression format of a compressed-tensors config (top level, else the first group's)."""
        if qc.get("format"):
            return qc["format"]
        for g in (qc.get("config_groups") or {}).values():
            if isinstance(g, dict) and g.get("format"):
                return g["format"]
        return None

    @staticmethod
    def claims(qc: dict, hf_quant: Optional[dict]) -> bool:
        return qc.get("quant_method") == "compressed-tensors"

    def check_nvfp4(self, qc: dict, hf_quant: Optional[dict]) -> None:
        fmt = self.declared_format(qc)
        if fmt != CT_FORMAT:
            raise FormatError(f"compressed-tensors checkpoint in format {fmt!r}, not NVFP4 ('{CT_FORMAT}')")


FORMATS: dict[str, OutputFormat] = {f.name: f for f in (ModelOpt(), CompressedTensors())}


def get_format(name: str) -> OutputFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown output format {name!r}; choose one of {tuple(FORMATS)}") from None


def detect_format(qc: Optional[dict], hf_quant: Optional[dict]) -> Optional[OutputFormat]:
    """The NVFP4 format of a checkpoint from its config.json quantization_config and its
    hf_quant_config.json (either may be None); None when neither names a known format; FormatError
    when the format is known but does not hold NVFP4."""
    qc = qc or {}
    for fmt in FORMATS.values():
        if fmt.claims(qc, hf_quant):
            fmt.check_nvfp4(qc, hf_quant)
            return fmt
    return None


def _hf_algo(hf_quant: Optional[dict]):
    return ((hf_quant or {}).get("quantization") or {}).get("quant_algo")


def _require_dict(qc) -> None:
    if not isinstance(qc, dict):
        raise CheckpointError("config has no quantization_config (build it with the format's configs())")


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
                "format": CT_FORMAT,
            }
        },
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": CT_FORMAT,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": [_ct_ignore_entry(e) for e in ignore],
        "sparsity_config": {},
        "transform_config": {},
    }
    if version is not None:
        qc["version"] = version
    return qc
