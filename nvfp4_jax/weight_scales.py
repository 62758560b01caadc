"""Weight block scales chosen by search: ``max``, ``mse``, ``four-over-six``, ``local-hessian``
(docs/SPEC.md section 10, ModelOpt 0.47's weight calibrations), in the same four-tensor format as
:func:`nvfp4_jax.numerics.quantize`.

Every mode fixes the tensor scale from the (group) amax and then picks, per block of 16, one E4M3
block scale out of a candidate set by the smallest reconstruction error of the bytes we write:

* ``max``: no search, :func:`numerics.quantize` (the block scale maps the block max to 6).
* ``mse``: the 126 positive finite E4M3 values, error ``sum (w - deq)^2`` over the block.
* ``local-hessian``: the same candidates, error ``dw^T H_b dw`` with ``dw = w - deq`` and ``H_b`` the
  16x16 second moment of the layer's inputs over the block's 16 input columns.
* ``four-over-six``: two candidates per block, the block max mapped to 6 or to 4, block scales
  normalised to 256 instead of 448 (``weight_scale_2 = amax / 1536``).

Ties go to the first candidate (the smallest scale; for four-over-six the "6"), as in ModelOpt.
Each candidate's error is measured on the exact quantization (the E2M1 codes come from the exact
decision bounds of :mod:`numerics`, the dequantized values are ``E2M1 * f32(scale * s2)``), so the
chosen scale is never worse than ModelOpt's by the error of the written bytes. The ``mse`` error sums
are computed so that no backend's rounding choices change them (exact products, a fixed summation
order): the choice, hence every byte, is the same on every backend. ``local-hessian`` uses a float32
matrix product whose rounding is backend-specific: near-ties may resolve differently on CPU and GPU.

All functions are pure ``jnp``, jit-able, batched over blocks and over leading (stacked expert) axes;
a ``[E]`` weight amax gives each expert its own tensor scale, with the same bytes as one call per
expert. The search loops over the candidates (``fori_loop``) keeping a running best per block, so
its memory is a few arrays of the weight's size.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import numerics
# package-internal exact primitives of the bit format (numerics owns them; we only reuse them)
from nvfp4_jax.numerics import (_E4M3_VALUES, _THRESHOLDS, _bits, _bound_key, _check_input, _decision_bounds,
                                _div_rn, _f32_from_bits, _is_concrete, _key_to_f32, _magnitude_keys)

MODES = ("max", "mse", "four-over-six", "local-hessian")
BLOCK = numerics.BLOCK
#: E4M3 normalisation of four-over-six: block scales up to 1.5 * 256 = 384 stay below 448
FOUR_OVER_SIX_FP8_MAX = 256.0
#: ModelOpt's four-over-six multipliers of the block amax (max mapped to 6, then to 4)
FOUR_OVER_SIX_MULTIPLIERS = (1.0, 1.5)

_F32 = jnp.float32
_E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
_FIRST_CODE, _LAST_CODE = 1, 126  # positive finite E4M3 codes: 2^-9 .. 448


@flax.struct.dataclass
class BlockScales:
    """The scales of a quantized weight ``[..., N, K]``: ``weight_scale`` float8_e4m3fn
    ``[..., N, K/16]`` and ``weight_scale_2`` float32 ``[]`` (or one per leading index, like the
    weight amax)."""

    weight_scale: jax.Array
    weight_scale_2: jax.Array


# ---------------------------------------------------------------------------------------------
# shared pieces: keys, tensor scale, per-code tables


class _Prepared(flax.struct.PyTreeNode):
    """A weight split into blocks with everything the searches share."""

    key: jax.Array  # [*lead, N, KB, 16] |w| bits (uint16 for bf16, uint32 otherwise)
    neg: jax.Array  # [*lead, N, KB, 16] bool
    block_amax: jax.Array  # [*lead, N, KB] f32
    amax: jax.Array  # tensor amax, [] or a prefix of lead
    lead_idx: jax.Array  # [*lead, 1, 1] int32 row of the per-tensor tables (or [] zero)
    nbits: int = flax.struct.field(pytree_node=False)


def _prepare(w, weight_amax) -> _Prepared:
    if w.dtype not in (jnp.bfloat16, jnp.float32):
        w = w.astype(_F32)
    *lead, n, k = w.shape
    blocks = w.reshape(*lead, n, k // BLOCK, BLOCK)
    key, neg, nbits = _magnitude_keys(blocks)
    block_amax = _key_to_f32(jnp.max(key, axis=-1), nbits)
    amax = jnp.max(block_amax) if weight_amax is None else jnp.asarray(weight_amax, _F32)
    if amax.ndim:
        nlead = int(np.prod(amax.shape))
        lead_idx = jnp.arange(nlead, dtype=jnp.int32).reshape(*amax.shape, *([1] * (len(lead) - amax.ndim)), 1, 1)
        lead_idx = jnp.broadcast_to(lead_idx, (*lead, 1, 1))
    else:
        lead_idx = jnp.zeros((), jnp.int32)
    return _Prepared(key=key, neg=neg, block_amax=block_amax, amax=amax, lead_idx=lead_idx, nbits=nbits)


def _nonzero(amax):
    return jnp.where(amax == 0, _F32(1.0), amax)


def _tensor_scale(amax, fp8_max: float):
    """``weight_scale_2 = f32(amax) / f32(6 * fp8_max)``, correctly rounded; amax 0 counts as 1."""
    amax = _nonzero(jnp.asarray(amax, _F32))
    return _div_rn(amax, jnp.full_like(amax, numerics.FP4_MAX * fp8_max))


def _error_unit(s2):
    """A power of two near ``1 / (448 * s2)``: errors are measured in this unit so that their squares
    stay far from float32 underflow whatever the tensor's magnitude (scaling by it is exact)."""
    exponent = (_bits(jnp.max(s2)) >> 23).astype(jnp.int32) - 127
    return _f32_from_bits(((-exponent - 8) + 127).astype(jnp.uint32) << 23)


