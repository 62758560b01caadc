"""nvfp4_jax: NVFP4 (ModelOpt format) quantization, calibration and checkpoint conversion in JAX."""
from nvfp4_jax.errors import NVFP4Error
from nvfp4_jax.numerics import (
    AMAX_DIVISOR, BLOCK, E2M1_VALUES, FP4_MAX, FP8_MAX, NVFP4Tensor, dequantize, fake_quant,
    input_scale_from_amax, pack_fp4, quantize, scale_from_amax, tensor_amax, unpack_fp4,
)

__version__ = "0.1.0"
