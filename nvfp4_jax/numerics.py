"""NVFP4 numerics: the only module that knows the bit format (SPEC.md sections 1-3).

Every function is pure ``jnp``, jit-able, works on any leading axes and performs no host round
trips (the optional input checks of :func:`quantize` run only on concrete arrays).

Bit-exactness with ModelOpt needs correctly rounded float32 divisions, and XLA does not promise
them: it may turn ``x / broadcast(d)`` into ``x * (1 / d)``, and GPUs may use an approximate
division. So no result here depends on how the backend divides:

* the tensor scale ``amax / 2688`` is done by :func:`_div_rn`, an integer long division that gives
  the IEEE round-to-nearest-even float32 quotient on every backend;
* every other rounding decision (the E4M3 block scale of ``fl(block_amax / fl(6 * s2))`` and the
  E2M1 index of ``fl(|w| / d)``) is a comparison of the input's magnitude bits with an exact
  decision bound: the smallest float32 whose correctly rounded quotient passes a rounding
  threshold, found from an approximate product and an exact residual test (see
  :func:`_decision_bounds`). A block's divisor depends only on its E4M3 scale code (127 values)
  and the tensor scale, so the bounds are tables of 127 entries per tensor, and quantizing is
  two passes over the weight (block maxima; then compare and pack) with integer compares per
  element (see :func:`_quantize_core`).
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


def _decision_bounds(d, t, inclusive):
    """Exact decision bounds of a rounding of ``fl(m / d)``: for float32 ``d > 0`` and thresholds
    ``t`` (float32 with at most 5 significant bits, not powers of two; ``d`` and ``t`` broadcast
    together), the bit pattern (uint32) of the smallest float32 ``m >= 0`` for which the correctly
    rounded (round to nearest even) quotient ``fl(m / d)`` passes ``t``: lies above it
    (``inclusive``: a quotient equal to ``t`` stays below) or at or above it.

    fl(y) > t iff y > t + ulp(t)/2 (the tie rounds to t, which is even), fl(y) >= t iff
    y >= t - ulp(t)/2. ``c = fl(t * d)`` is within 2 float32 steps of the bound, so the bound is
    ``c - 1 step`` plus the number of the candidates ``c - 1, c, c + 1`` (float32 steps) that fail.
    Each candidate ``m`` is tested with ``m - t*d`` computed without rounding error: ``d = d_hi +
    d_lo`` with 12 significant bits each, so ``t*d_hi`` and ``t*d_lo`` are exact; ``m - t*d_hi`` is
    exact by Sterbenz's lemma (m is within 2 steps of t*d) and the second subtraction is exact
    because both operands are small multiples of a common quantum (ulp(d) times the last bit of
    t). Only exact float32 products, subtractions and comparisons: the result does not depend on
    how the backend divides (and an FMA contraction of an exact product changes nothing).
    """
    t = np.asarray(t, np.float32)
    half_ulp = jnp.asarray((2.0 ** (np.floor(np.log2(t)) - 24)).astype(np.float32))
    t = jnp.asarray(t)
    d_hi = _f32_from_bits(_bits(d) & jnp.uint32(0xFFFFF000))
    d_lo = d - d_hi
    td_hi = t * d_hi  # exact
    td_lo = t * d_lo  # exact
    bound = d * half_ulp  # d * ulp(t) / 2, exact
    cb = _bits(t * d)
    fails = jnp.zeros(cb.shape, jnp.uint32)
    for k in (-1, 0, 1):
        m = _f32_from_bits(cb + jnp.uint32(k & 0xFFFFFFFF))
        residual = (m - td_hi) - td_lo  # == m - t*d exactly
        ok = jnp.where(inclusive, residual > bound, residual >= -bound)
        fails = fails + (~ok).astype(jnp.uint32)
    return cb - jnp.uint32(1) + fails


# E4M3FN: code c (0..126, sign bit clear) -> value; the positive finite codes are 1..126 (2^-9..448)
_E4M3_VALUES = np.arange(128, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
_E4M3_VALUES[127] = FP8_MAX  # code 127 is NaN; never produced (a placeholder for the tables)
# boundary between codes c and c + 1 (c = 1..125): the midpoint, tie to the code with even mantissa
_E4M3_MID = np.concatenate([[1.0], (_E4M3_VALUES[1:126] + _E4M3_VALUES[2:127]) / 2]).astype(np.float32)
_E4M3_MID_INCLUSIVE = np.arange(1, 126) % 2 == 0  # midpoint after code c: tie goes down if c even
_E4M3_ONE = 0x38  # code of 1.0


def _magnitude_keys(w):
    """(key, negative, bits) for w: ``key`` orders |w| like its value (bit pattern without the sign),
    16-bit for bfloat16 inputs, 32-bit otherwise; ``negative`` is True for w < 0 (not for -0.0)."""
    if w.dtype == jnp.bfloat16:
        b = jax.lax.bitcast_convert_type(w, jnp.uint16)
        return b & jnp.uint16(0x7FFF), b > jnp.uint16(0x8000), 16
    b = _bits(w)
    return b & jnp.uint32(0x7FFFFFFF), b > jnp.uint32(0x80000000), 32


def _key_to_f32(key, nbits):
    return _f32_from_bits(key.astype(jnp.uint32) << 16) if nbits == 16 else _f32_from_bits(key)


def _bound_key(bound_bits, nbits):
    """Smallest key of the input format whose value is >= the float32 bound."""
    if nbits == 16:
        return ((bound_bits + jnp.uint32(0xFFFF)) >> 16).astype(jnp.uint16)
    return bound_bits


def _materialize(x, one, integer_one):
    """``x`` unchanged, but computed once: XLA would otherwise fuse per-block work into the
    per-element loop and redo it for each of the 16 elements of a block (an optimization barrier is
    expanded away before fusion). XLA does not fuse a division into a consumer that reuses its
    elements, so ``x`` goes through an exact division by a run-time 1 (``one``: not known to the
    compiler) of its own type."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return jax.lax.div(x, jnp.broadcast_to(integer_one.astype(x.dtype), x.shape))
    return x / one