class _Tables(flax.struct.PyTreeNode):
    """Per tensor scale (rows L) and per E4M3 code (columns 128): the 7 E2M1 decision bounds as keys
    of the input format, and the 8 dequantized magnitudes ``f32(E2M1 * f32(v * s2))`` times the
    error unit."""

    bounds: jax.Array  # [7, L, 128]
    recon: jax.Array  # [8, L, 128]


def _tables(s2, unit, nbits) -> _Tables:
    s2 = s2.reshape(-1, 1)
    d = jnp.asarray(_E4M3_VALUES)[None, :] * s2  # [L, 128]: the divisor of each code
    thr = np.array([t for t, _ in _THRESHOLDS], np.float32)[:, None, None]
    inc = np.array([i for _, i in _THRESHOLDS])[:, None, None]
    bounds = _bound_key(_decision_bounds(d[None], thr, inc), nbits)
    recon = (jnp.asarray(_E2M1_MAGNITUDES)[:, None, None] * d[None]) * unit
    return _Tables(bounds=bounds, recon=recon)


def _per_block(table, lead_idx, codes):
    """``table[..., L, 128]`` looked up at each block's (tensor, code) -> ``[..., *blocks, 1]``."""
    return table[:, lead_idx, codes][..., None]


def _per_tensor(table, lead_idx, code):
    """``table[..., L, 128]`` at one code for every block -> broadcastable ``[..., *lead, 1, 1, 1]``."""
    col = jax.lax.dynamic_index_in_dim(table, code, axis=-1, keepdims=False)  # [J, L]
    return col[:, lead_idx][..., None] if lead_idx.ndim else col[:, 0][:, None, None, None]


def _residual(p: _Prepared, bounds, recon, unit):
    """``|w| - |deq|`` (in the error unit) of every element for the given bounds and magnitudes
    (each ``[7 | 8, ...]`` broadcastable to the blocks): the E2M1 index is the number of bounds
    passed, so the select chain picks the magnitude of the last bound passed. |w| is rebuilt from
    the keys here (a search pass then reads 2 bytes per bf16 element, not a float32 copy)."""
    deq = jnp.broadcast_to(recon[0], recon.shape[1:])
    for j in range(len(_THRESHOLDS)):
        deq = jnp.where(p.key >= bounds[j], recon[j + 1], deq)
    return _key_to_f32(p.key, p.nbits) * unit - deq


