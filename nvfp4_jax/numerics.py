"""NVFP4 numerics: the only module that knows the bit format (SPEC.md sections 1-3).

Every function is pure ``jnp``, jit-able, works on any leading axes and performs no host round
trips (the optional input checks of :func:`quantize` run only on concrete arrays).

Bit-exactness with ModelOpt needs correctly rounded float32 divisions, and XLA does not promise
them: it may turn ``x / broadcast(d)`` into ``x * (1 / d)``, and GPUs may use an approximate
division. So no result here depends on how the backend divides:

* the few per-tensor and per-block divisions (``amax / 2688`` and ``block_amax / (6 * s2)``) are
  done by :func:`_div_rn`, an integer long division that gives the IEEE round-to-nearest-even
  float32 quotient on every backend;
* the per-element division ``y = |w| / d`` only feeds the rounding to the E2M1 grid. An
  approximate quotient decides every element that is not within 2^-8 (relative) of a rounding
  threshold; for the others the comparison of the correctly rounded quotient with the threshold is
  decided exactly from ``|w| - t * d`` computed without rounding error (see
  :func:`_passes_threshold`).
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

BLOCK = 16
FP4_MAX = 6.0
FP8_MAX = 448.0
FP8_MIN_SUBNORMAL = 2.0**-9
AMAX_DIVISOR = FP4_MAX * FP8_MAX  # 2688

#: code -> value, sign in bit 3 (code 8, a negative value rounded to zero, decodes to +0.0 as in
#: ModelOpt's dequantization).
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)

# Rounding |y| to the E2M1 grid: index = number of thresholds passed.  ``inclusive`` thresholds
# are "<= t stays below" (the tie goes down to the even grid point), the others "< t stays below".
_THRESHOLDS = ((0.25, True), (0.75, False), (1.25, True), (1.75, False), (2.5, True), (3.5, False),
               (5.0, True))

_F32 = jnp.float32


@flax.struct.dataclass
class NVFP4Tensor:
    """A weight in NVFP4, with the tensor names of a ModelOpt checkpoint.

    Invariants, for a source weight ``w`` of shape ``[..., N, K]`` with ``K % 16 == 0``:

    * ``weight``: uint8 ``[..., N, K // 2]``; element ``2j`` of a row in the low nibble, ``2j + 1``
      in the high nibble; a nibble is ``sign << 3 | index`` into ``0, .5, 1, 1.5, 2, 3, 4, 6``.
    * ``weight_scale``: float8_e4m3fn ``[..., N, K // 16]``, one per block of 16 along K; finite,
      in ``[2^-9, 448]``.
    * ``weight_scale_2``: float32, ``[]`` for one tensor scale, or one per leading index (``[E]``
      for stacked experts quantized one by one); finite and positive.

    Reconstruction (``dequantize``): ``E2M1[code] * f32(weight_scale[..., n, k // 16]) *
    weight_scale_2``.

    >>> t = quantize(jnp.ones((4, 32), jnp.bfloat16))
    >>> dequantize(t).tolist()[0][:2]
    [1.0, 1.0]
    """

    weight: jax.Array
    weight_scale: jax.Array
    weight_scale_2: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the unquantized tensor."""
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 2)


# ---------------------------------------------------------------------------------------------
# exact helpers


def _f32_from_bits(bits):
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32), _F32)


def _bits(x):
    return jax.lax.bitcast_convert_type(x.astype(_F32), jnp.uint32)


def _pow2(e):
    """2**e as float32 for integer e in [-126, 127] (exact, built from bits)."""
    return _f32_from_bits((e.astype(jnp.int32) + 127).astype(jnp.uint32) << 23)


def _split_f32(x):
    """x (finite, >= 0) as (mantissa uint32 in [2^23, 2^24), unbiased exponent int32); x != 0."""
    b = _bits(x)
    exp_field = (b >> 23).astype(jnp.int32)
    frac = b & jnp.uint32(0x7FFFFF)
    # subnormals: normalise the fraction
    lz = jax.lax.clz(frac) - 8  # leading zeros inside the 24-bit field
    sub = exp_field == 0
    mant = jnp.where(sub, frac << jnp.maximum(lz, 0).astype(jnp.uint32), frac | jnp.uint32(1 << 23))
    exp = jnp.where(sub, -126 - lz, exp_field - 127)
    return mant, exp


def _div_rn(a, b):
    """Correctly rounded (round-to-nearest-even) float32 ``a / b`` for finite a >= 0, b > 0.

    Integer long division on the mantissas, so it does not depend on the backend's division.
    Results below the float32 normal range are flushed towards zero by an ordinary multiply (never
    reached by the callers: a tensor amax below ~3e-35 is treated as such a corner case).
    """
    a = a.astype(_F32)
    b = b.astype(_F32)
    ma, ea = _split_f32(jnp.where(a == 0, 1.0, a))
    mb, eb = _split_f32(b)
    shift = ma < mb  # quotient in (0.5, 1): take one more dividend bit
    r = jnp.where(shift, ma << 1, ma)
    e = ea - eb - shift.astype(jnp.int32)
    q = jnp.zeros_like(ma)
    for _ in range(24):  # quotient bits, r < 2 * mb < 2^25 throughout
        ge = r >= mb
        q = (q << 1) | ge.astype(jnp.uint32)
        r = jnp.where(ge, r - mb, r) << 1
    guard = r >= mb
    sticky = jnp.where(guard, r - mb, r) != 0
    round_up = guard & (sticky | ((q & 1) == 1))
    q = q + round_up.astype(jnp.uint32)
    carry = q == (1 << 24)
    q = jnp.where(carry, q >> 1, q)
    e = e + carry.astype(jnp.int32)
    # q * 2^(e - 23), scaled in two exact steps so the exponent may leave [-126, 127] in between
    e1 = jnp.clip(e - 23, -126, 127)
    out = q.astype(_F32) * _pow2(e1) * _pow2(jnp.clip(e - 23 - e1, -126, 127))
    return jnp.where(a == 0, 0.0, out)


def _round_to_e4m3(s):
    """float32 in [2^-9, 448] -> nearest E4M3FN value (ties to even), returned as float32."""
    b = _bits(s)
    lsb = (b >> 20) & 1
    normal = _f32_from_bits((b + jnp.uint32(0x7FFFF) + lsb) & jnp.uint32(0xFFF00000))
    # below 2^-6 the E4M3 grid is uniform with step 2^-9; scaling by 2^9 is exact
    sub = jnp.round(s * _F32(512.0)) * _F32(2.0**-9)
    return jnp.where(s < 2.0**-6, sub, normal)


def _passes_threshold(mag, y_approx, d, t, inclusive):
    """Whether fl(mag / d) (IEEE, round to nearest even) lies above the E2M1 threshold ``t``.

    Far from ``t`` the approximate quotient decides. Near it, ``mag - t*d`` is computed exactly:
    ``d = d_hi + d_lo`` with 12 significant bits each, so ``t*d_hi`` and ``t*d_lo`` are exact
    (t has at most 3 significant bits); ``mag - t*d_hi`` is exact by Sterbenz's lemma and the
    second subtraction is exact because both operands are small multiples of a common quantum.
    fl(y) <= t  iff  y <= t + ulp(t)/2 (the tie rounds to t, which is even); fl(y) < t iff
    y < t - ulp(t)/2 (t is never a power of two there).
    """
    d_hi = _f32_from_bits(_bits(d) & jnp.uint32(0xFFFFF000))
    d_lo = d - d_hi
    residual = (mag - _F32(t) * d_hi) - _F32(t) * d_lo  # == mag - t*d exactly
    half_ulp = float(2.0 ** (np.floor(np.log2(t)) - 24))
    bound = d * _F32(half_ulp)  # exact: power-of-two scaling
    exact = residual > bound if inclusive else residual >= -bound
    approx = y_approx > t if inclusive else y_approx >= t
    near = jnp.abs(y_approx - _F32(t)) <= _F32(t * 2.0**-8)
    return jnp.where(near, exact, approx)


# ---------------------------------------------------------------------------------------------
# public numerics


def scale_from_amax(amax) -> jax.Array:
    """Tensor (or input) scale ``f32(amax) / 2688``, correctly rounded; an amax of 0 counts as 1.

    SPEC section 2 step 1 and section 3. We differ from ModelOpt for amax 0 (it writes NaN).
    """
    amax = jnp.asarray(amax, _F32)
    amax = jnp.where(amax == 0, _F32(1.0), amax)
    return _div_rn(amax, jnp.full_like(amax, AMAX_DIVISOR))


def pack_fp4(codes) -> jax.Array:
    """uint8 codes ``[..., K]`` (values 0..15), K even -> packed uint8 ``[..., K // 2]``."""
    codes = jnp.asarray(codes, jnp.uint8)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    # view each pair as one little-endian uint16 (element 2j is the low byte): XLA fuses this with
    # the producer of the codes, where strided slicing of the pairs does not vectorize on CPU
    v = jax.lax.bitcast_convert_type(pairs, jnp.uint16)
    return ((v & 0xF) | ((v >> 4) & 0xF0)).astype(jnp.uint8)


def unpack_fp4(packed) -> jax.Array:
    """packed uint8 ``[..., K // 2]`` -> uint8 codes ``[..., K]``."""
    packed = jnp.asarray(packed, jnp.uint8)
    codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _block_scales(blocks_abs_max, scale_2):
    """E4M3 block scales (as float32 values) from per-block amax and the tensor scale."""
    s = _div_rn(blocks_abs_max, jnp.broadcast_to(_F32(6.0) * scale_2, blocks_abs_max.shape))
    s = jnp.where(s == 0, _F32(1.0), s)
    s = jnp.clip(s, _F32(FP8_MIN_SUBNORMAL), _F32(FP8_MAX))
    return _round_to_e4m3(s)


def _quantize_core(w, amax):
    """w: float [..., N, K]; amax: float32 broadcastable to w.shape[:-2] -> (codes, scale_f32, s2)."""
    wf = w.astype(_F32)
    *lead, n, k = wf.shape
    scale_2 = scale_from_amax(amax)  # [...lead] or []
    blocks = wf.reshape(*lead, n, k // BLOCK, BLOCK)
    mag = jnp.abs(blocks)
    s2_b = scale_2[..., None, None] if scale_2.ndim else scale_2
    scale = _block_scales(jnp.max(mag, axis=-1), s2_b)  # [..., N, K/16] float32 (exact e4m3)
    d_block = scale * s2_b  # the float32 product divisor of step 3, one per block
    d = jnp.broadcast_to(d_block[..., None], mag.shape)
    # approximate quotient (reciprocal per block): it only decides elements far from a threshold
    y = mag * (_F32(1.0) / d_block)[..., None]
    idx = jnp.zeros(mag.shape, jnp.uint8)
    for t, inclusive in _THRESHOLDS:
        idx = idx + _passes_threshold(mag, y, d, t, inclusive).astype(jnp.uint8)
    sign = (blocks < 0).astype(jnp.uint8) << 3  # -0.0 < 0 is False: -0.0 gives code 0
    codes = (idx | sign).reshape(*lead, n, k)
    return codes, scale, scale_2


@jax.jit
def _quantize_jit(w, amax):
    codes, scale, scale_2 = _quantize_core(w, amax)
    return NVFP4Tensor(
        weight=pack_fp4(codes),
        weight_scale=scale.astype(jnp.float8_e4m3fn),
        weight_scale_2=scale_2,
    )


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_input(w, amax) -> None:
    shape = tuple(w.shape)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"NVFP4 quantize needs a floating tensor, got {w.dtype} of shape {shape}")
    if w.ndim < 2:
        raise ValueError(f"NVFP4 quantize needs a tensor [..., N, K], got shape {shape}")
    if shape[-1] % BLOCK:
        raise ValueError(
            f"K (last axis) must be a multiple of {BLOCK} for NVFP4, got shape {shape}; "
            "leave this linear unquantized instead of padding it")
    if amax is not None:
        a = jnp.asarray(amax)
        if not jnp.issubdtype(a.dtype, jnp.floating) and not jnp.issubdtype(a.dtype, jnp.integer):
            raise TypeError(f"weight_amax must be a number, got {a.dtype}")
        if a.ndim > max(w.ndim - 2, 0) or tuple(a.shape) != tuple(shape[:a.ndim]):
            raise ValueError(
                f"weight_amax of shape {tuple(a.shape)} does not match the leading axes of the "
                f"tensor of shape {shape} (use [] or one value per leading index)")
    if not (_is_concrete(w) and (amax is None or _is_concrete(amax))):
        return  # under jit: value checks are the caller's job
    bad = ~jnp.isfinite(w)
    n_bad = int(jnp.sum(bad))
    if n_bad:
        first = tuple(int(i) for i in np.unravel_index(int(jnp.argmax(bad.reshape(-1))), shape))
        raise ValueError(f"tensor of shape {shape} has {n_bad} NaN/Inf value(s); first at index {first}")
    if amax is not None:
        a = np.asarray(jnp.asarray(amax, _F32))
        if np.any(~np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"weight_amax must be finite and >= 0, got {a} for tensor of shape {shape}")
        own = np.asarray(jnp.max(jnp.abs(w.astype(_F32)).reshape(*a.shape, -1), axis=-1))
        if np.any(own > a):
            raise ValueError(
                f"weight_amax {a} is smaller than the tensor's own max |w| {own} (shape {shape}); "
                "a group amax must be the max over the group's members")


def tensor_amax(w, per_leading: bool = False) -> jax.Array:
    """max |w| in float32: over the whole tensor, or one per leading index (``[E]`` for [E, N, K])."""
    a = jnp.abs(jnp.asarray(w).astype(_F32))
    if per_leading and a.ndim > 2:
        return jnp.max(a.reshape(*a.shape[:-2], -1), axis=-1)
    return jnp.max(a)


def quantize(w, weight_amax=None, *, check: bool = True) -> NVFP4Tensor:
    """Quantize ``w`` ``[..., N, K]`` to NVFP4, bit-identical to ModelOpt's export.

    ``weight_amax``: ``None`` takes max |w| over the whole tensor (the lazy rule of SPEC section 5);
    a scalar is a caller's (group) amax; a ``[E]`` array for an ``[E, N, K]`` tensor gives one
    tensor scale per expert, with the same bytes as quantizing each expert alone.

    >>> t = quantize(jnp.linspace(-6, 6, 32, dtype=jnp.float32).reshape(2, 16))
    >>> t.weight.shape, t.weight_scale.shape, t.weight_scale_2.shape
    ((2, 8), (2, 1), ())
    """
    w = jnp.asarray(w)
    if check:
        _check_input(w, weight_amax)
    amax = tensor_amax(w) if weight_amax is None else jnp.asarray(weight_amax, _F32)
    return _quantize_jit(w, amax)


def dequantize(t: NVFP4Tensor, dtype=jnp.float32) -> jax.Array:
    """Reconstruct ``E2M1[code] * (f32(weight_scale) * weight_scale_2)`` and cast to ``dtype``
    (ModelOpt's order of the two products)."""
    codes = unpack_fp4(t.weight)
    vals = jnp.asarray(E2M1_VALUES)[codes.astype(jnp.int32)]
    *lead, n, k = vals.shape
    blocks = vals.reshape(*lead, n, k // BLOCK, BLOCK)
    s2 = t.weight_scale_2.astype(_F32)
    s2 = s2[..., None, None, None] if s2.ndim else s2
    out = blocks * (t.weight_scale.astype(_F32)[..., None] * s2)
    return out.reshape(*lead, n, k).astype(dtype)


@jax.custom_vjp
def fake_quant(x, amax):
    """Quantize then dequantize ``x`` with tensor amax ``amax`` (e.g. a calibrated input amax) and
    dynamic per-block scales, in one jitted call; the gradient passes straight through."""
    return _fake_quant_impl(x, amax)


@jax.jit
def _fake_quant_impl(x, amax):
    k = x.shape[-1]
    rows = x.reshape(-1, k)  # activations: any leading axes, one tensor scale
    codes, scale, scale_2 = _quantize_core(rows, jnp.asarray(amax, _F32))
    vals = jnp.asarray(E2M1_VALUES)[codes.astype(jnp.int32)]
    out = vals.reshape(-1, k // BLOCK, BLOCK) * (scale[..., None] * scale_2)
    return out.reshape(x.shape).astype(x.dtype)


def _fq_fwd(x, amax):
    return _fake_quant_impl(x, amax), None


def _fq_bwd(_, g):
    return g, None


fake_quant.defvjp(_fq_fwd, _fq_bwd)


def input_scale_from_amax(amax) -> jax.Array:
    """``input_scale`` of a linear from its calibrated input amax (SPEC section 3)."""
    return scale_from_amax(amax)


def fp8_bytes(scale) -> np.ndarray:
    """Raw uint8 view of an E4M3FN array (for byte comparisons and writing)."""
    return np.asarray(scale).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


__all__ = [
    "BLOCK", "FP4_MAX", "FP8_MAX", "AMAX_DIVISOR", "E2M1_VALUES", "NVFP4Tensor", "quantize",
    "dequantize", "fake_quant", "pack_fp4", "unpack_fp4", "scale_from_amax", "tensor_amax",
    "input_scale_from_amax", "fp8_bytes",
]
