"""torch_bridge.reference (pure PyTorch NVFP4) against ModelOpt golden vectors and properties."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from hypothesis.extra import numpy as hnp

from torch_bridge import arrays
from torch_bridge import reference as R

from tests.paths import GOLDEN_DIR as GOLDEN
if not GOLDEN.exists():  # checkout-relative fallback
    GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
VECTORS = GOLDEN / "nvfp4_vectors.npz"
CASES = ["gauss", "gauss_small", "heavy_tail", "grid_and_ties", "zero_and_tiny_blocks", "outlier", "experts_3d"]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_golden = pytest.mark.skipif(not VECTORS.exists(), reason="golden vectors not available")


@pytest.fixture(scope="module")
def golden():
    return np.load(VECTORS)


def _bf16(z, case):
    return torch.from_numpy(z[f"{case}.input_bf16_as_f32"]).to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# golden vectors, byte for byte
# ----------------------------------------------------------------------------------------------
@needs_golden
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_golden_bytes(golden, case, device):
    x = _bf16(golden, case).to(device)
    q = {k: v.cpu() for k, v in R.quantize(x).items()}
    w = q["weight"].numpy()
    s = q["weight_scale"].view(torch.uint8).numpy()
    s2 = q["weight_scale_2"].numpy()
    assert q["weight"].dtype == torch.uint8 and q["weight_scale"].dtype == torch.float8_e4m3fn
    assert q["weight_scale_2"].dtype == torch.float32 and q["weight_scale_2"].shape == ()
    exp_w = golden[f"{case}.weight"]
    exp_s = golden[f"{case}.weight_scale_u8"]
    assert w.shape == exp_w.shape and s.shape == exp_s.shape
    nw, ns = int((w != exp_w).sum()), int((s != exp_s).sum())
    assert nw == 0 and ns == 0, f"{case}: {nw} weight bytes, {ns} scale bytes differ"
    assert s2.view(np.uint32) == golden[f"{case}.weight_scale_2"].view(np.uint32)


@needs_golden
@pytest.mark.parametrize("case", CASES)
def test_golden_dequant_bits(golden, case):
    q = {
        "weight": torch.from_numpy(golden[f"{case}.weight"]),
        "weight_scale": torch.from_numpy(golden[f"{case}.weight_scale_u8"]),  # raw bytes accepted
        "weight_scale_2": torch.from_numpy(golden[f"{case}.weight_scale_2"]),
    }
    d = R.dequantize(q).numpy()
    exp = golden[f"{case}.dequant_f32"]
    assert (d.view(np.uint32) != exp.view(np.uint32)).sum() == 0


# (tensor amax T, block amax M, element W): bf16 values where y = W / (fp8(s) * ws2) lands on or one
# ulp beside an E2M1 rounding threshold, and multiplying by the float32 reciprocal of the divisor
# (what XLA may emit) gives a different code than the correctly rounded division.
NEAR_TIES = [
    (1.390625, 0.59765625, 0.34765625),
    (1.03125, 0.8828125, 0.2578125),
    (1.0390625, 1.0390625, 0.12988281),
    (1.3125, 0.703125, 0.29296875),
    (1.828125, 0.65234375, 0.38085938),
    (1.5, 0.58984375, 0.171875),
    (1.3046875, 1.1171875, 0.65234375),
    (1.9296875, 0.48242188, 0.060302734),
    (1.09375, 0.703125, 0.5859375),
    (1.1953125, 1.0234375, 0.29882812),
    (1.1875, 1.015625, 0.59375),
    (1.3828125, 1.1875, 0.34570312),
]


def _np_code(y):
    a = abs(float(y))
    return sum([a > 0.25, a >= 0.75, a > 1.25, a >= 1.75, a > 2.5, a >= 3.5, a > 5.0])


@pytest.mark.parametrize("device", DEVICES)
def test_near_ties_correctly_rounded_division(device):
    """SPEC section 2 step 3: values a hair beside a tie must follow the correctly rounded f32
    division. Each case is one slice [1, 32]: block 0 = [T, 0...] (sets the tensor amax), block 1 =
    [M, W, -W, 0...]; all slices are quantized at once with per-slice amax T."""
    f32 = np.float32
    x = torch.zeros(len(NEAR_TIES), 1, 32)
    for i, (T, M, W) in enumerate(NEAR_TIES):
        x[i, 0, 0], x[i, 0, 16], x[i, 0, 17], x[i, 0, 18] = T, M, W, -W
    xb = x.to(torch.bfloat16)
    assert torch.equal(xb.float(), x)
    q = {k: v.cpu() for k, v in R.quantize(xb.to(device), x.abs().amax(dim=(-2, -1)).to(device)).items()}
    codes = R.unpack_fp4(q["weight"])
    n_recip_differs = 0
    for i, (T, M, W) in enumerate(NEAR_TIES):
        # independent scalar float32 pipeline (numpy scalar division is IEEE on CPU)
        ws2 = f32(T) / f32(2688)
        s8 = f32(ml_dtypes.float8_e4m3fn(f32(M) / (f32(6) * ws2)))
        d = s8 * ws2
        assert q["weight_scale_2"][i].item() == ws2
        assert q["weight_scale"][i, 0, 1].float().item() == s8
        exp = _np_code(f32(W) / d)
        assert codes[i, 0, 17].item() == exp, (T, M, W, f32(W) / d)
        assert codes[i, 0, 18].item() == exp | 8
        n_recip_differs += _np_code(f32(W) * (f32(1) / d)) != exp
    assert n_recip_differs == len(NEAR_TIES)


@needs_golden
def test_golden_experts_per_expert_amax(golden):
    """experts_3d with a per-expert amax [E]: each expert equals quantizing it alone."""
    x = _bf16(golden, "experts_3d")
    amax = x.float().abs().amax(dim=(-2, -1))
    q = R.quantize(x, amax)
    assert q["weight_scale_2"].shape == (x.shape[0],)
    for e in range(x.shape[0]):
        qe = R.quantize(x[e])
        assert torch.equal(q["weight"][e], qe["weight"])
        assert torch.equal(q["weight_scale"][e].view(torch.uint8), qe["weight_scale"].view(torch.uint8))
        assert q["weight_scale_2"][e].item() == qe["weight_scale_2"].item()
    d = R.dequantize(q)
    for e in range(x.shape[0]):
        assert torch.equal(d[e], R.dequantize(R.quantize(x[e])))


# ----------------------------------------------------------------------------------------------
# tiny_llama: ModelOpt's exported weights from the bf16 source, with SPEC section 4 groups
# ----------------------------------------------------------------------------------------------
TINY = GOLDEN / "tiny_llama"


@pytest.mark.skipif(not (TINY / "modelopt_nvfp4" / "model.safetensors").exists(), reason="no tiny_llama golden")
def test_tiny_llama_weights_bytes():
    src = arrays.load_checkpoint(TINY / "source")
    ref = arrays.load_checkpoint(TINY / "modelopt_nvfp4")
    assert ref["model.layers.0.mlp.gate_proj.weight_scale"].dtype == torch.float8_e4m3fn
    cfg = json.loads((TINY / "source" / "config.json").read_text())
    groups = []
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        groups += [
            [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
            [p + "self_attn.o_proj"],
            [p + "mlp.gate_proj", p + "mlp.up_proj"],
            [p + "mlp.down_proj"],
        ]
    n = 0
    for g in groups:
        amax = max(src[m + ".weight"].float().abs().max() for m in g)
        for m in g:
            q = R.quantize(src[m + ".weight"], amax)
            assert torch.equal(q["weight"], ref[m + ".weight"]), m
            assert torch.equal(q["weight_scale"].view(torch.uint8), ref[m + ".weight_scale"].view(torch.uint8)), m
            assert q["weight_scale_2"].item() == ref[m + ".weight_scale_2"].item(), m
            n += 1
    assert n == 7 * cfg["num_hidden_layers"]


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def test_k_not_multiple_of_16():
    with pytest.raises(ValueError, match=r"\[4, 40\]"):
        R.quantize(torch.randn(4, 40))


def test_nan_inf_reported():
    w = torch.randn(4, 32)
    w[1, 3] = float("nan")
    w[2, 5] = float("inf")
    w[3, 0] = float("-inf")
    with pytest.raises(ValueError) as ei:
        R.quantize(w)
    msg = str(ei.value)
    assert "3 non-finite" in msg and "(1, 3)" in msg and "[4, 32]" in msg


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64])
def test_bad_dtype(dtype):
    with pytest.raises(TypeError, match=r"\[2, 16\]"):
        R.quantize(torch.zeros(2, 16, dtype=dtype))


def test_bad_rank():
    with pytest.raises(ValueError, match=r"\[16\]"):
        R.quantize(torch.zeros(16))


@pytest.mark.parametrize("amax", [-1.0, float("nan"), float("inf")])
def test_bad_amax(amax):
    with pytest.raises(ValueError, match=r"\[3, 32\]"):
        R.quantize(torch.zeros(3, 32), amax)


def test_amax_smaller_than_max():
    w = torch.randn(3, 32)
    with pytest.raises(ValueError, match="smaller than max"):
        R.quantize(w, w.abs().max() * 0.5)
    # per expert
    w3 = torch.randn(2, 3, 32)
    a = w3.abs().amax(dim=(-2, -1))
    a[1] *= 0.9
    with pytest.raises(ValueError, match=r"\[2, 3, 32\]"):
        R.quantize(w3, a)
    with pytest.raises(ValueError, match="leading axes"):
        R.quantize(w3, torch.ones(3))
    R.quantize(w, w.abs().max() * 0.5, check=False)  # saturating, allowed with check=False


def test_scale_from_amax():
    assert R.scale_from_amax(0.0).item() == np.float32(1.0) / np.float32(2688)
    assert R.scale_from_amax(2688.0).item() == 1.0
    a = torch.tensor([0.0, 1.0, 3.5, 1e-3])
    s = R.scale_from_amax(a)
    exp = (a.numpy().astype(np.float32) + (a.numpy() == 0)) / np.float32(2688)
    assert np.array_equal(s.numpy(), exp.astype(np.float32))
    with pytest.raises(ValueError):
        R.scale_from_amax(-1.0)


# ----------------------------------------------------------------------------------------------
# special values
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_zero(dtype):
    q = R.quantize(torch.zeros(4, 32, dtype=dtype))
    assert torch.all(q["weight"] == 0)
    s = q["weight_scale"].float()
    assert torch.isfinite(s).all() and (s > 0).all()
    assert q["weight_scale_2"].item() == np.float32(1.0) / np.float32(2688)
    assert torch.all(R.dequantize(q) == 0)


def test_signed_zero_codes():
    w = torch.zeros(1, 16)
    w[0, 0] = 1.0
    w[0, 1] = -0.0
    w[0, 2] = -1e-4  # rounds to zero, keeps sign bit
    codes = R.unpack_fp4(R.quantize(w)["weight"])[0]
    assert codes[1].item() == 0x0 and codes[2].item() == 0x8 and codes[0].item() == 0x7


def test_pack_unpack_roundtrip():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 16, (3, 5, 32), generator=g, dtype=torch.uint8)
    p = R.pack_fp4(c)
    assert p.shape == (3, 5, 16)
    assert torch.equal(R.unpack_fp4(p), c)
    assert R.pack_fp4(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21


def test_leading_axes_scalar_amax():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 3, 8, 32, generator=g).to(torch.bfloat16)
    q = R.quantize(w)
    amax = w.float().abs().max()
    for i in range(2):
        for j in range(3):
            qi = R.quantize(w[i, j], amax)
            assert torch.equal(q["weight"][i, j], qi["weight"])
    # two leading axes with per-slice amax
    a = w.float().abs().amax(dim=(-2, -1))
    q2 = R.quantize(w, a)
    assert q2["weight_scale_2"].shape == (2, 3)
    assert torch.equal(q2["weight"][1, 2], R.quantize(w[1, 2])["weight"])


def test_fake_quant_matches_dequantize_and_saturates():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, generator=g)
    fq = R.fake_quant(x, x.abs().max())
    assert torch.equal(fq, R.dequantize(R.quantize(x)))
    # amax far below the data: values saturate at 6 * 448 * ws2 = amax
    fq2 = R.fake_quant(x, 0.01)
    assert torch.all(fq2.abs() <= 0.01 * (1 + 1e-6))
    xr = x.clone().requires_grad_(True)
    R.fake_quant(xr, 3.0).sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(x))


# ----------------------------------------------------------------------------------------------
# property test
# ----------------------------------------------------------------------------------------------
_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)


def _bf16_arrays():
    floats = st.floats(
        min_value=-3e4, max_value=3e4, allow_nan=False, allow_infinity=False, width=32, allow_subnormal=False
    )
    return st.tuples(st.integers(1, 3), st.integers(1, 3), st.floats(-30, 10)).flatmap(
        lambda t: hnp.arrays(np.float32, (t[0], 16 * t[1]), elements=floats).map(
            lambda a, e=t[2]: (a * np.float32(2.0**e)).astype(ml_dtypes.bfloat16)
        )
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_bf16_arrays(), st.sampled_from([1.0, 1.0, 2.0, 37.0]))
def test_property_error_bound(a, amax_factor):
    w = arrays.to_torch(a)
    assert w.dtype == torch.bfloat16
    x = w.float()
    tmax = float(x.abs().max())
    amax = tmax * amax_factor
    q = R.quantize(w, amax)
    codes = R.unpack_fp4(q["weight"])
    assert int(codes.max()) <= 15
    s = q["weight_scale"].float()
    ws2 = q["weight_scale_2"]
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.isfinite(ws2).all() and (ws2 > 0).all()
    d = R.dequantize(q).double()
    bs = (s.double() * ws2.double()).repeat_interleave(16, -1)  # block scale per element
    xd = x.double()
    y = (xd / bs).abs()
    # half a grid step of the grid interval containing |y| (steps 0.5, 1, 2)
    step = np.where(y.numpy() < 2, 0.5, np.where(y.numpy() < 4, 1.0, 2.0))
    err = (d - xd).abs().numpy()
    saturated = y.numpy() > 6.0
    bound = 0.5 * step * bs.numpy() * (1 + 1e-6)
    ok = (err <= bound) | saturated
    assert ok.all(), (err[~ok][:5], bound[~ok][:5])
    # sign preserved for nonzero dequantized values
    nz = d != 0
    assert torch.all(torch.sign(d[nz]) == torch.sign(xd[nz]))
    # with amax >= max|w|, |y| exceeds 6 only through the fp8 rounding of the block scale: by at most
    # a factor 1 / (1 - 2^-4) where that scale is a normal E4M3 number (>= 2^-6); subnormal scales
    # (tiny blocks beside a large amax) are coarser and may saturate further.
    normal = (s >= 2.0**-6).repeat_interleave(16, -1)
    if normal.any():
        assert float(y[normal].max()) <= 6.0 / (1 - 2.0**-4) * (1 + 1e-6)


# ----------------------------------------------------------------------------------------------
# torch_bridge.arrays: lossless conversions and safetensors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float16, torch.float32, torch.uint8])
def test_arrays_roundtrip(dtype, tmp_path):
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (5, 32), generator=g, dtype=torch.uint8)
    if dtype == torch.uint8:
        t = raw
    else:
        t = raw.view(torch.uint8).repeat_interleave(dtype.itemsize, -1).view(dtype) if dtype.itemsize > 1 else raw.view(dtype)
    a = arrays.to_numpy(t)
    assert a.dtype == arrays.torch_dtype_to_numpy(dtype) and a.shape == tuple(t.shape)
    back = arrays.to_torch(a)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    j = arrays.to_jax(t)
    assert str(j.dtype) == str(a.dtype)
    assert torch.equal(arrays.to_torch(j).view(torch.uint8), t.view(torch.uint8))
    p = tmp_path / "x.safetensors"
    arrays.save_safetensors({"x": t, "y": a}, p)
    assert arrays.safetensors_header(p)["x"]["dtype"] in {
        torch.bfloat16: ["BF16"], torch.float8_e4m3fn: ["F8_E4M3"], torch.float16: ["F16"],
        torch.float32: ["F32"], torch.uint8: ["U8"]}[dtype]
    r = arrays.load_checkpoint(tmp_path)
    assert r["x"].dtype == dtype and torch.equal(r["x"].view(torch.uint8), t.view(torch.uint8))
    assert torch.equal(r["y"].view(torch.uint8), t.view(torch.uint8))


def test_arrays_quantized_to_numpy():
    q = R.quantize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    s = arrays.to_numpy(q["weight_scale"])
    assert s.dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(s.view(np.uint8), q["weight_scale"].view(torch.uint8).numpy())
    assert np.array_equal(s.astype(np.float32), q["weight_scale"].float().numpy())
