"""NVFP4 (ModelOpt format) numerics in plain PyTorch: the reference implementation.

Written from SPEC.md sections 1-2. Runs on any torch device (CPU or CUDA) with ordinary tensor ops,
no custom kernels.

Correct rounding: every step that SPEC section 2 defines as a float32 operation (the ``amax / 2688``
division, the ``6 * weight_scale_2`` and ``fp8(s) * weight_scale_2`` products and the two
divisions) is evaluated in float64 and then rounded once to float32. For two float32 operands the
float64 result of ``+ - * /`` rounded to float32 equals the correctly rounded float32 result
(double rounding is innocuous when the wide format has at least 2p+2 = 50 significand bits; float64
has 53), so the result does not depend on how a backend implements float32 division (reciprocal
multiplication, fast-math, FMA contraction): it is the IEEE float32 result on every device. The
products of two float32 values are even exact in float64, so their one rounding is the float32 one.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "E2M1_VALUES",
    "FP8_MAX",
    "FP4_MAX",
    "BLOCK",
    "AMAX_DIVISOR",
    "FP8_MIN_SCALE",
    "quantize",
    "dequantize",
    "fake_quant",
    "pack_fp4",
    "unpack_fp4",
    "scale_from_amax",
    "round_to_e2m1_codes",
    "check_weight",
]

FP8_MAX = 448.0
FP4_MAX = 6.0
BLOCK = 16
AMAX_DIVISOR = 2688.0  # 6 * 448
FP8_MIN_SCALE = 2.0**-9  # smallest E4M3FN subnormal

# code -> value, sign in bit 3. Code 8 ("negative zero") decodes to +0.0, as ModelOpt's dequantized
# output in golden/nvfp4_vectors.npz does (bit-exact comparison of dequant_f32).
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)

_ALLOWED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------------------------
# correctly rounded float32 arithmetic
# --------------------------------------------------------------------------------------------
def _f32_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correctly rounded IEEE float32 a / b for float32 a, b (via one float64 division)."""
    return (a.double() / b.double()).float()


def _f32_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correctly rounded IEEE float32 a * b for float32 a, b (the float64 product is exact)."""
    return (a.double() * b.double()).float()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _as_f32_tensor(x: Any, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"amax must be a real number, got dtype {x.dtype} (shape {list(x.shape)})")
        return x.detach().to(device=device, dtype=torch.float32)
    if hasattr(x, "__array__"):  # numpy / jax arrays and scalars
        import numpy as np

        return torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    return torch.tensor(float(x), dtype=torch.float32, device=device)


def scale_from_amax(amax: Any) -> torch.Tensor:
    """``f32(amax) / f32(2688)``, correctly rounded, float32; an amax of 0 is treated as 1.0.

    Works elementwise on tensors (e.g. ``[E]`` per-expert amaxes). Raises ValueError for a negative,
    NaN or infinite amax.
    """
    device = amax.device if isinstance(amax, torch.Tensor) else "cpu"
    a = _as_f32_tensor(amax, device)
    _check_amax_values(a, "amax")
    a = torch.where(a == 0, torch.ones_like(a), a)
    return _f32_div(a, torch.full_like(a, AMAX_DIVISOR))


def _check_amax_values(a: torch.Tensor, what: str) -> None:
    if torch.isnan(a).any():
        raise ValueError(f"{what} contains NaN (shape {list(a.shape)}): {a.tolist()}")
    if torch.isinf(a).any():
        raise ValueError(f"{what} contains Inf (shape {list(a.shape)}): {a.tolist()}")
    if (a < 0).any():
        raise ValueError(f"{what} must be >= 0, got {a.tolist()} (shape {list(a.shape)})")


def check_weight(w: torch.Tensor, *, name: str = "weight") -> None:
    """Validate a weight for NVFP4 quantization (dtype, rank, K % 16, finiteness)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _ALLOWED_DTYPES:
        raise TypeError(
            f"{name}: dtype {w.dtype} (shape {list(w.shape)}) is not supported; "
            f"expected one of bfloat16, float16, float32"
        )
    if w.ndim < 2:
        raise ValueError(f"{name}: expected a tensor [..., N, K], got shape {list(w.shape)}")
    K = w.shape[-1]
    if K % BLOCK != 0:
        raise ValueError(
            f"{name}: last axis K={K} of shape {list(w.shape)} is not a multiple of {BLOCK}; "
            f"such a linear must be left unquantized"
        )
    bad = ~torch.isfinite(w)
    n_bad = int(bad.sum())
    if n_bad:
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        n_nan = int(torch.isnan(w).sum())
        raise ValueError(
            f"{name}: {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} Inf) in tensor of "
            f"shape {list(w.shape)}; first at index {first} = {w[first].item()}"
        )


