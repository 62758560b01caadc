"""Elementwise and linear building blocks of the model families: pure jnp functions.

Every function mirrors the numerics of the transformers 5 PyTorch implementation it replaces
(casts included), because calibration statistics must be those of the model as it is served:

- a Linear multiplies in the compute dtype with float32 accumulation and rounds once to the compute
  dtype (what torch does for bf16 on CPU and GPU);
- RMSNorm normalizes in float32, rounds to the input dtype, then multiplies by the weight;
- an activation runs in float32 and is rounded once.

A layer's tensors reach the layer functions as a `LayerParams`: checkpoint tensor names with the
layer prefix removed ("self_attn.q_proj.weight"), so every layer of one kind has the same pytree
structure and a jitted layer function compiles once per kind. Optional tensors (biases, q/k norms)
are detected by their presence, which is static under jit.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from nvfp4_jax import numerics
from nvfp4_jax.errors import NVFP4Error

from .hessian import block_second_moment_sum

Params = Mapping[str, jax.Array]


class ModelConfigError(NVFP4Error, ValueError):
    """A config.json or a set of tensors the model code cannot run."""


def amax(x: jax.Array) -> jax.Array:
    """max |x| over all elements, taken in x's dtype and widened to float32 (exact)."""
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x @ w.T (+ b) like torch.nn.functional.linear: float32 accumulation, one rounding to x.dtype."""
    y = jnp.einsum("...k,nk->...n", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    y = y.astype(x.dtype)
    if b is not None:
        y = y + b.astype(x.dtype)
    return y


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """transformers' RMSNorm: float32 statistics, rounded to the input dtype, then times the weight."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + jnp.float32(eps))).astype(x.dtype)
    return (w.astype(x.dtype) * normed).astype(x.dtype)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": _gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation as torch computes it for low-precision inputs: in float32, rounded once."""
    if name not in _ACTIVATIONS:
        raise ModelConfigError(f"hidden_act {name!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    fn = _ACTIVATIONS[name]

    def act(x):
        return fn(x.astype(jnp.float32)).astype(x.dtype)

    return act


class LayerParams:
    """The tensors of one decoder layer under local names, for the layer functions.

    `linear(module, x)` applies a Linear and records the amax of its input in `observed` (the
    layer's calibration statistics). `input_amax` (local module name -> f32[], evaluation only)
    makes `linear` NVFP4 fake-quantize that module's input first, as a serving engine quantizes
    it: tensor scale from the amax, dynamic per-block scales. The recorded amax is always that of
    the unquantized input. `collect_hessian` (local-hessian weight scales) also records in
    `hessian` the block second-moment sum of every linear's input (before its own fake quant; K a
    multiple of 16) and in `rows` its number of input rows.
    """

    def __init__(self, params: Params, input_amax: Params | None = None, collect_hessian: bool = False):
        self.params = params
        self.input_amax = input_amax or {}
        self.observed: dict[str, jax.Array] = {}
        self.collect_hessian = collect_hessian
        self.hessian: dict[str, jax.Array] = {}
        self.rows: dict[str, jax.Array] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def __getitem__(self, name: str) -> jax.Array:
        try:
            return self.params[name]
        except KeyError:
            raise ModelConfigError(
                f"tensor {name!r} is missing from the layer parameters (have: {sorted(self.params)[:12]}...)"
            ) from None

    def optional(self, name: str) -> jax.Array | None:
        return self.params.get(name)

    def check_input_amax_used(self) -> None:
        """After the layer function: every input_amax entry named a linear it applied."""
        unused = sorted(set(self.input_amax) - set(self.observed))
        if unused:
            raise ModelConfigError(f"input_amax names {unused[0]!r} (local name), which is no linear of the layer")

    def linear(self, module: str, x: jax.Array) -> jax.Array:
        """Apply the Linear `module` (local name without ".weight") and record its input amax."""
        self.observed[module] = amax(x)
        if self.collect_hessian and x.shape[-1] % 16 == 0:
            self.hessian[module] = block_second_moment_sum(x)
            self.rows[module] = jnp.int32(x.size // x.shape[-1])
        in_amax = self.input_amax.get(module)
        if in_amax is not None:
            x = numerics.fake_quant(x, in_amax)
        return linear(x, self[module + ".weight"], self.optional(module + ".bias"))


def gated_mlp(p: LayerParams, prefix: str, x: jax.Array, act) -> jax.Array:
    """down(act(gate(x)) * up(x)) with the input amax of all three linears recorded."""
    g = p.linear(prefix + "gate_proj", x)
    u = p.linear(prefix + "up_proj", x)
    return p.linear(prefix + "down_proj", act(g) * u)


def input_fake_quant_rows(x: jax.Array, row_amax: jax.Array) -> jax.Array:
    """NVFP4 fake quant of x [R, K] with one tensor amax per row (routed experts: the amax of the
    expert each row goes to) and dynamic per-block scales; result in x's dtype."""
    t = numerics.quantize(x[:, None, :], row_amax.astype(jnp.float32), check=False)
    return numerics.dequantize(t, jnp.float32)[:, 0, :].astype(x.dtype)
