"""quantize_layer: a layer's weights on device in a few calls, byte-identical to quantizing each
weight alone with its group's amax (the group amax computed here independently, in numpy)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nvfp4_jax import numerics
from nvfp4_jax.layer_quant import LayerQuantError, fused_batches, fused_groups, input_scales, quantize_layer


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"attn.q": (32, 64), "attn.k": (16, 64), "attn.v": (16, 64), "attn.o": (64, 32)}
    shapes.update({f"experts.{e}.{p}": (48, 64) for e in range(5) for p in ("gate", "up")})
    shapes.update({f"experts.{e}.down": (64, 48) for e in range(5)})
    shapes["odd_rows"] = (20, 32)  # rows not a multiple of the error's row stride
    w = {m: (rng.standard_normal(s) * rng.uniform(0.01, 3)).astype(ml_dtypes.bfloat16) for m, s in shapes.items()}
    w["experts.3.up"][:] = 0  # a zero member: its group amax is gate's
    w["attn.o"][:] = 0  # a zero module alone
    groups = [("attn.q", "attn.k", "attn.v")] + [(f"experts.{e}.gate", f"experts.{e}.up") for e in range(5)]
    return w, groups


# one weight per call (CPU), two or three of the 48x64 bf16 experts per stacked call, all of a shape
@pytest.mark.parametrize("max_chunk_bytes", [0, 2 * 48 * 64 * 2, 64 * 48 * 64 * 2])
def test_bytes_equal_per_module_quantize_with_group_amax(max_chunk_bytes):
    w, groups = _weights()
    group_of = {m: g for g in groups for m in g}
    got = quantize_layer({m: jnp.asarray(a) for m, a in w.items()}, groups, max_chunk_bytes=max_chunk_bytes)
    for m, a in w.items():
        members = group_of.get(m, (m,))
        amax = np.float32(max(np.abs(w[x].astype(np.float32)).max() for x in members))
        ref = numerics.quantize(jnp.asarray(a), amax)
        t = got.tensors[m]
        assert np.array_equal(np.asarray(ref.weight), t.weight), m
        assert np.array_equal(np.asarray(ref.weight_scale).view(np.uint8), t.weight_scale.view(np.uint8)), m
        assert np.asarray(ref.weight_scale_2, np.float32).tobytes() == t.weight_scale_2.tobytes(), m
        # the error figures: rows 0, 8, 16, ... scaled by rows / sampled rows, in float64 here
        x = a.astype(np.float64)[::8]
        err = ((x - np.asarray(numerics.dequantize(ref), np.float64)[::8]) ** 2).sum()
        scale = a.shape[0] / x.shape[0]
        assert got.squared_error[m] == pytest.approx(err * scale, rel=1e-5, abs=1e-30), m
        assert got.squared_norm[m] == pytest.approx((x * x).sum() * scale, rel=1e-5), m
    assert got.zero_weight_amax == ["attn.o"]


def test_batches_split_a_kind_evenly_within_the_byte_bound():
    w = {f"e.{i:02d}": jnp.zeros((16, 32), jnp.bfloat16) for i in range(10)}
    w["other"] = jnp.zeros((32, 16), jnp.float32)
    one = 16 * 32 * 2
    alone = fused_groups(sorted(w))
    sizes = lambda bound, groups=alone: [len(b) for b in fused_batches(w, groups, bound)]  # noqa: E731
    assert sizes(4 * one) == [4, 3, 3, 1]  # 10 in 3 batches of at most 4, evenly; "other" alone
    assert sizes(0) == [1] * 11
    assert sizes(100 * one) == [10, 1]
    flat = lambda bound: [g for b in fused_batches(w, alone, bound) for g in b]  # noqa: E731
    assert flat(4 * one) == flat(0)
    # pairs count their two members' bytes: at most 2 pairs in 4 weights' worth
    pairs = fused_groups(sorted(w), [(f"e.{i:02d}", f"e.{i + 1:02d}") for i in range(0, 10, 2)])
    assert sizes(4 * one, pairs) == [2, 2, 1, 1]


def test_fused_groups_cover_every_module_once_and_merge_overlaps():
    mods = ["a", "b", "c", "d", "e"]
    assert fused_groups(mods, [("b", "a"), ("c", "zz")]) == [("a", "b"), ("c",), ("d",), ("e",)]
    # groups sharing a module share one amax: merged, transitively
    assert fused_groups(mods, [("a", "b"), ("c", "d"), ("b", "c")]) == [("a", "b", "c", "d"), ("e",)]


def test_nan_weight_is_named():
    w, groups = _weights()
    w["experts.2.down"][3, 7] = np.nan
    with pytest.raises(LayerQuantError, match=r"experts\.2\.down\.weight: it holds NaN"):
        quantize_layer({m: jnp.asarray(a) for m, a in w.items()}, groups)


def test_input_scales_equal_scale_from_amax():
    amax = {"a": 1.0, "b": 3.3, "c": 0.0}
    got = input_scales(amax)
    for m, v in amax.items():
        assert got[m].tobytes() == np.asarray(numerics.scale_from_amax(np.float32(v)), np.float32).tobytes()


def _as_stacks(w):
    """The experts of _weights() as one stack per projection (numpy, in expert order)."""
    from nvfp4_jax.layer_quant import LayerWeights, WeightStack

    stacks = []
    for p in ("gate", "up", "down"):
        mods = tuple(f"experts.{e}.{p}" for e in range(5))
        stacks.append(WeightStack(jnp.asarray(np.stack([w[m] for m in mods])), mods))
    return LayerWeights({m: jnp.asarray(a) for m, a in w.items() if not m.startswith("experts.")}, tuple(stacks))


# one group per call (CPU), two 48x64 weights per call (a gate/up pair, or two downs), every expert of a stack
@pytest.mark.parametrize("max_chunk_bytes", [0, 2 * 48 * 64 * 2, 64 * 48 * 64 * 2])
@pytest.mark.parametrize("mode", ["max", "mse"])
def test_weights_from_stacks_give_the_bytes_of_each_weight_alone(max_chunk_bytes, mode):
    """Weights held stacked (LayerWeights/WeightStack: sliced inside the jitted calls) give the
    bytes of quantizing each weight alone with its group's amax (numerics.quantize for max,
    weight_scales.quantize_with_mode for mse; group amax in numpy), and the squared errors in numpy."""
    from nvfp4_jax import weight_scales

    w, groups = _weights(seed=1)
    group_of = {m: g for g in groups for m in g}
    got = quantize_layer(_as_stacks(w), groups, max_chunk_bytes=max_chunk_bytes, mode=mode)
    assert sorted(got.tensors) == sorted(w)
    for m, a in w.items():
        amax = np.float32(max(np.abs(w[x].astype(np.float32)).max() for x in group_of.get(m, (m,))))
        ref = (numerics.quantize(jnp.asarray(a), amax) if mode == "max"
               else weight_scales.quantize_with_mode(jnp.asarray(a), mode, weight_amax=amax))
        t = got.tensors[m]
        assert np.array_equal(np.asarray(ref.weight), t.weight), m
        assert np.array_equal(np.asarray(ref.weight_scale).view(np.uint8), t.weight_scale.view(np.uint8)), m
        assert np.asarray(ref.weight_scale_2, np.float32).tobytes() == t.weight_scale_2.tobytes(), m
        x = a.astype(np.float64)[::8]  # the error's sampled rows, scaled by rows / sampled rows
        err = ((x - np.asarray(numerics.dequantize(ref), np.float64)[::8]) ** 2).sum()
        assert got.squared_error[m] == pytest.approx(err * a.shape[0] / x.shape[0], rel=1e-5, abs=1e-30), m
    assert got.zero_weight_amax == ["attn.o"]


def test_nan_in_a_stack_names_its_module():
    w, groups = _weights()
    w["experts.4.gate"][0, 0] = np.inf
    with pytest.raises(LayerQuantError, match=r"experts\.4\.gate\.weight: it holds NaN"):
        quantize_layer(_as_stacks(w), groups)


def test_a_group_mixing_stacked_and_separate_weights_is_quantized_with_its_group_amax():
    """A fused group with a stacked member and a separate one (experts.2.down with attn.o here) takes
    the stacked member as an array of its own; the down stack's other rows go in two runs (0-1 and
    3-4); every weight still gets the bytes of numerics.quantize with its group amax (numpy)."""
    w, groups = _weights(seed=2)
    groups = groups + [("experts.2.down", "attn.o")]
    group_of = {m: g for g in groups for m in g}
    for max_chunk_bytes in (0, 10**9):
        got = quantize_layer(_as_stacks(w), groups, max_chunk_bytes=max_chunk_bytes)
        for m, a in w.items():
            amax = np.float32(max(np.abs(w[x].astype(np.float32)).max() for x in group_of.get(m, (m,))))
            ref = numerics.quantize(jnp.asarray(a), amax)
            assert np.array_equal(np.asarray(ref.weight), got.tensors[m].weight), m
            assert np.array_equal(np.asarray(ref.weight_scale).view(np.uint8),
                                  got.tensors[m].weight_scale.view(np.uint8)), m
            assert np.asarray(ref.weight_scale_2, np.float32).tobytes() == got.tensors[m].weight_scale_2.tobytes(), m
        assert got.zero_weight_amax == []  # attn.o (zeros) shares experts.2.down's amax now