def _squared_sum(r):
    """``sum r^2`` over the last axis (16) without a rounding the backend may choose: each square
    is split into exact products (12-bit halves), and the sum runs in a fixed pairwise order."""
    hi = _f32_from_bits(_bits(r) & jnp.uint32(0xFFFFF000))
    lo = r - hi
    t = (hi * hi + (hi + hi) * lo) + lo * lo
    while t.shape[-1] > 1:
        half = t.shape[-1] // 2
        t = t[..., :half] + t[..., half:]
    return t[..., 0]


def _hessian_form(dw, hessian):
    """``dw^T H_b dw`` per block: dw ``[*lead, N, KB, 16]``, hessian ``[*lead', KB, 16, 16]``."""
    hdw = jnp.einsum("...kij,...nki->...nkj", hessian, dw, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(hdw * dw, axis=-1)


# ---------------------------------------------------------------------------------------------
# the searches (block E4M3 codes, int32 [*lead, N, KB])


def _sweep(p: _Prepared, tables: _Tables, unit, hessian):
    """Running best over the 126 E4M3 codes (ascending; a tie keeps the earlier, smaller one)."""
    def loss_of(code):
        r = _residual(p, _per_tensor(tables.bounds, p.lead_idx, code),
                      _per_tensor(tables.recon, p.lead_idx, code), unit)
        return _squared_sum(r) if hessian is None else _hessian_form(jnp.where(p.neg, -r, r), hessian)

    def step(code, carry):
        best_loss, best_code = carry
        loss = loss_of(code)
        better = loss < best_loss
        return jnp.where(better, loss, best_loss), jnp.where(better, code, best_code)

    init = (loss_of(jnp.int32(_FIRST_CODE)), jnp.full(p.block_amax.shape, _FIRST_CODE, jnp.int32))
    return jax.lax.fori_loop(_FIRST_CODE + 1, _LAST_CODE + 1, step, init)[1]


def _static_scale_codes(block_amax, amax, fp8_max: float):
    """ModelOpt's static-quantizer export of a per-block amax: ``s = amax_b / 6`` (1.0 where 0),
    ``fp8(clamp(s * fp8_max / (amax / 6), 2^-9, 448))``, every division correctly rounded."""
    six = jnp.full_like(block_amax, numerics.FP4_MAX)
    s = _div_rn(block_amax, six)
    s = jnp.where(s == 0, _F32(1.0), s)
    scale_max = _div_rn(_nonzero(amax), jnp.full_like(amax, numerics.FP4_MAX))
    q = _div_rn(s * _F32(fp8_max), jnp.broadcast_to(scale_max, s.shape))
    q = jnp.clip(q, _F32(numerics.FP8_MIN_SUBNORMAL), _F32(numerics.FP8_MAX))
    return jax.lax.bitcast_convert_type(q.astype(jnp.float8_e4m3fn), jnp.uint8).astype(jnp.int32)


def _four_over_six(p: _Prepared, tables: _Tables, unit):
    """Per block: the static export of ``block_amax * 1.0`` (max -> 6) and ``* 1.5`` (max -> 4);
    the second only where its error is strictly smaller."""
    amax = _expand(p.amax, p.block_amax.ndim)
    codes = [_static_scale_codes(p.block_amax * _F32(m), amax, FOUR_OVER_SIX_FP8_MAX)
             for m in FOUR_OVER_SIX_MULTIPLIERS]
    losses = [_squared_sum(_residual(p, _per_block(tables.bounds, p.lead_idx, c),
                                     _per_block(tables.recon, p.lead_idx, c), unit)) for c in codes]
    return jnp.where(losses[1] < losses[0], codes[1], codes[0])


def _expand(amax, ndim):
    """A tensor amax ``[]`` or ``[*prefix]`` broadcastable against ``ndim``-d block arrays."""
    return amax.reshape(*amax.shape, *([1] * (ndim - amax.ndim)))


def _codes_for(p: _Prepared, tables: _Tables, scale_codes):
    """Exact E2M1 codes of every element under each block's scale code (numerics' rounding)."""
    bounds = _per_block(tables.bounds, p.lead_idx, scale_codes)
    idx = jnp.zeros(p.key.shape, jnp.uint8)
    for j in range(len(_THRESHOLDS)):
        idx = idx + (p.key >= bounds[j]).astype(jnp.uint8)
    return idx | (p.neg.astype(jnp.uint8) << 3)


def _tensor_fp8_max(mode: str) -> float:
    return FOUR_OVER_SIX_FP8_MAX if mode == "four-over-six" else numerics.FP8_MAX


def _search_codes(p: _Prepared, mode: str, hessian):
    s2 = _tensor_scale(p.amax, _tensor_fp8_max(mode))
    unit = _error_unit(s2)
    tables = _tables(s2, unit, p.nbits)
    if mode == "four-over-six":
        codes = _four_over_six(p, tables, unit)
    else:
        if hessian is not None:  # an all-zero Hessian (no tokens): plain squared error
            empty = jnp.all(hessian == 0, axis=(-3, -2, -1), keepdims=True)
            hessian = jnp.where(empty, jnp.eye(BLOCK, dtype=_F32), hessian.astype(_F32))
        codes = _sweep(p, tables, unit, hessian)
    return codes, s2, tables


def _to_fp8(codes):
    return jax.lax.bitcast_convert_type(codes.astype(jnp.uint8), jnp.float8_e4m3fn)


@jax.jit
def _max_scales_jit(w, amax):
    t = numerics.quantize(w, amax, check=False) if amax is not None else numerics.quantize(w, check=False)
    return BlockScales(t.weight_scale, t.weight_scale_2)


def _search_impl(w, amax, hessian, mode):
    p = _prepare(w, amax)
    codes, s2, _ = _search_codes(p, mode, hessian)
    return BlockScales(_to_fp8(codes), s2)


def _quantize_impl(w, amax, hessian, mode):
    p = _prepare(w, amax)
    codes, s2, tables = _search_codes(p, mode, hessian)
    elem = _codes_for(p, tables, codes)
    return numerics.NVFP4Tensor(weight=numerics.pack_fp4(elem.reshape(w.shape)),
                                weight_scale=_to_fp8(codes), weight_scale_2=s2)


def _given_impl(w, weight_scale, weight_scale_2):
    s2 = jnp.asarray(weight_scale_2, _F32)
    p = _prepare(w, jnp.ones(s2.shape, _F32))  # only the keys and the table rows of s2 are used
    unit = _error_unit(s2)
    tables = _tables(s2, unit, p.nbits)
    codes = jax.lax.bitcast_convert_type(weight_scale.astype(jnp.float8_e4m3fn), jnp.uint8).astype(jnp.int32)
    elem = _codes_for(p, tables, codes)
    return numerics.NVFP4Tensor(weight=numerics.pack_fp4(elem.reshape(w.shape)),
                                weight_scale=weight_scale.astype(jnp.float8_e4m3fn), weight_scale_2=s2)


_search_jit = jax.jit(_search_impl, static_argnames=("mode",))
_quantize_jit = jax.jit(_quantize_impl, static_argnames=("mode",))
_given_jit = jax.jit(_given_impl)


# ---------------------------------------------------------------------------------------------
# public API


def _check(w, mode, weight_amax, hessian) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown weight-scale mode {mode!r}; choose one of {', '.join(MODES)}")
    _check_input(w, weight_amax)
    if mode == "local-hessian" and hessian is None:
        raise ValueError(f"mode 'local-hessian' needs the layer's input second moments (hessian) for the "
                         f"tensor of shape {tuple(w.shape)}")
    if hessian is None:
        return
    if mode != "local-hessian":
        raise ValueError(f"a hessian is only used by mode 'local-hessian', not {mode!r}")
    lead, kb = tuple(w.shape[:-2]), w.shape[-1] // BLOCK
    h = jnp.asarray(hessian)
    if (h.ndim < 3 or tuple(h.shape[-3:]) != (kb, BLOCK, BLOCK) or h.ndim - 3 > len(lead)
            or tuple(h.shape[:-3]) != lead[:h.ndim - 3]):
        raise ValueError(f"hessian of shape {tuple(h.shape)} does not fit the tensor of shape {tuple(w.shape)}: "
                         f"expected [{', '.join(map(str, lead + (kb,)))}, 16, 16] (or a prefix of the leading axes)")
    if _is_concrete(h) and not bool(jnp.all(jnp.isfinite(h))):
        raise ValueError(f"hessian for the tensor of shape {tuple(w.shape)} has NaN/Inf values")


def _hessian_arg(hessian, w):
    """The hessian with as many leading axes as the weight (missing ones broadcast)."""
    h = jnp.asarray(hessian, _F32)
    return h.reshape(*h.shape[:-3], *([1] * (w.ndim - 2 - (h.ndim - 3))), *h.shape[-3:])


def search_block_scales(w, mode: str, *, weight_amax=None, hessian=None, check: bool = True) -> BlockScales:
    """The block scales (and tensor scale) that ``mode`` chooses for ``w`` ``[..., N, K]``.

    ``weight_amax`` as in :func:`numerics.quantize` (``None``: max |w| of the whole tensor; a
    scalar group amax; ``[E]`` per expert). ``hessian``: for ``local-hessian`` only, float32
    ``[..., K/16, 16, 16]``, per block of 16 input columns ``H_b = mean_t x_t[b] x_t[b]^T`` over the
    calibration tokens that reached the linear (leading axes: one per expert, or fewer to share);
    a leading index whose hessian is all zero (no tokens) is searched with plain squared error.
    Any positive multiple of H gives the same choice up to rounding.

    >>> s = search_block_scales(jnp.linspace(-1, 1, 64).reshape(2, 32), "mse")
    >>> s.weight_scale.shape, s.weight_scale.dtype, s.weight_scale_2.shape
    ((2, 2), dtype(float8_e4m3fn), ())
    """
    w = jnp.asarray(w)
    if check:
        _check(w, mode, weight_amax, hessian)
    amax = None if weight_amax is None else jnp.asarray(weight_amax, _F32)
    if mode == "max":
        return _max_scales_jit(w, amax)
    return _search_jit(w, amax, None if hessian is None else _hessian_arg(hessian, w), mode)


def quantize_with_mode(w, mode: str = "max", weight_amax=None, hessian=None, *, check: bool = True
                       ) -> numerics.NVFP4Tensor:
    """Quantize ``w`` ``[..., N, K]`` with the block scales ``mode`` chooses (see
    :func:`search_block_scales`): ``weight``, ``weight_scale``, ``weight_scale_2`` as
    :func:`numerics.quantize` writes them; ``max`` is :func:`numerics.quantize` itself.

    >>> t = quantize_with_mode(jnp.linspace(-1, 1, 64).reshape(2, 32), "four-over-six")
    >>> float(t.weight_scale_2) == float(np.float32(1 / 1536))  # amax 1 / (6 * 256)
    True
    """
    w = jnp.asarray(w)
    if check:
        _check(w, mode, weight_amax, hessian)
    if mode == "max":
        return numerics.quantize(w, weight_amax, check=False)
    amax = None if weight_amax is None else jnp.asarray(weight_amax, _F32)
    return _quantize_jit(w, amax, None if hessian is None else _hessian_arg(hessian, w), mode)


def quantize_with_block_scales(w, weight_scale, weight_scale_2) -> numerics.NVFP4Tensor:
    """Quantize ``w`` ``[..., N, K]`` with given E4M3 block scales ``[..., N, K/16]`` (positive,
    finite) and tensor scale(s): the E2M1 code of ``f32(w) / f32(scale * weight_scale_2)``, rounded
    as in :func:`numerics.quantize` (ModelOpt's export of a static quantizer)."""
    w = jnp.asarray(w)
    ws = jnp.asarray(weight_scale)
    if tuple(ws.shape) != (*w.shape[:-1], w.shape[-1] // BLOCK):
        raise ValueError(f"weight_scale of shape {tuple(ws.shape)} does not fit the tensor of shape {tuple(w.shape)}")
    if _is_concrete(ws):
        v = np.asarray(ws.astype(_F32))
        if not (np.all(np.isfinite(v)) and np.all(v > 0)):
            raise ValueError(f"weight_scale for the tensor of shape {tuple(w.shape)} must be positive and finite")
    return _given_jit(w, ws, jnp.asarray(weight_scale_2, _F32))


def squared_error(w, t: numerics.NVFP4Tensor) -> jax.Array:
    """``sum (w - dequantize(t))^2`` in float32 (a figure for reports; not used by the searches)."""
    d = jnp.asarray(w).astype(_F32) - numerics.dequantize(t)
    return jnp.sum(d * d)


__all__ = ["MODES", "FOUR_OVER_SIX_FP8_MAX", "FOUR_OVER_SIX_MULTIPLIERS", "BlockScales", "search_block_scales",
           "quantize_with_mode", "quantize_with_block_scales", "squared_error"]
