"""Building blocks shared by the model families: pure jnp functions, no parameters of their own.

Every function here mirrors the numerics of the transformers 5 PyTorch implementation it replaces
(casts included), because calibration statistics must be those of the model as it is served:

- a Linear multiplies in the compute dtype with float32 accumulation and rounds once to the compute
  dtype (what torch does for bf16 on CPU and GPU);
- RMSNorm normalizes in float32, rounds to the input dtype, then multiplies by the weight;
- RoPE tables are computed in float32 and rounded to the compute dtype before use;
- attention scores are rounded to the compute dtype, the softmax runs in float32.

Parameters live in plain dicts keyed by checkpoint tensor names with the layer prefix removed
("self_attn.q_proj.weight"), so every layer of one kind has the same pytree structure and a
jitted layer function compiles once per kind. Optional tensors (biases, q/k norms) are detected by
their presence in that dict, which is static under jit.

Evaluation hook (nvfp4_jax.evaluate): a linear's input is NVFP4 fake-quantized, as a serving
engine quantizes it (tensor scale from the checkpoint's input_scale, dynamic per-block scales),
when the layer dict holds "<module>.input_amax" (f32[] = input_scale * 2688) for a non-routed
linear, or "mlp.experts.{e}.{gate,up,down}_proj.input_amax" for every routed expert. Without
these keys (calibration, parity tests) nothing changes; the recorded stats are always the amax of
the unquantized input.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax.errors import NVFP4Error

Params = Mapping[str, jax.Array]

# LayerStats = {"input_amax": {module: f32[]}, "experts": None | {...}} (docs/INTERFACES.md)
LayerStats = dict


class ModelConfigError(NVFP4Error, ValueError):
    """A config.json or a set of tensors the model code cannot run."""


# ----------------------------------------------------------------------------------------------
# elementwise pieces


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


def get_param(p: Params, name: str) -> jax.Array:
    try:
        return p[name]
    except KeyError:
        raise ModelConfigError(
            f"tensor {name!r} is missing from the layer parameters (have: {sorted(p)[:12]}...)"
        ) from None


def input_fake_quant_rows(x: jax.Array, row_amax: jax.Array) -> jax.Array:
    """NVFP4 fake quant of x [R, K] with one tensor amax per row (routed experts: the amax of the
    expert each row goes to) and dynamic per-block scales; result in x's dtype."""
    from nvfp4_jax import numerics

    t = numerics.quantize(x[:, None, :], row_amax.astype(jnp.float32), check=False)
    return numerics.dequantize(t, jnp.float32)[:, 0, :].astype(x.dtype)


