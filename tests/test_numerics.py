"""JAX numerics against ModelOpt's golden vectors and the contract of SPEC sections 1-2."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nvfp4_jax import numerics as nq

from tests.paths import VECTORS_NPZ

VECTORS = np.load(VECTORS_NPZ)
CASES = sorted({k.split(".")[0] for k in VECTORS.files})


@pytest.mark.parametrize("case", CASES)
def test_golden_bytes(case):
    x = VECTORS[f"{case}.input_bf16_as_f32"].astype(ml_dtypes.bfloat16)
    t = nq.quantize(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(t.weight), VECTORS[f"{case}.weight"])
    np.testing.assert_array_equal(nq.fp8_bytes(t.weight_scale), VECTORS[f"{case}.weight_scale_u8"])
    assert np.float32(t.weight_scale_2).view(np.uint32) == VECTORS[f"{case}.weight_scale_2"].view(np.uint32)
    np.testing.assert_array_equal(np.asarray(nq.dequantize(t)), VECTORS[f"{case}.dequant_f32"])


def test_golden_bytes_under_jit():
    x = jnp.asarray(VECTORS["grid_and_ties.input_bf16_as_f32"].astype(ml_dtypes.bfloat16))
    t = jax.jit(lambda w: nq.quantize(w, check=False))(x)
    np.testing.assert_array_equal(np.asarray(t.weight), VECTORS["grid_and_ties.weight"])


def test_per_expert_amax_equals_each_expert_alone():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((3, 8, 64)) * np.array([1e-3, 1.0, 50.0])[:, None, None]).astype(ml_dtypes.bfloat16)
    stacked = nq.quantize(jnp.asarray(w), nq.tensor_amax(jnp.asarray(w), per_leading=True))
    assert stacked.weight_scale_2.shape == (3,)
    for e in range(3):
        alone = nq.quantize(jnp.asarray(w[e]))
        np.testing.assert_array_equal(np.asarray(stacked.weight[e]), np.asarray(alone.weight))
        np.testing.assert_array_equal(nq.fp8_bytes(stacked.weight_scale[e]), nq.fp8_bytes(alone.weight_scale))
        assert np.float32(stacked.weight_scale_2[e]) == np.float32(alone.weight_scale_2)


def test_amax_per_leading_index_of_4d_tensor_equals_each_slice_alone():
    # A == B, and a different amax for every (a, b): applying the amax along the wrong leading
    # axis (or transposed) changes the bytes of some slice
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((2, 2, 8, 32)) * np.array([1e-2, 1.0, 3.0, 40.0]).reshape(2, 2, 1, 1))
    w = w.astype(ml_dtypes.bfloat16)
    own = np.abs(w.astype(np.float32)).max(axis=(-2, -1))
    amax = (own * np.array([[1.0, 1.5], [2.25, 3.5]])).astype(np.float32)  # group amaxes >= own
    t = nq.quantize(jnp.asarray(w), jnp.asarray(amax))
    assert t.weight_scale_2.shape == (2, 2)
    for a in range(2):
        for b in range(2):
            alone = nq.quantize(jnp.asarray(w[a, b]), float(amax[a, b]))
            np.testing.assert_array_equal(np.asarray(t.weight[a, b]), np.asarray(alone.weight))
            np.testing.assert_array_equal(nq.fp8_bytes(t.weight_scale[a, b]), nq.fp8_bytes(alone.weight_scale))
            expect_s2 = np.float32(np.float64(amax[a, b]) / 2688.0)  # correctly rounded f32 division
            assert np.float32(t.weight_scale_2[a, b]).view(np.uint32) == expect_s2.view(np.uint32)


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("amax_shape", [(2,), (1,), (2, 1), (2, 2, 1), (3, 2)])
def test_amax_of_other_than_scalar_or_full_leading_shape_is_refused(check, amax_shape):
    w = jnp.ones((2, 2, 4, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"weight_amax of shape .* use a scalar \[\] or one value per leading index, shape \[2, 2\]"):
        nq.quantize(w, jnp.full(amax_shape, 2.0, jnp.float32), check=check)


def test_amax_shape_is_checked_under_jit():
    with pytest.raises(ValueError, match="weight_amax of shape"):
        jax.jit(lambda w, a: nq.quantize(w, a, check=False))(jnp.ones((3, 4, 16)), jnp.ones((4,)))


def test_amax_for_2d_tensor_must_be_scalar():
    with pytest.raises(ValueError, match="weight_amax of shape"):
        nq.quantize(jnp.ones((4, 16), jnp.float32), jnp.ones((1,), jnp.float32))


def test_group_amax_shares_tensor_scale():
    a = jnp.ones((4, 32), jnp.bfloat16)
    b = 3 * jnp.ones((4, 32), jnp.bfloat16)
    ta, tb = nq.quantize(a, 3.0), nq.quantize(b, 3.0)
    assert float(ta.weight_scale_2) == float(tb.weight_scale_2) == np.float32(3.0) / np.float32(2688)


def test_all_zero_tensor_has_finite_positive_scales():
    t = nq.quantize(jnp.zeros((2, 32), jnp.bfloat16))
    assert np.all(np.asarray(t.weight) == 0)
    s = np.asarray(t.weight_scale).astype(np.float32)
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    assert float(t.weight_scale_2) == np.float32(1.0) / np.float32(2688)


def test_sign_of_zero():
    x = np.zeros((1, 16), np.float32)
    x[0, 0] = 6.0
    x[0, 1] = -0.0
    x[0, 2] = -1e-3  # rounds to zero, keeps its sign
    codes = np.asarray(nq.unpack_fp4(nq.quantize(jnp.asarray(x)).weight))[0]
    assert codes[0] == 7 and codes[1] == 0x0 and codes[2] == 0x8


def test_pack_unpack_roundtrip_and_nibble_order():
    codes = np.arange(32, dtype=np.uint8).reshape(2, 16) % 16
    packed = np.asarray(nq.pack_fp4(codes))
    assert packed[0, 0] == (codes[0, 0] | codes[0, 1] << 4)
    np.testing.assert_array_equal(np.asarray(nq.unpack_fp4(packed)), codes)


@pytest.mark.parametrize("bad,exc,words", [
    (np.ones((4, 24), np.float32), ValueError, ["multiple of 16", "(4, 24)"]),
    (np.ones((4, 32), np.int32), TypeError, ["int32", "(4, 32)"]),
])
def test_bad_input(bad, exc, words):
    with pytest.raises(exc) as e:
        nq.quantize(jnp.asarray(bad))
    for w in words:
        assert w in str(e.value)


def test_nan_inf_reported_with_count_and_first_index():
    x = np.ones((4, 32), np.float32)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    with pytest.raises(ValueError) as e:
        nq.quantize(jnp.asarray(x))
    assert "2 NaN/Inf" in str(e.value) and "(1, 3)" in str(e.value) and "(4, 32)" in str(e.value)


@pytest.mark.parametrize("amax", [-1.0, float("nan"), 0.5])
def test_bad_amax(amax):
    with pytest.raises(ValueError, match="amax"):
        nq.quantize(jnp.ones((2, 16), jnp.float32), amax)


def test_scale_from_amax_is_correctly_rounded_division():
    rng = np.random.default_rng(2)
    amax = (10.0 ** rng.uniform(-30, 30, 20000)).astype(np.float32)
    expect = (amax.astype(np.float64) / 2688.0).astype(np.float32)  # f64 then round: exact f32 division
    np.testing.assert_array_equal(np.asarray(nq.scale_from_amax(jnp.asarray(amax))), expect)


def test_fake_quant_matches_dequantize_and_straight_through_gradient():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 5, 32)).astype(np.float32))
    amax = float(jnp.max(jnp.abs(x)))
    fq = nq.fake_quant(x, amax)
    ref = nq.dequantize(nq.quantize(x.reshape(15, 32), amax)).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(ref))
    g = jax.grad(lambda v: jnp.sum(nq.fake_quant(v, amax) * 2.0))(x)
    np.testing.assert_array_equal(np.asarray(g), 2.0 * np.ones(x.shape, np.float32))


def _dequant_error_reference(w, t):
    """sum (w - dequantize)^2 and sum w^2 per leading index, in float64 numpy from the unpacked
    codes (a table look-up, independent of squared_error's arithmetic on the packed bytes)."""
    codes = np.asarray(nq.unpack_fp4(t.weight)).astype(np.int64)
    vals = nq.E2M1_VALUES[codes].astype(np.float64)
    *lead, n, k = vals.shape
    s2 = np.asarray(t.weight_scale_2, np.float64).reshape(*lead, 1, 1, 1) if lead else np.float64(t.weight_scale_2)
    scale = np.asarray(t.weight_scale).astype(np.float64)[..., None]
    deq = (vals.reshape(*lead, n, k // 16, 16) * scale * s2).reshape(*lead, n, k)
    x = np.asarray(jnp.asarray(w).astype(jnp.float32), np.float64)
    axes = (-2, -1)
    return ((x - deq) ** 2).sum(axis=axes), (x * x).sum(axis=axes)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16])
@pytest.mark.parametrize("lead,shape", [((), (8, 64)), ((3,), (8, 64)), ((), (1024, 1024))])
def test_squared_error_equals_dequantized_reference(dtype, lead, shape):
    """Also at a million elements, where one float32 accumulator would be off by about 1e-2."""
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_normal((*lead, *shape)) * 3, dtype)
    w = w.at[..., 0, :16].set(0)  # an all-zero block
    w = w.at[..., 1, 3].set(-1e-6)  # a negative value rounded to zero (code 8)
    amax = nq.tensor_amax(w, per_leading=True) if lead else None
    t = nq.quantize(w, amax)
    err, norm = jax.jit(nq.squared_error)(w, t)
    ref_err, ref_norm = _dequant_error_reference(w, t)
    assert np.shape(err) == lead and np.shape(norm) == lead
    np.testing.assert_allclose(np.asarray(err), ref_err, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(norm), ref_norm, rtol=1e-5)
    assert np.all(np.asarray(err) > 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16])
