"""Checkpoint I/O: lazy source reader, streaming resumable writer, output formats."""

from .formats import compressed_tensors_config, modelopt_configs, to_compressed_tensors
from .reader import CheckpointReader, TensorInfo, decode_fp8_block, decode_int4_pack
from .safetensors_io import CheckpointError
from .writer import CheckpointWriter

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "CheckpointWriter",
    "TensorInfo",
    "compressed_tensors_config",
    "decode_fp8_block",
    "decode_int4_pack",
    "modelopt_configs",
    "to_compressed_tensors",
]