def _bounds_per_block() -> bool:
    """Layout of the per-element bounds (same bytes either way): per-block array on GPU/TPU,
    look-ups inside the per-element loop on CPU (measured faster there). NVFP4_BOUNDS=block|inline
    overrides."""
    import os

    mode = os.environ.get("NVFP4_BOUNDS", "")
    if mode:
        return mode == "block"
    return jax.default_backend() != "cpu"


def _quantize_core(w, amax, *, amax_from_blocks: bool = False):
    """w: float [..., N, K]; amax: float32 broadcastable to w.shape[:-2] (or None with
    amax_from_blocks: max |w| of the whole tensor, taken from the block maxima)
    -> (codes uint8 [..., N, K], scale_f32 [..., N, K/16], s2).

    Every step compares keys: the bit pattern of |w| without its sign, which orders magnitudes
    (16-bit for bfloat16, 32-bit for float32), against exact decision bounds. The block scale and
    the divisor d of a block depend only on the block's E4M3 scale code (127 values) and the
    tensor scale, so the bounds are computed once per tensor into tables of 127 entries:

    * scale: ``fp8(clamp(fl(block_amax / fl(6 * s2))))`` is decided by 125 bounds on block_amax
      (the E4M3 midpoints times ``fl(6 * s2)``, see :func:`_decision_bounds`); an approximate
      quotient picks the code up to one step and two table look-ups correct it;
    * codes: for each scale code the 7 bounds on |w| for the E2M1 thresholds of ``fl(|w| / d)``
      with ``d = fl(scale * s2)`` (SPEC section 2 step 3-4), gathered per block and compared with
      the keys of the block's 16 elements.
    """
    if w.dtype not in (jnp.bfloat16, jnp.float32):
        w = w.astype(_F32)
    *lead, n, k = w.shape
    key, neg, nbits = _magnitude_keys(w.reshape(*lead, n, k // BLOCK, BLOCK))
    block_key = jnp.max(key, axis=-1)  # [..., N, K/16]: max |w| of each block, as bits
    block_amax = _key_to_f32(block_key, nbits)
    if amax_from_blocks:
        amax = jnp.max(block_amax)
    scale_2 = scale_from_amax(amax)  # [...lead] or []
    nlead = int(np.prod(lead)) if scale_2.ndim else 1
    s2 = jnp.broadcast_to(scale_2, lead if scale_2.ndim else ()).reshape(nlead, 1)
    one = (jnp.max(s2) > 0).astype(_F32)  # 1.0, not known to the compiler
    # per-tensor tables, [L, 128] (L: one row per tensor scale)
    six_s2 = _F32(6.0) * s2
    mid_bounds = _decision_bounds(six_s2, _E4M3_MID, np.concatenate([[True], _E4M3_MID_INCLUSIVE]))  # [L, 126]: bound of code c + 1
    lo = jnp.zeros((nlead, 2), jnp.uint32)  # codes 0 and 1: any block amax reaches code 1
    hi = jnp.full((nlead, 1), 0x7F800000, jnp.uint32)  # code 127: never
    scale_tab = jnp.concatenate([lo, mid_bounds[:, 1:], hi], axis=1)  # [L, 128]
    ione = (one > 0).astype(jnp.int32)
    # the tables are ascending along their last axis: sorting them changes nothing, but XLA never
    # fuses a sort, so they are computed once rather than inside every look-up
    scale_tab = jnp.sort(_bound_key(scale_tab, nbits), axis=-1)
    d_tab = jnp.asarray(_E4M3_VALUES)[None, :] * s2  # [L, 128]: the divisor of step 3
    thr = np.array([t for t, _ in _THRESHOLDS], np.float32)[:, None, None]
    inc = np.array([i for _, i in _THRESHOLDS])[:, None, None]
    elem_tab = _bound_key(_decision_bounds(d_tab[None], thr, inc), nbits)  # [7, L, 128]
    elem_tab = jnp.sort(elem_tab, axis=-1)  # ascending in the scale code as well
    # per block: approximate scale code, then the exact correction from the table
    bk = block_key.reshape(nlead, -1)  # [L, NB]
    q = _key_to_f32(bk, nbits) * (_F32(1.0) / six_s2)
    q = jnp.clip(q, _F32(FP8_MIN_SUBNORMAL), _F32(FP8_MAX))
    code = jax.lax.bitcast_convert_type(q.astype(jnp.float8_e4m3fn), jnp.uint8).astype(jnp.int32)
    up = bk >= jnp.take_along_axis(scale_tab, code + 1, axis=1)
    down = bk < jnp.take_along_axis(scale_tab, code, axis=1)
    code = code + up.astype(jnp.int32) - down.astype(jnp.int32)
    code = jnp.where(bk == 0, _E4M3_ONE, code)  # an all-zero block: s = 0 -> 1.0
    code = _materialize(code, one, ione)
    # per element: the 7 bounds of its block's scale code, looked up in the table (one look-up per
    # block once the compiler hoists it out of the 16 elements)
    code_b = code.reshape(*lead, n, k // BLOCK)
    lead_idx = (jnp.arange(nlead, dtype=jnp.int32).reshape(*lead, 1, 1) if scale_2.ndim and lead
                else jnp.zeros((), jnp.int32))
    idx = jnp.zeros(key.shape, jnp.uint8)
    if _bounds_per_block():
        # accelerators: gather the 7 bounds once per block into an array (materialized), then a
        # plain broadcast compare per element
        bounds = jnp.stack([elem_tab[j][lead_idx, code_b] for j in range(len(_THRESHOLDS))])
        bounds = _materialize(bounds, one, ione)
        for j in range(len(_THRESHOLDS)):
            idx = idx + (key >= bounds[j][..., None]).astype(jnp.uint8)
    else:
        for j in range(len(_THRESHOLDS)):
            idx = idx + (key >= elem_tab[j][lead_idx, code_b][..., None]).astype(jnp.uint8)
    codes = (idx | (neg.astype(jnp.uint8) << 3)).reshape(*lead, n, k)
    scale = jax.lax.bitcast_convert_type(code.astype(jnp.uint8), jnp.float8_e4m3fn)
    scale = scale.astype(_F32).reshape(*lead, n, k // BLOCK)
    return codes, scale, scale_2


def _pack_result(codes, scale, scale_2):
    return NVFP4Tensor(
        weight=pack_fp4(codes),
        weight_scale=scale.astype(jnp.float8_e4m3fn),
        weight_scale_2=scale_2,
    )


@jax.jit
def _quantize_jit(w, amax):
    return _pack_result(*_quantize_core(w, amax))


@jax.jit
def _quantize_own_amax_jit(w):
    return _pack_result(*_quantize_core(w, None, amax_from_blocks=True))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_amax_shape(w, amax) -> None:
    """``amax`` is ``[]`` (one tensor scale) or exactly ``w.shape[:-2]`` (one per leading index).

    A prefix of the leading shape is refused: it would broadcast against the trailing leading axes
    (numpy aligns shapes on the right), which silently applies it along the wrong axis."""
    a = jnp.asarray(amax)
    if not jnp.issubdtype(a.dtype, jnp.floating) and not jnp.issubdtype(a.dtype, jnp.integer):
        raise TypeError(f"weight_amax must be a number, got {a.dtype}")
    lead = tuple(w.shape[:-2])
    if a.ndim and tuple(a.shape) != lead:
        raise ValueError(
            f"weight_amax of shape {tuple(a.shape)} does not fit the tensor of shape {tuple(w.shape)}: "
            f"use a scalar [] or one value per leading index, shape {list(lead)}")


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
        _check_amax_shape(w, amax)
    if not (_is_concrete(w) and (amax is None or _is_concrete(amax))):
        return  # under jit: value checks are the caller's job
    amax_ndim = 0 if amax is None else jnp.ndim(amax)
    rows = np.asarray(jax.device_get(_row_abs_max(w)))  # one fused pass, one small transfer
    # a row holding NaN or Inf comes back NaN (see _row_abs_max); numpy's max then keeps it
    own = np.max(rows.reshape(*shape[:amax_ndim], -1), axis=-1)
    if not np.all(np.isfinite(own)):
        bad = ~jnp.isfinite(w)
        n_bad = int(jnp.sum(bad))
        first = tuple(int(i) for i in np.unravel_index(int(jnp.argmax(bad.reshape(-1))), shape))
        raise ValueError(f"tensor of shape {shape} has {int(n_bad)} NaN/Inf value(s); first at index {first}")
    if amax is not None:
        a = np.asarray(jnp.asarray(amax, _F32))
        if np.any(~np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"weight_amax must be finite and >= 0, got {a} for tensor of shape {shape}")
        if np.any(own > a):
            raise ValueError(
                f"weight_amax {a} is smaller than the tensor's own max |w| {own} (shape {shape}); "
                "a group amax must be the max over the group's members")
    check_amax_range(own if amax is None else np.asarray(jnp.asarray(amax, _F32)), f"tensor of shape {shape}")


#: the smallest non-zero amax whose tensor scale amax / 2688 is a normal float32. Below it the scale
#: is subnormal, which XLA on CPU flushes to zero (and the block scales would become NaN), so such
#: a tensor (all |w| < 3.2e-35: zeros in all but name) is refused instead of written wrong.
MIN_NONZERO_AMAX = float(np.float32(np.finfo(np.float32).tiny) * np.float32(AMAX_DIVISOR))


def check_amax_range(amax, what: str) -> None:
    """Raise ValueError for an amax in (0, MIN_NONZERO_AMAX): not representable (see above)."""
    a = np.asarray(amax, np.float64)
    tiny = (a > 0) & (a < MIN_NONZERO_AMAX)
    if np.any(tiny):
        raise ValueError(f"{what}: amax {float(a[tiny].reshape(-1)[0]):.3e} is below {MIN_NONZERO_AMAX:.3e}, where "
                         "the NVFP4 tensor scale (amax / 2688) is no longer a normal float32; such a tensor is "
                         "zero in all but name: leave it unquantized or zero it")


@jax.jit
def _row_abs_max(w):
    """max |w| of every row (last axis); NaN where the row holds a NaN or an Inf.

    XLA's max reductions do not reliably propagate NaN on CPU (vectorized max keeps whichever
    operand the instruction prefers), so NaN/Inf are caught by a sum of ``w * 0``, which is NaN
    exactly when the row has one (addition always propagates NaN) and +-0 otherwise."""
    a = w.astype(_F32)
    return jnp.max(jnp.abs(a), axis=-1) + jnp.sum(a * _F32(0.0), axis=-1)


def tensor_amax(w, per_leading: bool = False) -> jax.Array:
    """max |w| in float32: over the whole tensor, or one per leading index (``[E]`` for [E, N, K])."""
    a = jnp.abs(jnp.asarray(w).astype(_F32))
    if per_leading and a.ndim > 2:
        return jnp.max(a.reshape(*a.shape[:-2], -1), axis=-1)
    return jnp.max(a)


def abs_max_or_nan(w, per_leading: bool = False) -> jax.Array:
    """max |w| as float32, NaN where ``w`` holds a NaN or an Inf; over the whole tensor, or with
    ``per_leading`` one per leading index (``[E]`` for ``[E, N, K]``); jit-able.

    A max over the magnitude keys (the bit pattern without the sign, see :func:`_magnitude_keys`):
    an integer reduction reading ``w`` once with no float32 copy (for bfloat16 inputs); the keys
    order magnitudes, so the key of the maximum is the maximum's bits, and a NaN's key is above
    every other. Where the last axis is a multiple of BLOCK the keys are reduced per block first
    and the block maxima taken as float32, the very expressions :func:`quantize` computes, so
    inside one jitted program XLA computes them once for both (reducing the integer block keys
    instead made XLA:CPU read the weight once more); the float max keeps a NaN (XLA's max
    propagates it) and an Inf is turned into NaN."""
    if w.dtype not in (jnp.bfloat16, jnp.float32):
        w = w.astype(_F32)
    lead = w.shape[:-2] if per_leading and w.ndim > 2 else ()
    if w.ndim >= 2 and w.shape[-1] % BLOCK == 0:
        key, _, nbits = _magnitude_keys(w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK))
        top = jnp.max(_key_to_f32(jnp.max(key, axis=-1), nbits).reshape(*lead, -1), axis=-1)
        return jnp.where(jnp.isinf(top), _F32(jnp.nan), top)
    key, _, nbits = _magnitude_keys(w)
    top = jnp.max(key.reshape(*lead, -1), axis=-1)
    inf_key = 0x7F80 if nbits == 16 else 0x7F800000
    return jnp.where(top >= inf_key, _F32(jnp.nan), _key_to_f32(top, nbits))


def _e2m1_magnitude(nibble):
    """|value| of E2M1 codes (the low 3 bits of ``nibble``) as float32, by arithmetic: 0, .5, 1, 1.5
    for indices 0-3 (half the index), then 2, 3, 4, 6 (the extra halves and one above 4 and 6).
    A table look-up would be a gather, which XLA:CPU runs per element."""
    i = (nibble & 7).astype(_F32)
    return _F32(0.5) * i + _F32(0.5) * jnp.maximum(i - 4, 0) + jnp.maximum(i - 6, 0)


def squared_error(w, t: NVFP4Tensor):
    """``(sum (w - dequantize(t))^2, sum w^2)`` in float32, one value per leading index of ``w``
    ``[..., N, K]`` (``[]`` for one tensor); jit-able.

    Computed on the packed codes (two elements per byte, no unpacked copy) with one fused
    reduction that reads ``w`` once: ``|w| - |dequant|`` per element (the dequantized value has
    the sign of ``w``, or is zero), summed per block by a variadic reduce (which XLA:CPU keeps in
    a loop rather than an unfused library call that would materialize float32 temporaries of the
    whole tensor), then over the block sums."""
    *lead, n, k = w.shape
    kb = k // BLOCK
    if w.dtype == jnp.bfloat16:  # the two bf16 elements of a byte, as the halves of one uint32
        u = jax.lax.bitcast_convert_type(w.reshape(*lead, n, kb, BLOCK // 2, 2), jnp.uint32)
        x_lo = jnp.abs(jax.lax.bitcast_convert_type(u << 16, _F32))
        x_hi = jnp.abs(jax.lax.bitcast_convert_type(u & jnp.uint32(0xFFFF0000), _F32))
    else:
        x = jnp.abs(w.astype(_F32)).reshape(*lead, n, kb, BLOCK // 2, 2)
        x_lo, x_hi = x[..., 0], x[..., 1]
    s2 = t.weight_scale_2.astype(_F32)
    s2 = s2[..., None, None] if s2.ndim else s2
    d = (t.weight_scale.astype(_F32) * s2)[..., None]  # dequantize's product order
    p = t.weight.reshape(*lead, n, kb, BLOCK // 2)
    e_lo = x_lo - _e2m1_magnitude(p) * d
    e_hi = x_hi - _e2m1_magnitude(p >> 4) * d
    zero = _F32(0.0)
    # per block first: one float32 accumulator over millions of terms would lose about 1%
    err, norm = jax.lax.reduce((e_lo * e_lo + e_hi * e_hi, x_lo * x_lo + x_hi * x_hi), (zero, zero),
                               lambda a, b: (a[0] + b[0], a[1] + b[1]), (len(lead) + 2,))
    return jnp.sum(err, axis=(-2, -1)), jnp.sum(norm, axis=(-2, -1))


def quantize(w, weight_amax=None, *, check: bool = True) -> NVFP4Tensor:
    """Quantize ``w`` ``[..., N, K]`` to NVFP4, bit-identical to ModelOpt's export.

    ``weight_amax``: ``None`` takes max |w| over the whole tensor (the lazy rule of SPEC section 5);
    a scalar is a caller's (group) amax; an array of shape ``w.shape[:-2]`` (``[E]`` for an
    ``[E, N, K]`` tensor) gives one tensor scale per leading index, with the same bytes as
    quantizing each ``[N, K]`` slice alone. Any other shape is a ValueError (checked even with
    ``check=False``: it costs nothing and is static under jit).

    >>> t = quantize(jnp.linspace(-6, 6, 32, dtype=jnp.float32).reshape(2, 16))
    >>> t.weight.shape, t.weight_scale.shape, t.weight_scale_2.shape
    ((2, 8), (2, 1), ())
    """
    w = jnp.asarray(w)
    if check:
        _check_input(w, weight_amax)
    elif weight_amax is not None:
        _check_amax_shape(w, weight_amax)
    if weight_amax is None:  # the tensor amax comes from the block maxima, in the same pass
        return _quantize_own_amax_jit(w)
    return _quantize_jit(w, jnp.asarray(weight_amax, _F32))


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
    "input_scale_from_amax", "fp8_bytes", "abs_max_or_nan", "squared_error",
]