def test_abs_max_or_nan(dtype):
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((16, 32)) * 5).astype(np.float32)
    a[2, 5] = -40.0  # the largest magnitude is negative
    w = jnp.asarray(a, dtype)
    expected = np.abs(np.asarray(w.astype(jnp.float32))).max()
    assert np.float32(nq.abs_max_or_nan(w)) == expected == 40.0
    assert float(nq.abs_max_or_nan(jnp.zeros((4, 16), dtype).at[0, 0].set(-0.0))) == 0.0
    for bad in (np.nan, np.inf, -np.inf):
        assert np.isnan(float(jax.jit(nq.abs_max_or_nan)(w.at[3, 3].set(bad))))


@pytest.mark.parametrize("shape", [(3, 8, 32), (2, 5, 24)])  # K a multiple of 16 (block maxima first) or not
def test_abs_max_or_nan_per_leading_index(shape):
    rng = np.random.default_rng(4)
    a = (rng.standard_normal(shape) * rng.uniform(0.1, 9, (shape[0], 1, 1))).astype(np.float32)
    a[0, 1, 2] = np.nan
    w = jnp.asarray(a, jnp.bfloat16)
    got = np.asarray(jax.jit(nq.abs_max_or_nan, static_argnums=1)(w, True))
    expected = np.abs(np.asarray(w.astype(jnp.float32))).reshape(shape[0], -1).max(axis=1)  # NaN in row 0
    assert got.shape == (shape[0],)
    assert np.isnan(got[0]) and np.array_equal(got[1:], expected[1:])
