"""Flax NNX modules (nvfp4_jax.models.nnx_modules) against the functional families.

Properties, on the tiny Llama and Kimi-K2 (INT4 routed experts) example checkpoints:
- CausalLM(ids) gives family.forward's logits and LayerStats bitwise (float32 and bfloat16), with
  family.forward fed tensors read independently from the checkpoint; DecoderLayer likewise for
  family.layer_forward;
- nnx.state(model) holds exactly the checkpoint tensors of the embedding/head and of the layers
  loaded, with the values the reader decodes; param_dict() round-trips them;
- nnx.split / nnx.merge / nnx.update keep the model working, and nnx.jit(model)(ids) returns
  statistics of the same structure (static names) and, in float32, family.forward's values up to
  the rounding differences of one fused XLA program;
- the docstring examples run.
"""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nvfp4_jax import examples
from nvfp4_jax.checkpoint.reader import CheckpointReader
from nvfp4_jax.models import ModelConfigError, get_family
from nvfp4_jax.models import nnx_modules
from nvfp4_jax.models import LayerStats
from nvfp4_jax.models.nnx_modules import CausalLM, DecoderLayer

BUILDERS = {"llama": examples.build_llama_tiny, "kimi_k2": examples.build_kimi_k2_tiny}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _ids(batch=2, seq=12, vocab=259):
    return jnp.asarray(np.random.RandomState(0).randint(0, vocab, size=(batch, seq)), jnp.int32)


def _expected_names(family, names, layers):
    out = set(family.embed_param_names(names)) | set(family.head_param_names(names))
    for layer in layers:
        out |= set(family.layer_param_names(layer, names))
    return out


def _reference_params(path, dtype, layers=None):
    """Checkpoint tensors read straight from the reader (not through the NNX code)."""
    reader = CheckpointReader(path)
    try:
        family = get_family(reader.config)
        names = reader.names()
        layers = range(family.num_layers()) if layers is None else layers
        wanted = _expected_names(family, names, layers)
        return family, {n: reader.get(n, dtype=family.param_dtype(n, dtype)) for n in sorted(wanted)}
    finally:
        reader.close()


