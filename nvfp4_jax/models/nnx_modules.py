"""Flax NNX modules over the functional model families (a thin layer; numerics unchanged).

The families in this package (`get_family(config)`) are pure functions over a dict of checkpoint
tensors; the calibration pipeline uses them directly. This module wraps them as NNX modules for
users who want the usual Flax workflow (`nnx.state`, `nnx.split` / `nnx.merge`, `nnx.jit`):

- `DecoderLayer` holds the tensors of one decoder layer as `nnx.Param`s in an `nnx.Dict` keyed by
  their checkpoint names ("model.layers.0.self_attn.q_proj.weight"), and its `__call__` is
  `family.layer_forward`, so outputs and calibration statistics are those of the functional API,
  bit for bit.
- `CausalLM` is embed + a list of `DecoderLayer` + final norm / lm_head, built from a checkpoint
  directory with `CausalLM.from_checkpoint(path, dtype=..., layers=...)`.

`param_dict()` on either module returns the plain `{checkpoint name: array}` dict again, so
`family.forward(model.param_dict(), ids, dtype=model.dtype)` is the functional equivalent of
`model(ids)`; `nnx.state(model)` holds exactly these tensors (a tied lm_head adds nothing).

The statistics are `LayerStats` pytrees whose names are static metadata, so `nnx.jit(model)(ids)`
returns them as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .family import Family
from .ops import ModelConfigError
from .registry import get_family
from .stats import LayerStats

__all__ = ["CausalLM", "DecoderLayer"]


def _values(d: nnx.Dict) -> dict[str, jax.Array]:
    return {name: d[name].get_value() for name in d}


# ----------------------------------------------------------------------------------------------
# modules


class DecoderLayer(nnx.Module):
    """One decoder layer of a model family, its checkpoint tensors held as `nnx.Param`s.

    The forward is `family.layer_forward(layer, params, hidden, dtype=dtype)` over the tensors held
    here, so the hidden state and the calibration statistics (LayerStats: per-linear input amax,
    routed-expert amaxes and token counts) are bitwise those of the functional API.

    Example usage::

      >>> import tempfile, jax.numpy as jnp
      >>> from flax import nnx
      >>> from nvfp4_jax.checkpoint.reader import CheckpointReader
      >>> from nvfp4_jax.examples import build_llama_tiny
      >>> from nvfp4_jax.models import get_family
      >>> from nvfp4_jax.models.nnx_modules import DecoderLayer
      >>> reader = CheckpointReader(build_llama_tiny(tempfile.mkdtemp()))
      >>> family = get_family(reader.config)
      >>> layer = DecoderLayer(family, 0, family.read_layer(reader, 0, jnp.float32), dtype=jnp.float32)
      >>> layer.params['model.layers.0.self_attn.q_proj.weight'].shape
      (128, 128)
      >>> hidden, stats = layer(jnp.ones((1, 8, 128), jnp.float32))
      >>> hidden.shape, sorted(stats.input_amax)[0]
      ((1, 8, 128), 'model.layers.0.mlp.down_proj')
      >>> len(nnx.state(layer, nnx.Param)['params'])  # the layer's 9 checkpoint tensors
      9

    Args:
      family: the model family (`get_family(config)`), kept as static metadata.
      layer: the decoder layer index, 0 <= layer < family.num_layers().
      params: checkpoint-named tensors; those named "model.layers.{layer}.*" are kept (the dict may
        hold more). Values are stored as given (`family.read_layer` already applies
        `family.param_dtype`, e.g. float32 routers).
      dtype: the compute dtype of the forward (default: bfloat16).

    Attributes:
      params: `nnx.Dict` {checkpoint name: nnx.Param}.
    """

    def __init__(self, family: Family, layer: int, params: Mapping[str, Any], *, dtype=jnp.bfloat16):
        if not 0 <= layer < family.num_layers():
            raise ModelConfigError(f"layer {layer} is out of range 0..{family.num_layers() - 1}")
        names = family.layer_param_names(layer, params)
        if not names:
            raise ModelConfigError(f"no tensors named {family.layer_prefix(layer)}* for layer {layer}")
        self.family = family
        self.layer = int(layer)
        self.kind = family.layer_kind(layer)
        self.dtype = jnp.dtype(dtype)
        self.params = nnx.Dict({n: nnx.Param(jnp.asarray(params[n])) for n in sorted(names)})

    @classmethod
    def from_reader(cls, family: Family, reader, layer: int, *, dtype=jnp.bfloat16) -> "DecoderLayer":
        """Layer `layer` read with `family.read_layer(reader, layer, dtype)` (a CheckpointReader)."""
        return cls(family, layer, family.read_layer(reader, layer, dtype=dtype), dtype=dtype)

    def param_dict(self) -> dict[str, jax.Array]:
        """{checkpoint name: array} of this layer, as `family.read_layer` returns it."""
        return _values(self.params)

    def __call__(self, hidden: jax.Array) -> tuple[jax.Array, LayerStats]:
        """hidden [B, S, H] -> (hidden [B, S, H] in `dtype`, LayerStats); see family.layer_forward."""
        return self.family.layer_forward(self.layer, self.param_dict(), hidden, dtype=self.dtype)


class CausalLM(nnx.Module):
    """A causal language model: embedding, a list of `DecoderLayer`, final norm and lm_head.

    `model(input_ids)` returns (logits [B, S, V] in `dtype`, [LayerStats per layer]) and equals
    `family.forward(model.param_dict(), input_ids, dtype=dtype)` bitwise when all layers are held.
    Under `nnx.jit(model)` the whole model becomes one XLA program, whose fusions across layers may
    round differently from the per-layer jits of eager calls (about 1 ulp of the logits); it is
    compiled with XLA's default options, so bf16 intermediates may keep float32 precision where the
    eager calls round as torch does (models/exact_jit.py).
    With `layers` a subset, the held layers run in order between the embedding and the head (a
    truncated model, e.g. for quick looks at the first layers' statistics).

    Example usage::

      >>> import tempfile, jax.numpy as jnp
      >>> from flax import nnx
      >>> from nvfp4_jax.examples import build_llama_tiny
      >>> from nvfp4_jax.models.nnx_modules import CausalLM
      >>> model = CausalLM.from_checkpoint(build_llama_tiny(tempfile.mkdtemp()), dtype=jnp.float32)
      >>> ids = jnp.array([[1, 2, 3, 4]], jnp.int32)
      >>> logits, stats = model(ids)
      >>> logits.shape, len(stats)
      ((1, 4, 259), 2)
      >>> graphdef, state = nnx.split(model)
      >>> jitted = nnx.jit(nnx.merge(graphdef, state))   # one XLA program: equal up to rounding
      >>> bool(jnp.allclose(jitted(ids)[0], logits, rtol=0, atol=1e-4))
      True
      >>> 'model.layers.1.mlp.up_proj.weight' in model.param_dict()
      True

    Args:
      family: the model family (`get_family(config)`).
      params: checkpoint-named tensors: the embedding, final norm and lm_head (absent when tied)
        plus the tensors of every layer in `layers`.
      layers: None (all layers), an int n (layers 0..n-1) or a sequence of layer indices.
      dtype: the compute dtype (default: bfloat16).

    Attributes:
      params: `nnx.Dict` {checkpoint name: nnx.Param} of the non-layer tensors (embedding, norm,
        lm_head).
      layers: `nnx.List` of `DecoderLayer`.
    """

    def __init__(self, family: Family, params: Mapping[str, Any], *,
                 layers: int | Iterable[int] | None = None, dtype=jnp.bfloat16):
        self.family = family
        self.dtype = jnp.dtype(dtype)
        names = list(params)
        outer = dict.fromkeys(family.embed_param_names(names) + family.head_param_names(names))
        missing = [n for n in outer if n not in params]
        if missing:
            raise ModelConfigError(f"tensors {missing} are missing from the parameters")
        self.params = nnx.Dict({n: nnx.Param(jnp.asarray(params[n])) for n in outer})
        self.layers = nnx.List([DecoderLayer(family, i, params, dtype=dtype)
                                for i in _layer_indices(family, layers)])

    @classmethod
    def from_checkpoint(cls, path, dtype=jnp.bfloat16, layers: int | Iterable[int] | None = None,
                        *, config: Mapping[str, Any] | None = None) -> "CausalLM":
        """Load an HF checkpoint directory (plain, FP8-block or INT4-pack weights are decoded by
        CheckpointReader). Each tensor is read in `family.param_dtype(name, dtype)`; decoder
        layers via `family.read_layer`. `config` overrides the directory's config.json."""
        from ..checkpoint.reader import CheckpointReader

        reader = CheckpointReader(Path(path))
        try:
            family = get_family(config if config is not None else reader.config)
            names = reader.names()
            outer = dict.fromkeys(family.embed_param_names(names) + family.head_param_names(names))
            params = {n: reader.get(n, dtype=family.param_dtype(n, dtype)) for n in outer}
            for i in _layer_indices(family, layers):
                params.update(family.read_layer(reader, i, dtype=dtype, names=names))
        finally:
            reader.close()
        return cls(family, params, layers=layers, dtype=dtype)

    def param_dict(self) -> dict[str, jax.Array]:
        """{checkpoint name: array} of every tensor held (non-layer tensors and all layers)."""
        out = _values(self.params)
        for layer in self.layers:
            out.update(layer.param_dict())
        return out

    def embed(self, input_ids) -> jax.Array:
        """input_ids [B, S] int -> hidden [B, S, H] in `dtype`."""
        return self.family.embed(_values(self.params), input_ids, dtype=self.dtype)

    def head(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, S, H] -> logits [B, S, V] (final norm + lm_head)."""
        return self.family.head(_values(self.params), hidden)

    def __call__(self, input_ids) -> tuple[jax.Array, list[LayerStats]]:
        hidden = self.embed(input_ids)
        all_stats = []
        for layer in self.layers:
            hidden, stats = layer(hidden)
            all_stats.append(stats)
        return self.head(hidden), all_stats


def _layer_indices(family: Family, layers) -> list[int]:
    n = family.num_layers()
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        if not 0 <= layers <= n:
            raise ModelConfigError(f"layers={layers} is out of range 0..{n}")
        return list(range(layers))
    idx = [int(i) for i in layers]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ModelConfigError(f"layers {bad} are out of range 0..{n - 1}")
    return idx
