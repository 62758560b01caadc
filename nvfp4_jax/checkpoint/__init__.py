"""Checkpoint I/O: lazy source reader, the planned resumable writer, output formats."""

from .formats import FORMATS, OutputFormat, compressed_tensors_config, get_format, modelopt_configs, to_compressed_tensors
from .reader import CheckpointReader, TensorInfo, decode_fp8_block, decode_int4_pack
from .safetensors_io import CheckpointError
from .writer import PlannedWriter, WriterOptions, open_planned_writer

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "FORMATS",
    "OutputFormat",
    "PlannedWriter",
    "TensorInfo",
    "WriterOptions",
    "compressed_tensors_config",
    "decode_fp8_block",
    "decode_int4_pack",
    "get_format",
    "modelopt_configs",
    "open_planned_writer",
    "to_compressed_tensors",
]