def proj(p: Params, module: str, x: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
    """Apply the Linear `module` (local name without ".weight") and record its input amax.

    With p[module + ".input_amax"] present, the input is NVFP4 fake-quantized first (evaluation
    hook, see the module docstring)."""
    stats[module] = amax(x)
    in_amax = p.get(module + ".input_amax")
    if in_amax is not None:
        from nvfp4_jax import numerics

        x = numerics.fake_quant(x, in_amax)
    return linear(x, get_param(p, module + ".weight"), p.get(module + ".bias"))


def gated_mlp(p: Params, prefix: str, x: jax.Array, act, stats: dict[str, jax.Array]) -> jax.Array:
    """down(act(gate(x)) * up(x)) with the input amax of all three linears recorded."""
    g = proj(p, prefix + "gate_proj", x, stats)
    u = proj(p, prefix + "up_proj", x, stats)
    return proj(p, prefix + "down_proj", act(g) * u, stats)


# ----------------------------------------------------------------------------------------------
# RoPE


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE parameters of a raw config.json, standardized as transformers 5 does.

    Accepts transformers 5 `rope_parameters` and older `rope_scaling` + `rope_theta` layouts.
    """
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rp = dict(rp)
    if any(isinstance(v, dict) for v in rp.values()):
        raise ModelConfigError("per-layer-type rope_parameters are not supported by this model family")
    rp.setdefault("rope_type", rp.get("type", "default"))
    rp.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in config and config["partial_rotary_factor"] is not None:
        rp.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if rp["rope_type"] in ("llama3", "yarn", "longrope"):
        if config.get("original_max_position_embeddings") is not None:
            rp["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        else:
            rp.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return rp


def _f32(v) -> np.float32:
    return np.float32(v)


def rope_inv_freq(rp: Mapping[str, Any], head_dim: int, max_position_embeddings: int | None):
    """(inv_freq float32 [dim/2], attention_factor) as transformers' ROPE_INIT_FUNCTIONS compute them.

    Supported rope_type: default, linear, llama3, yarn (dynamic only below max_position_embeddings,
    where it equals default).
    """
    rope_type = rp["rope_type"]
    base = float(rp["rope_theta"])
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    exponents = np.arange(0, dim, 2).astype(np.float32) / _f32(dim)
    pos_freqs = (_f32(base) ** exponents).astype(np.float32)
    inv_freq = (_f32(1.0) / pos_freqs).astype(np.float32)
    attention_factor = 1.0

    if rope_type in ("default", "dynamic"):
        pass
    elif rope_type == "linear":
        inv_freq = (inv_freq / _f32(rp["factor"])).astype(np.float32)
    elif rope_type == "llama3":
        factor = float(rp["factor"])
        low_freq_factor = float(rp["low_freq_factor"])
        high_freq_factor = float(rp["high_freq_factor"])
        old_context_len = float(rp["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = (_f32(2 * math.pi) / inv_freq).astype(np.float32)
        inv_freq_llama = np.where(wavelen > _f32(low_freq_wavelen), inv_freq / _f32(factor), inv_freq)
        inv_freq_llama = inv_freq_llama.astype(np.float32)
        smooth = ((_f32(old_context_len) / wavelen - _f32(low_freq_factor))
                  / _f32(high_freq_factor - low_freq_factor)).astype(np.float32)
        smoothed = ((_f32(1) - smooth) * inv_freq_llama / _f32(factor) + smooth * inv_freq_llama)
        is_medium = ~(wavelen < _f32(high_freq_wavelen)) & ~(wavelen > _f32(low_freq_wavelen))
        inv_freq = np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)
    elif rope_type == "yarn":
        factor = rp.get("factor")
        original = rp["original_max_position_embeddings"]
        if factor is None:
            factor = max_position_embeddings / original
        factor = float(factor)
        attention_factor = rp.get("attention_factor")
        mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
            else:
                attention_factor = yarn_get_mscale(factor)
        beta_fast = rp.get("beta_fast") or 32
        beta_slow = rp.get("beta_slow") or 1

        def correction_dim(num_rotations):
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rp.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((np.arange(dim // 2).astype(np.float32) - _f32(low)) / _f32(high - low)).astype(np.float32)
        ramp = np.clip(ramp, 0, 1).astype(np.float32)
        extrapolation_factor = (_f32(1) - ramp).astype(np.float32)
        inv_extra = (_f32(1.0) / pos_freqs).astype(np.float32)
        inv_inter = (_f32(1.0) / (_f32(factor) * pos_freqs)).astype(np.float32)
        inv_freq = (inv_inter * (_f32(1) - extrapolation_factor) + inv_extra * extrapolation_factor)
        inv_freq = inv_freq.astype(np.float32)
    else:
        raise ModelConfigError(
            f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3, yarn)"
        )
    return inv_freq, float(attention_factor)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_cos_sin(seq_len: int, inv_freq: Sequence[float], attention_factor: float, dtype):
    """cos, sin [S, dim] for positions 0..S-1: float32 tables rounded to the compute dtype."""
    inv = jnp.asarray(np.asarray(inv_freq, dtype=np.float32))
    pos = jnp.arange(seq_len, dtype=jnp.float32)
    freqs = pos[:, None] * inv[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = (jnp.cos(emb) * jnp.float32(attention_factor)).astype(dtype)
    sin = (jnp.sin(emb) * jnp.float32(attention_factor)).astype(dtype)
    return cos, sin


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split RoPE on x [B, S, H, D] with cos/sin [S, D] (rotary part may be D' < D: partial)."""
    rot = cos.shape[-1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    if rot == x.shape[-1]:
        return x * c + _rotate_half(x) * s
    xr, xp = x[..., :rot], x[..., rot:]
    return jnp.concatenate([xr * c + _rotate_half(xr) * s, xp], axis=-1)


def apply_rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """DeepSeek's interleaved-pair RoPE, laid out as transformers' apply_rotary_pos_emb_interleave:
    output = [x_even*cos - x_odd*sin, x_odd*cos + x_even*sin] (de-interleaved)."""
    half = cos.shape[-1] // 2
    c, s = cos[None, :, None, :half], sin[None, :, None, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


# ----------------------------------------------------------------------------------------------
# attention


def causal_attention(q, k, v, scaling: float, sliding_window: int | None = None):
    """Causal attention as torch's scaled_dot_product_attention computes it on CPU (transformers'
    default "sdpa"): q [B,S,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv] -> [B,S,Hq,Dv].

    Scores q.k accumulate in float32 and are scaled there; exp(s - max) and the row sums stay in
    float32; the unnormalised probabilities are rounded to the compute dtype for the product with
    v (float32 accumulation), which is divided by the float32 row sum and rounded once. For float32
    inputs this is ordinary softmax attention.
    """
    dtype = q.dtype
    _, seq, hq, _ = q.shape
    hkv = k.shape[2]
    if hq != hkv:
        rep = hq // hkv
        k = jnp.repeat(k, rep, axis=2)
        v = jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(scaling)
    qi = jnp.arange(seq)[:, None]
    ki = jnp.arange(seq)[None, :]
    allowed = ki <= qi
    if sliding_window is not None:
        allowed = allowed & (ki > qi - sliding_window)
    scores = jnp.where(allowed[None, None], scores, -jnp.inf)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    row_sum = jnp.sum(p, axis=-1)  # [B,H,Q]
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.transpose(row_sum, (0, 2, 1))[..., None]
    return out.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Mixture of experts: dispatch sorted by expert, grouped matmul, per-expert statistics


def sort_by_expert(x_tokens: jax.Array, topk_ids: jax.Array, num_experts: int):
    """Flatten (token, k) assignments and sort them by expert id.

    Returns x_sorted [T*k, H], expert_sorted [T*k], order [T*k] (assignment index t*k+j of each
    sorted row), group_sizes int32 [E], gate_up_input_amax f32 [E] (0 for experts without tokens).
    """
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    expert_sorted = flat[order]
    x_sorted = x_tokens[order // k]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    row_amax = jnp.max(jnp.abs(x_sorted), axis=-1).astype(jnp.float32)
    gu_amax = jax.ops.segment_max(row_amax, expert_sorted, num_segments=num_experts,
                                  indices_are_sorted=True)
    gu_amax = jnp.where(group_sizes > 0, gu_amax, 0.0).astype(jnp.float32)
    return x_sorted, expert_sorted, order, group_sizes, gu_amax


def _stack_experts(gate: Sequence[jax.Array], up: Sequence[jax.Array], down: Sequence[jax.Array], dtype):
    """Per-expert checkpoint tensors -> ragged_dot operands [C+1, H, 2I] and [C+1, I, H].

    Group 0 is an all-zero expert that absorbs the rows of experts before this chunk, so a chunk
    can be run on the full sorted row array (rows after the chunk are not covered: output 0).
    """
    g = jnp.stack([w.astype(dtype) for w in gate])   # [C, I, H]
    u = jnp.stack([w.astype(dtype) for w in up])
    d = jnp.stack([w.astype(dtype) for w in down])   # [C, H, I]
    gu = jnp.concatenate([g, u], axis=1).swapaxes(1, 2)  # [C, H, 2I]
    dn = d.swapaxes(1, 2)  # [C, I, H]
    gu = jnp.concatenate([jnp.zeros((1,) + gu.shape[1:], dtype), gu], axis=0)
    dn = jnp.concatenate([jnp.zeros((1,) + dn.shape[1:], dtype), dn], axis=0)
    return gu, dn


def experts_chunk(x_sorted, expert_sorted, group_sizes, start, gate, up, down, *, act_name: str,
                  gate_up_in_amax=None, down_in_amax=None):
    """Run experts [start, start+C) on their rows of the expert-sorted assignments.

    gate_up_in_amax / down_in_amax (f32 [C], optional evaluation hook): fake-quantize each row's
    gate/up resp. down input with its expert's input amax.
    Returns (y_sorted [T*k, H] with zeros outside the chunk's rows, down_input_amax f32 [C]).
    """
    dtype = x_sorted.dtype
    c = len(gate)
    act = activation(act_name)
    gu_w, dn_w = _stack_experts(gate, up, down, dtype)
    num_experts = group_sizes.shape[0]
    before = jnp.sum(jnp.where(jnp.arange(num_experts) < start, group_sizes, 0)).astype(jnp.int32)
    chunk_sizes = jax.lax.dynamic_slice(group_sizes, (start,), (c,))
    sizes = jnp.concatenate([before[None], chunk_sizes]).astype(jnp.int32)
    local = expert_sorted - start  # out-of-chunk ids fall outside [0, C) and are dropped
    row_expert = jnp.clip(local, 0, c - 1)  # rows outside the chunk: any amax, their output is unused
    x_in = x_sorted
    if gate_up_in_amax is not None:
        x_in = input_fake_quant_rows(x_sorted, gate_up_in_amax[row_expert])
    gu = jax.lax.ragged_dot(x_in, gu_w, sizes, preferred_element_type=jnp.float32).astype(dtype)
    inter = gu.shape[-1] // 2
    h = act(gu[:, :inter]) * gu[:, inter:]
    row_amax = jnp.max(jnp.abs(h), axis=-1).astype(jnp.float32)
    down_amax = jax.ops.segment_max(row_amax, local, num_segments=c, indices_are_sorted=True)
    down_amax = jnp.where(chunk_sizes > 0, down_amax, 0.0).astype(jnp.float32)
    if down_in_amax is not None:
        h = input_fake_quant_rows(h, down_in_amax[row_expert])
    y = jax.lax.ragged_dot(h, dn_w, sizes, preferred_element_type=jnp.float32).astype(dtype)
    return y, down_amax


def combine_experts(y_sorted, order, topk_ids, topk_weights, dtype):
    """Weighted sum of each token's expert outputs -> [T, H].

    As transformers does: each output times its routing weight (promoted dtype), rounded to the
    compute dtype, then added into a compute-dtype accumulator in ascending expert id.
    """
    t, k = topk_ids.shape
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, -1)
    contrib = (y * topk_weights[..., None]).astype(dtype)
    perm = jnp.argsort(topk_ids, axis=-1)
    contrib = jnp.take_along_axis(contrib, perm[..., None], axis=1)
    acc = jnp.zeros((t, y.shape[-1]), dtype)
    for j in range(k):
        acc = (acc + contrib[:, j]).astype(dtype)
    return acc


@dataclasses.dataclass(frozen=True)
class ExpertNames:
    """Checkpoint names of one MoE layer's routed experts."""

    prefix: str  # "model.layers.{l}.mlp.experts"
    num_experts: int

    def name(self, e: int, proj_name: str) -> str:
        return f"{self.prefix}.{e}.{proj_name}.weight"


# ----------------------------------------------------------------------------------------------
# jitted edges: one compiled function per layer kind (the static spec and pytree structure are the
# same for every layer of a kind)


def _run_dense(layer_fn, spec, p, hidden, sliding_window):
    return layer_fn(spec, p, hidden, sliding_window)


_run_dense_jit = jax.jit(_run_dense, static_argnames=("layer_fn", "spec", "sliding_window"))


def _moe_pre(pre_fn, spec, p, hidden, sliding_window):
    h_resid, x_tokens, topk_ids, topk_w, shared_out, stats = pre_fn(spec, p, hidden, sliding_window)
    x_sorted, expert_sorted, order, group_sizes, gu_amax = sort_by_expert(
        x_tokens, topk_ids, spec.num_experts)
    return (h_resid, topk_ids, topk_w, shared_out, stats,
            x_sorted, expert_sorted, order, group_sizes, gu_amax)


_moe_pre_jit = jax.jit(_moe_pre, static_argnames=("pre_fn", "spec", "sliding_window"))
_experts_chunk_jit = jax.jit(experts_chunk, static_argnames=("act_name",))


def _moe_post(h_resid, y_sorted, order, topk_ids, topk_w, shared_out):
    dtype = h_resid.dtype
    moe = combine_experts(y_sorted, order, topk_ids, topk_w, dtype)
    if shared_out is not None:
        moe = (moe + shared_out).astype(dtype)
    return (h_resid + moe.reshape(h_resid.shape)).astype(dtype)


_moe_post_jit = jax.jit(_moe_post)


def _embed(w, input_ids, dtype):
    return jnp.take(w, input_ids, axis=0).astype(dtype)


_embed_jit = jax.jit(_embed, static_argnames=("dtype",))


def _head(norm_w, lm_w, hidden, eps):
    return linear(rms_norm(hidden, norm_w, eps), lm_w)


_head_jit = jax.jit(_head, static_argnames=("eps",))


EXPERT_STACK_BYTES = 2 << 30  # default bound on the experts stacked at once for one grouped matmul


def _auto_chunk(lists, num_experts: int) -> int:
    per_expert = sum(int(np.prod(lst[0].shape)) * jnp.dtype(lst[0].dtype).itemsize for lst in lists.values())
    return max(1, min(num_experts, EXPERT_STACK_BYTES // max(per_expert, 1)))


class Family:
    """A model family bound to one config.json: names of its tensors plus one forward per layer kind.

    Subclasses set `name`, build a hashable `spec` (static hyperparameters) and implement
    `_dense_layer(spec, p, hidden, sliding_window) -> (hidden, stats)` and, for MoE families,
    `_moe_pre(spec, p, hidden, sliding_window) -> (h_resid, x_tokens [T,H], topk_ids [T,k],
    topk_weights [T,k], shared_out [T,H] | None, stats)`, all static methods over local names.
    """

    name: str = ""
    _dense_layer: Callable
    _moe_pre: Callable | None = None

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if self.config.get(key) is None:
                raise ModelConfigError(f"config.json has no {key!r}, which the {self.name} family needs")
        self.spec = self._make_spec(self.config)

    # -- names -----------------------------------------------------------------------------
    def num_layers(self, config: Mapping[str, Any] | None = None) -> int:
        return int((config or self.config)["num_hidden_layers"])

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def layer_param_names(self, layer: int, all_names) -> list[str]:
        """Checkpoint tensor names that belong to decoder layer `layer`."""
        prefix = self.layer_prefix(layer)
        return [n for n in all_names if n.startswith(prefix)]

    def _decoder_layer_of(self, name: str) -> int | None:
        if not name.startswith("model.layers."):
            return None
        part = name[len("model.layers."):].split(".", 1)[0]
        return int(part) if part.isdigit() else None

    def non_layer_names(self, all_names) -> list[str]:
        """Names outside decoder layers 0..N-1: embeddings, final norm, lm_head, and extra
        layers such as DeepSeek's MTP block (model.layers.{N}...), which calibration never runs."""
        n = self.num_layers()
        out = []
        for name in all_names:
            layer = self._decoder_layer_of(name)
            if layer is None or layer >= n:
                out.append(name)
        return out

    def embed_param_names(self, all_names=None) -> list[str]:
        return ["model.embed_tokens.weight"]

    def head_param_names(self, all_names=None) -> list[str]:
        """Tensors `head` reads: the final norm and lm_head (the embedding when tied/absent)."""
        names = ["model.norm.weight"]
        if self._tied(all_names):
            names.append("model.embed_tokens.weight")
        else:
            names.append("lm_head.weight")
        return names

    def _tied(self, all_names=None) -> bool:
        if self.config.get("tie_word_embeddings", False):
            return True
        return all_names is not None and "lm_head.weight" not in set(all_names)

    def is_moe_layer(self, layer: int) -> bool:
        return False

    def layer_kind(self, layer: int) -> str:
        return "moe" if self.is_moe_layer(layer) else "dense"

    @property
    def num_experts(self) -> int:
        return 0

    def expert_prefix(self, layer: int) -> str | None:
        return f"model.layers.{layer}.mlp.experts" if self.is_moe_layer(layer) else None

    def param_dtype(self, name: str, compute_dtype=jnp.bfloat16):
        """dtype `name` should be decoded to for the forward (routers may need float32)."""
        return compute_dtype

    def sliding_window(self, layer: int) -> int | None:
        return None

    def read_layer(self, reader, layer: int, dtype=jnp.bfloat16, names=None) -> dict[str, jax.Array]:
        """Layer `layer`'s tensors from a CheckpointReader, each in param_dtype(name, dtype)."""
        names = self.layer_param_names(layer, reader.names() if names is None else names)
        return {n: reader.get(n, dtype=self.param_dtype(n, dtype)) for n in names}

    # -- forward ---------------------------------------------------------------------------
    def embed(self, params: Params, input_ids, *, dtype=None) -> jax.Array:
        w = get_param(params, "model.embed_tokens.weight")
        return _embed_jit(w, jnp.asarray(input_ids, jnp.int32), jnp.dtype(dtype or w.dtype))

    def head(self, params: Params, hidden: jax.Array) -> jax.Array:
        """Final norm + lm_head -> logits [B, S, V] in hidden's dtype."""
        lm = params.get("lm_head.weight")
        if lm is None or self.config.get("tie_word_embeddings", False):
            lm = get_param(params, "model.embed_tokens.weight")
        return _head_jit(get_param(params, "model.norm.weight"), lm, hidden, float(self.spec.eps))

    def layer_forward(self, layer: int, params: Params, hidden: jax.Array, *, dtype=jnp.bfloat16,
                      return_routing: bool = False, expert_chunk_size: int | None = None):
        """Run decoder layer `layer` on hidden [B, S, H] -> (hidden, LayerStats).

        params: checkpoint-named tensors; only the names of this layer are read (the dict may hold
        more). Routed experts are per-expert tensors; they are stacked `expert_chunk_size` at a
        time (default: as many as fit EXPERT_STACK_BYTES, 2 GiB), which bounds the extra memory
        of stacking (each chunk runs one grouped matmul over the expert-sorted rows).
        return_routing adds stats["experts"]["topk_ids"] int32 [B*S, k], ascending per token.
        """
        if not 0 <= layer < self.num_layers():
            raise ModelConfigError(f"layer {layer} is out of range 0..{self.num_layers() - 1}")
        dtype = jnp.dtype(dtype)
        prefix = self.layer_prefix(layer)
        hidden = jnp.asarray(hidden).astype(dtype)
        local = {n[len(prefix):]: v for n, v in params.items() if n.startswith(prefix)}
        if not local:
            raise ModelConfigError(f"no tensors named {prefix}* in the parameters passed for layer {layer}")
        window = self.sliding_window(layer)
        if not self.is_moe_layer(layer):
            if any(n.startswith("mlp.experts.") for n in local):
                raise ModelConfigError(
                    f"layer {layer} has routed experts but the config makes it a dense layer "
                    "(check first_k_dense_replace / moe_layer_freq / decoder_sparse_step / mlp_only_layers)")
            hidden, stats = _run_dense_jit(type(self)._dense_layer, self.spec, local, hidden, window)
            return hidden, {"input_amax": {prefix + k: v for k, v in stats.items()}, "experts": None}
        return self._moe_forward(layer, prefix, local, hidden, window, return_routing, expert_chunk_size)

    def _moe_forward(self, layer, prefix, local, hidden, window, return_routing, expert_chunk_size):
        num_experts = self.spec.num_experts
        experts = {n: v for n, v in local.items() if n.startswith("mlp.experts.")}
        rest = {n: v for n, v in local.items() if not n.startswith("mlp.experts.")}
        names = ExpertNames(prefix + "mlp.experts", num_experts)
        lists = {}
        for proj_name in ("gate_proj", "up_proj", "down_proj"):
            lst = []
            for e in range(num_experts):
                key = f"mlp.experts.{e}.{proj_name}.weight"
                if key not in experts:
                    raise ModelConfigError(
                        f"routed expert tensor {names.name(e, proj_name)!r} is missing "
                        "(routed experts must be given per expert, checkpoint layout)")
                lst.append(experts[key])
            lists[proj_name] = lst
        in_amax = self._expert_input_amax(names, experts)
        (h_resid, topk_ids, topk_w, shared_out, stats, x_sorted, expert_sorted, order,
         group_sizes, gu_amax) = _moe_pre_jit(type(self)._moe_pre, self.spec, rest, hidden, window)
        chunk = expert_chunk_size or _auto_chunk(lists, num_experts)
        y_sorted = None
        down_amax = []
        for start in range(0, num_experts, chunk):
            stop = min(start + chunk, num_experts)
            hook = {} if in_amax is None else {"gate_up_in_amax": in_amax[0][start:stop],
                                               "down_in_amax": in_amax[1][start:stop]}
            y, d = _experts_chunk_jit(
                x_sorted, expert_sorted, group_sizes, jnp.int32(start),
                lists["gate_proj"][start:stop], lists["up_proj"][start:stop],
                lists["down_proj"][start:stop], act_name=self.spec.act, **hook)
            y_sorted = y if y_sorted is None else y_sorted + y
            down_amax.append(d)
        out = _moe_post_jit(h_resid, y_sorted, order, topk_ids, topk_w, shared_out)
        expert_stats = {
            "prefix": names.prefix,
            "gate_up_input_amax": gu_amax,
            "down_input_amax": jnp.concatenate(down_amax),
            "tokens_per_expert": group_sizes,
        }
        if return_routing:
            expert_stats["topk_ids"] = jnp.sort(topk_ids, axis=-1).astype(jnp.int32)
        return out, {"input_amax": {prefix + k: v for k, v in stats.items()}, "experts": expert_stats}

    @staticmethod
    def _expert_input_amax(names: ExpertNames, experts: Params):
        """Evaluation hook: (gate/up input amax f32 [E], down input amax f32 [E]) when the routed
        experts carry "mlp.experts.{e}.*.input_amax", else None. gate and up share one input, so
        they get the max of their two amaxes (equal in a checkpoint that unifies fused groups)."""
        key = "mlp.experts.{}.{}.input_amax"
        present = [key.format(e, pn) in experts for e in range(names.num_experts)
                   for pn in ("gate_proj", "up_proj", "down_proj")]
        if not any(present):
            return None
        if not all(present):
            raise ModelConfigError(
                f"input_amax is given for some but not all routed experts of {names.prefix}")
        gu = jnp.stack([jnp.maximum(experts[key.format(e, "gate_proj")], experts[key.format(e, "up_proj")])
                        for e in range(names.num_experts)]).astype(jnp.float32)
        dn = jnp.stack([experts[key.format(e, "down_proj")]
                        for e in range(names.num_experts)]).astype(jnp.float32)
        return gu, dn

    def forward(self, params: Params, input_ids, *, dtype=jnp.bfloat16, return_routing=False):
        """Whole model: logits [B, S, V] and the LayerStats of every layer (tests, evaluation)."""
        hidden = self.embed(params, input_ids, dtype=dtype)
        all_stats = []
        for layer in range(self.num_layers()):
            hidden, stats = self.layer_forward(layer, params, hidden, dtype=dtype,
                                               return_routing=return_routing)
            all_stats.append(stats)
        return self.head(params, hidden), all_stats

    @staticmethod
    def _make_spec(config):  # pragma: no cover - abstract
        raise NotImplementedError