def round_to_e2m1_codes(y: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Round float32 ``|y|`` to the E2M1 grid (nearest, ties to even, saturating at 6).

    ``y`` holds magnitudes (>= 0); ``negative`` is a bool tensor that sets the sign bit (a negative
    value that rounds to zero keeps it: code 0x8). Returns uint8 codes 0..15.
    """
    a = y.abs()
    idx = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    # thresholds (SPEC section 2 step 4): <=0.25 ->0, <0.75 ->0.5, <=1.25 ->1, <1.75 ->1.5,
    # <=2.5 ->2, <3.5 ->3, <=5 ->4, else 6. Each condition adds one grid step.
    idx += (a > 0.25).to(torch.uint8)
    idx += (a >= 0.75).to(torch.uint8)
    idx += (a > 1.25).to(torch.uint8)
    idx += (a >= 1.75).to(torch.uint8)
    idx += (a > 2.5).to(torch.uint8)
    idx += (a >= 3.5).to(torch.uint8)
    idx += (a > 5.0).to(torch.uint8)
    return idx | (negative.to(torch.uint8) << 3)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., K]`` (values 0..15, K even) -> uint8 ``[..., K/2]``.

    Element ``2j`` goes to the low nibble, ``2j+1`` to the high nibble.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_fp4: expected uint8 codes, got {codes.dtype} (shape {list(codes.shape)})")
    if codes.ndim < 1 or codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: last axis must be even, got shape {list(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_fp4: codes must be in 0..15 (shape {list(codes.shape)})")
    lo = codes[..., 0::2]
    hi = codes[..., 1::2]
    return (lo | (hi << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> uint8 codes ``[..., K]`` (inverse of :func:`pack_fp4`)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_fp4: expected uint8, got {packed.dtype} (shape {list(packed.shape)})")
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _amax_tensor(w32: torch.Tensor, weight_amax: Any, *, check: bool) -> torch.Tensor:
    """Resolve the tensor amax: shape [] or w.shape[:-2] (per leading slice), float32."""
    lead = tuple(w32.shape[:-2])
    if weight_amax is None:
        return w32.abs().amax() if w32.numel() else torch.zeros((), device=w32.device)
    a = _as_f32_tensor(weight_amax, w32.device)
    if a.ndim != 0 and tuple(a.shape) != lead:
        raise ValueError(
            f"weight_amax has shape {list(a.shape)}; expected [] or the leading axes "
            f"{list(lead)} of the weight of shape {list(w32.shape)}"
        )
    _check_amax_values(a, f"weight_amax (weight shape {list(w32.shape)})")
    if check and w32.numel():
        if a.ndim == 0:
            tmax = w32.abs().amax()
        else:
            tmax = w32.abs().flatten(start_dim=len(lead)).amax(dim=-1)
        too_small = a < tmax
        if too_small.any():
            i = tuple(int(v) for v in torch.nonzero(too_small.reshape(a.shape if a.ndim else (1,)))[0].tolist())
            raise ValueError(
                f"weight_amax {a.tolist()} is smaller than max|w| {tmax.tolist()} "
                f"(first at leading index {i}) for weight of shape {list(w32.shape)}"
            )
    return a


def _quantize_f32(w32: torch.Tensor, amax: torch.Tensor):
    """Core of SPEC section 2 on a float32 tensor [..., N, K] and an amax [] or [lead...]."""
    # step 1: tensor scale
    a = torch.where(amax == 0, torch.ones_like(amax), amax)
    ws2 = _f32_div(a, torch.full_like(a, AMAX_DIVISOR))  # [] or lead
    if (ws2 <= 0).any() or (_f32_mul(ws2, torch.full_like(ws2, FP8_MIN_SCALE)) == 0).any():
        raise ValueError(
            f"amax {amax.tolist()} is so small that the float32 scales underflow to zero "
            f"(weight shape {list(w32.shape)})"
        )
    ws2_b = ws2.reshape(ws2.shape + (1,) * 2) if ws2.ndim else ws2  # broadcast over [N, K/16]

    # step 2: block scales
    K = w32.shape[-1]
    blocks = w32.reshape(*w32.shape[:-1], K // BLOCK, BLOCK)
    block_amax = blocks.abs().amax(dim=-1)  # [..., N, K/16]
    six_ws2 = _f32_mul(torch.full_like(ws2_b, FP4_MAX), ws2_b)
    s = _f32_div(block_amax, six_ws2)
    s = torch.where(s == 0, torch.ones_like(s), s)
    s = s.clamp(FP8_MIN_SCALE, FP8_MAX)
    scale_fp8 = s.to(torch.float8_e4m3fn)  # round to nearest even

    # step 3: y = W / (f32(fp8(s)) * ws2), correctly rounded
    divisor = _f32_mul(scale_fp8.float(), ws2_b)
    y = _f32_div(blocks, divisor.unsqueeze(-1))  # [..., N, K/16, 16]

    # step 4: round to E2M1, sign from the input (so -0.0 -> 0x0, tiny negatives -> 0x8)
    codes = round_to_e2m1_codes(y, blocks < 0).reshape(*w32.shape)
    return codes, scale_fp8, ws2


def quantize(w: torch.Tensor, weight_amax: Any = None, *, check: bool = True) -> dict:
    """Quantize a weight ``[..., N, K]`` (bf16/f16/f32) to NVFP4.

    weight_amax:
      * None: ``max|w|`` over the whole tensor (one tensor scale, shape []);
      * a scalar (python number / 0-d tensor): one tensor scale, e.g. a fused group's shared amax;
      * a tensor of shape ``w.shape[:-2]`` (e.g. ``[E]`` for stacked experts ``[E, N, K]``):
        one tensor scale per leading slice; slice ``e`` is then identical to quantizing ``w[e]``
        alone with ``weight_amax[e]``.
    An amax of 0 (all-zero tensor) is treated as 1.0: every code is 0 and every scale finite.

    check=True validates that weight_amax >= max|w| (of its slice). Dtype, K % 16, NaN/Inf and
    amax sign/NaN are always validated.

    Returns dict(weight=uint8 [..., N, K/2], weight_scale=float8_e4m3fn [..., N, K/16],
    weight_scale_2=float32 [] or [lead...]).
    """
    check_weight(w)
    w32 = w.detach().to(torch.float32)
    amax = _amax_tensor(w32, weight_amax, check=check)
    codes, scale_fp8, ws2 = _quantize_f32(w32, amax)
    return {"weight": pack_fp4(codes), "weight_scale": scale_fp8, "weight_scale_2": ws2}


def dequantize(
    weight: Any,
    weight_scale: torch.Tensor | None = None,
    weight_scale_2: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``E2M1[code] * (f32(weight_scale) * weight_scale_2)`` in float32, cast to ``dtype``.

    The scale product is rounded to float32 first, then multiplied by the code value; this order
    (and code 8 -> +0.0) reproduces ModelOpt's dequantized values bit for bit.

    Accepts either the three tensors or the dict returned by :func:`quantize` as first argument.
    ``weight_scale`` may be float8_e4m3fn or its raw uint8 bytes.
    """
    if isinstance(weight, dict):
        if weight_scale is not None or weight_scale_2 is not None:
            raise TypeError("dequantize: pass either a dict or three tensors, not both")
        weight, weight_scale, weight_scale_2 = weight["weight"], weight["weight_scale"], weight["weight_scale_2"]
    if weight_scale.dtype == torch.uint8:
        weight_scale = weight_scale.view(torch.float8_e4m3fn)
    codes = unpack_fp4(weight)
    K = codes.shape[-1]
    if tuple(weight_scale.shape) != tuple(codes.shape[:-1]) + (K // BLOCK,):
        raise ValueError(
            f"dequantize: weight_scale shape {list(weight_scale.shape)} does not match "
            f"weight shape {list(weight.shape)} (expected {list(codes.shape[:-1]) + [K // BLOCK]})"
        )
    ws2 = torch.as_tensor(weight_scale_2, dtype=torch.float32, device=codes.device)
    lead = tuple(codes.shape[:-2])
    if ws2.ndim and tuple(ws2.shape) != lead:
        raise ValueError(
            f"dequantize: weight_scale_2 shape {list(ws2.shape)} must be [] or {list(lead)} "
            f"(weight shape {list(weight.shape)})"
        )
    vals = E2M1_VALUES.to(codes.device)[codes.long()]  # [..., N, K]
    sc = weight_scale.float().repeat_interleave(BLOCK, dim=-1)  # [..., N, K]
    ws2_b = ws2.reshape(ws2.shape + (1, 1)) if ws2.ndim else ws2
    return _f32_mul(vals, _f32_mul(sc, ws2_b)).to(dtype)


def fake_quant(x: torch.Tensor, amax: Any = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` ``[..., K]`` with tensor amax ``amax`` (default max|x|).

    Values beyond ``amax`` saturate (block scale clamped to 448, codes to +-6), as activations do
    with a calibrated input scale. The result has ``x``'s dtype and a straight-through gradient.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fake_quant: expected a torch.Tensor, got {type(x).__name__}")
    squeeze = x.ndim == 1
    xx = x.unsqueeze(0) if squeeze else x
    check_weight(xx, name="fake_quant input")
    x32 = xx.detach().to(torch.float32)
    if amax is None:
        a = x32.abs().amax()
    else:
        a = _as_f32_tensor(amax, x.device)
        if a.ndim != 0:
            raise ValueError(f"fake_quant: amax must be a scalar, got shape {list(a.shape)}")
        _check_amax_values(a, "fake_quant amax")
    codes, scale_fp8, ws2 = _quantize_f32(x32, a)
    dq = dequantize(pack_fp4(codes), scale_fp8, ws2, dtype=torch.float32)
    if squeeze:
        dq = dq.squeeze(0)
    dq = dq.to(x.dtype)
    if x.requires_grad:
        return x + (dq - x).detach()
    return dq