def _assert_same(a, b):
    """Stats pytrees (LayerStats, lists of them) with the same structure (module names, expert
    prefixes) and bitwise equal leaves."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (path, x.dtype, y.dtype, x.shape, y.shape)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dt", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_causal_lm_matches_family_forward_bitwise(ckpt, name, dt):
    dtype = DTYPES[dt]
    family, params = _reference_params(ckpt(name), dtype)
    model = CausalLM.from_checkpoint(ckpt(name), dtype=dtype)
    ids = _ids()
    ref_logits, ref_stats = family.forward(params, ids, dtype=dtype)
    logits, stats = model(ids)
    assert logits.dtype == dtype and logits.shape == (2, 12, family.config["vocab_size"])
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref_logits))
    assert len(stats) == family.num_layers()
    _assert_same(stats, ref_stats)
    assert all(isinstance(s, LayerStats) for s in stats)
    if name == "kimi_k2":  # MoE layers' stats keep their prefix (static pytree metadata)
        assert [s.experts is None for s in stats] == [not family.is_moe_layer(i) for i in range(3)]
        assert stats[1].experts.prefix == "model.layers.1.mlp.experts"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_decoder_layer_matches_layer_forward(ckpt, name):
    dtype = jnp.bfloat16
    family, params = _reference_params(ckpt(name), dtype)
    hidden = family.embed(params, _ids(), dtype=dtype)
    for layer in range(family.num_layers()):
        mod = DecoderLayer(family, layer, params, dtype=dtype)   # the dict holds other layers too
        assert set(mod.param_dict()) == set(family.layer_param_names(layer, params))
        out, stats = mod(hidden)
        ref_out, ref_stats = family.layer_forward(layer, params, hidden, dtype=dtype)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
        _assert_same(stats, ref_stats)
        hidden = ref_out
    with pytest.raises(ModelConfigError):
        DecoderLayer(family, family.num_layers(), params)
    with pytest.raises(ModelConfigError):
        DecoderLayer(family, 0, {n: v for n, v in params.items() if not n.startswith("model.layers.0.")})


@pytest.mark.parametrize("name,layers", [("llama", None), ("llama", 1), ("kimi_k2", None), ("kimi_k2", [0, 2])])
def test_state_holds_exactly_the_checkpoint_tensors(ckpt, name, layers):
    dtype = jnp.bfloat16
    model = CausalLM.from_checkpoint(ckpt(name), dtype=dtype, layers=layers)
    idx = [0] if layers == 1 else layers
    family, params = _reference_params(ckpt(name), dtype, layers=idx)
    state = nnx.state(model)
    flat = list(nnx.to_flat_state(state))
    assert all(isinstance(v, nnx.Param) for _, v in flat)
    names = [path[-1] for path, _ in flat]
    assert len(names) == len(set(names)) == len(params)
    assert set(names) == set(params)
    for path, var in flat:
        ref = params[path[-1]]
        assert var.get_value().dtype == ref.dtype, path   # float32 routers stay float32
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(ref))
    # layer tensors sit under their layer; param_dict round-trips
    for path, _ in flat:
        if path[0] == "layers":
            assert path[-1].startswith(f"model.layers.{model.layers[path[1]].layer}.")
    assert [m.layer for m in model.layers] == (list(range(family.num_layers())) if idx is None else idx)
    back = model.param_dict()
    assert set(back) == set(params)
    assert all(back[n] is not None and np.array_equal(np.asarray(back[n]), np.asarray(params[n])) for n in params)
    if name == "kimi_k2":
        moe = next(m for m in model.layers if m.kind == "moe")
        assert moe.params[f"model.layers.{moe.layer}.mlp.gate.weight"].get_value().dtype == jnp.float32


@pytest.mark.parametrize("dt", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_split_merge_jit(ckpt, name, dt):
    dtype = DTYPES[dt]
    model = CausalLM.from_checkpoint(ckpt(name), dtype=dtype)
    ids = _ids()
    logits, stats = model(ids)
    ref_logits, ref_stats = model.family.forward(model.param_dict(), ids, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref_logits))

    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    m_logits, m_stats = merged(ids)
    np.testing.assert_array_equal(np.asarray(m_logits), np.asarray(logits))
    _assert_same(m_stats, stats)

    # the whole model under one nnx.jit: the same function compiled as one XLA program, which
    # may fuse and order float operations differently from the eager per-layer jits. In float32
    # that moves values by a few ulps per operation: 1e-5 of the largest logit (amax 4e-5
    # relative) covers the accumulation over the layers; routing can change only where two
    # router scores are within about 1e-6, which these fixed inputs do not have. In bfloat16 one
    # such difference can round the other way (2^-8) and flip a routing decision, which moves
    # that token's logits arbitrarily: there only the structure is compared.
    j_logits, j_stats = nnx.jit(model)(ids)
    assert j_logits.dtype == dtype and j_logits.shape == ref_logits.shape
    assert jax.tree_util.tree_structure(j_stats) == jax.tree_util.tree_structure(ref_stats)
    if dtype == jnp.float32:
        scale = float(jnp.max(jnp.abs(ref_logits)))
        np.testing.assert_allclose(np.asarray(j_logits), np.asarray(ref_logits), rtol=0, atol=1e-5 * scale)
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(j_stats), jax.tree_util.tree_leaves(ref_stats)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=4e-5, atol=0,
                                       err_msg=jax.tree_util.keystr(path))

    # nnx.update writes new values into the module: zeroing the head zeroes the logits
    new_state = jax.tree.map(jnp.zeros_like, nnx.state(model.params))
    nnx.update(merged.params, new_state)
    z_logits, _ = merged(ids)
    assert not np.asarray(z_logits).any()


def test_docstring_examples():
    result = doctest.testmod(nnx_modules, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0, result
