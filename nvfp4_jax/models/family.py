"""`Family`: the base of the model families, a config.json bound to the names of its tensors and
one jitted forward per layer kind.

Each layer kind compiles once: the static spec and the pytree structure of the layer's tensors
(local names, prefix removed) are the same for every layer of a kind.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from nvfp4_jax.families import find_family_spec

from .exact_jit import exact_jit
from .hessian import expert_block_second_moment_sum
from .moe import ExpertNames, ExpertStacks, LayerTensors, combine_experts, run_experts, sort_by_expert
from .ops import LayerParams, ModelConfigError, Params, linear, rms_norm
from .stats import LayerStats, RoutedExpertStats

_EXPERTS = "mlp.experts."


class _Static(NamedTuple):
    """The static options of one layer call (hashable: part of the jit cache key)."""

    sliding_window: int | None
    collect_hessian: bool


def _run_dense(layer_fn, spec, params, input_amax, hidden, static: _Static):
    p = LayerParams(params, input_amax, static.collect_hessian)
    hidden = layer_fn(spec, p, hidden, static.sliding_window)
    p.check_input_amax_used()  # at trace time: once per set of names
    return hidden, p.observed, (p.hessian, p.rows)


_run_dense_jit = exact_jit(_run_dense, static_argnames=("layer_fn", "spec", "static"))


def _moe_pre(pre_fn, spec, params, input_amax, hidden, static: _Static):
    p = LayerParams(params, input_amax, static.collect_hessian)
    h_resid, x_tokens, topk_ids, topk_w, shared_out = pre_fn(spec, p, hidden, static.sliding_window)
    p.check_input_amax_used()
    dispatch = sort_by_expert(x_tokens, topk_ids, spec.num_experts)
    gate_up_hessian = (expert_block_second_moment_sum(dispatch.x_sorted, dispatch.expert_sorted, spec.num_experts)
                       if static.collect_hessian else None)
    return (h_resid, topk_ids, topk_w, shared_out), p.observed, dispatch, (p.hessian, p.rows, gate_up_hessian)


_moe_pre_jit = exact_jit(_moe_pre, static_argnames=("pre_fn", "spec", "static"))


def _moe_post(h_resid, y_sorted, order, topk_ids, topk_w, shared_out):
    dtype = h_resid.dtype
    moe = combine_experts(y_sorted, order, topk_ids, topk_w, dtype)
    if shared_out is not None:
        moe = (moe + shared_out).astype(dtype)
    return (h_resid + moe.reshape(h_resid.shape)).astype(dtype)


_moe_post_jit = exact_jit(_moe_post)


def _hessian_fields(prefix: str, hessian, rows, collected: bool) -> tuple:
    """LayerStats' (hessian, hessian_rows) under checkpoint module names; (None, None) if not collected."""
    if not collected:
        return None, None
    return {prefix + k: v for k, v in hessian.items()}, {prefix + k: v for k, v in rows.items()}


def _embed(w, input_ids, dtype):
    return jnp.take(w, input_ids, axis=0).astype(dtype)


_embed_jit = exact_jit(_embed, static_argnames=("dtype",))


def _head(norm_w, lm_w, hidden, eps):
    return linear(rms_norm(hidden, norm_w, eps), lm_w)


_head_jit = exact_jit(_head, static_argnames=("eps",))


def _local(names: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {n[len(prefix):]: v for n, v in names.items() if n.startswith(prefix)}


class Family:
    """A model family bound to one config.json: names of its tensors plus one forward per layer kind.

    Subclasses set `name`, build a hashable `spec` (static hyperparameters) and implement, as
    static methods over a `LayerParams` p (local names):
    `_dense_layer(spec, p, hidden, sliding_window) -> hidden` and, for MoE families,
    `_moe_pre(spec, p, hidden, sliding_window) -> (h_resid, x_tokens [T,H], topk_ids [T,k],
    topk_weights [T,k], shared_out [T,H] | None)`. The linears they apply through `p.linear` are
    the layer's statistics.
    """

    name: str = ""
    _dense_layer: Callable
    _moe_pre: Callable | None = None
    # routed experts per grouped-matmul program; None: as many as fit moe.EXPERT_STACK_BYTES
    # (2 GiB), which bounds the copy of their weights a program takes from the layer's stacks
    expert_chunk_size: int | None = None

    def __init__(self, config: Mapping[str, Any]):
        # a wrapper (Kimi-K2.5) runs its text model: text_config, tensor names under names_prefix
        spec = find_family_spec(config)
        wrapped = spec is not None and spec.text_config_key is not None
        self.names_prefix = spec.text_prefix if wrapped else ""
        self.alt_layer_prefixes = spec.alt_layer_prefixes if wrapped else ()
        self.config = dict(spec.text_config(config) if wrapped else config)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if self.config.get(key) is None:
                raise ModelConfigError(f"config.json has no {key!r}, which the {self.name} family needs")
        self.spec = self._make_spec(self.config)

    # -- names -----------------------------------------------------------------------------
    def num_layers(self, config: Mapping[str, Any] | None = None) -> int:
        return int((config or self.config)["num_hidden_layers"])

    def layer_prefix(self, layer: int, names=None) -> str:
        """What layer `layer`'s tensor names start with: ``{names_prefix}model.layers.{layer}.``, or
        the first of the spec's alt_layer_prefixes that `names` (checkpoint names) use instead."""
        prefix = f"{self.names_prefix}model.layers.{layer}."
        if names is not None and not any(n.startswith(prefix) for n in names):
            for alt in self.alt_layer_prefixes:
                if any(n.startswith(f"{alt}{layer}.") for n in names):
                    return f"{alt}{layer}."
        return prefix

    def layer_param_names(self, layer: int, all_names) -> list[str]:
        """Checkpoint tensor names that belong to decoder layer `layer`."""
        all_names = list(all_names)
        prefix = self.layer_prefix(layer, all_names)
        return [n for n in all_names if n.startswith(prefix)]

    def tensor_name(self, name: str) -> str:
        """The checkpoint name of a text-model tensor (``model.norm.weight`` -> a wrapper's
        ``language_model.model.norm.weight``)."""
        return self.names_prefix + name

    def embed_param_names(self, all_names=None) -> list[str]:
        return [self.tensor_name("model.embed_tokens.weight")]

    def head_param_names(self, all_names=None) -> list[str]:
        """Tensors `head` reads: the final norm and lm_head (the embedding when tied/absent)."""
        names = [self.tensor_name("model.norm.weight")]
        if self._tied(all_names):
            names.append(self.tensor_name("model.embed_tokens.weight"))
        else:
            names.append(self.tensor_name("lm_head.weight"))
        return names

    def _tied(self, all_names=None) -> bool:
        if self.config.get("tie_word_embeddings", False):
            return True
        return all_names is not None and self.tensor_name("lm_head.weight") not in set(all_names)

    def is_moe_layer(self, layer: int) -> bool:
        return False

    def layer_kind(self, layer: int) -> str:
        return "moe" if self.is_moe_layer(layer) else "dense"

    @property
    def num_experts(self) -> int:
        return 0

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
        w = LayerParams(params)[self.tensor_name("model.embed_tokens.weight")]
        return _embed_jit(w, jnp.asarray(input_ids, jnp.int32), jnp.dtype(dtype or w.dtype))

    def head(self, params: Params, hidden: jax.Array) -> jax.Array:
        """Final norm + lm_head -> logits [B, S, V] in hidden's dtype."""
        p = LayerParams(params)
        lm = p.optional(self.tensor_name("lm_head.weight"))
        if lm is None or self.config.get("tie_word_embeddings", False):
            lm = p[self.tensor_name("model.embed_tokens.weight")]
        return _head_jit(p[self.tensor_name("model.norm.weight")], lm, hidden, float(self.spec.eps))

    def routed_experts(self, layer: int, names) -> ExpertNames | None:
        """The checkpoint names of MoE layer `layer`'s routed experts in the spelling `names` (the
        layer's tensor names) use; None for a dense layer."""
        if not self.is_moe_layer(layer):
            return None
        return ExpertNames(self.layer_prefix(layer, names) + "mlp.experts", self.spec.num_experts)

    def expert_stacks(self, layer: int, params: Params, dtype=jnp.bfloat16) -> ExpertStacks | None:
        """The routed experts of MoE layer `layer` stacked once (`moe.ExpertStacks`, compute dtype,
        checkpoint orientation) for every batch's `layer_forward(experts=...)`; None for a dense
        layer. The stacks are one more copy of the layer's routed experts while they live, unless
        `params` holds its experts stacked already (`moe.LayerTensors`): then those."""
        names = self.routed_experts(layer, params)
        return None if names is None else names.stacks(params, jnp.dtype(dtype))

    def move_experts_into_stacks(self, layer: int, params: LayerTensors, dtype=jnp.bfloat16) -> None:
        """Hold MoE layer `layer`'s routed experts in `params` as stacks only (`params.expert_stacks`,
        compute dtype, their per-expert entries removed): one copy of the experts, which
        `layer_forward` and `expert_stacks` then read."""
        self.routed_experts(layer, params).move_into_stacks(params, jnp.dtype(dtype))

    def layer_forward(self, layer: int, params: Params, hidden: jax.Array, *, dtype=jnp.bfloat16,
                      input_amax: Params | None = None, collect_hessian: bool = False,
                      experts: ExpertStacks | None = None) -> tuple[jax.Array, LayerStats]:
        """Run decoder layer `layer` on hidden [B, S, H] -> (hidden, LayerStats).

        params: checkpoint-named tensors; only the names of this layer are read (the dict may hold
        more). Routed experts are per-expert tensors, stacked on each call unless `experts` gives
        the layer's stacks (`expert_stacks`: built once, reused by every batch) or `params` holds
        them stacked (`moe.LayerTensors`); they run
        `self.expert_chunk_size` at a time (each chunk one grouped matmul over its rows).
        input_amax (evaluation): {module name: f32[]} of linears whose input is NVFP4
        fake-quantized with that tensor amax (as an engine serving the checkpoint quantizes it);
        routed experts are all given or none. Modules of other layers are ignored. The statistics
        are always those of the unquantized inputs; for a MoE layer they include the routing,
        stats.experts.topk_ids int32 [B*S, k], ascending per token.
        collect_hessian (local-hessian weight scales): the statistics also hold the block
        second-moment sums of every linear's input (LayerStats.hessian, per expert in
        RoutedExpertStats.gate_up_hessian / down_hessian), taken before the linear's own fake quant.
        """
        if not 0 <= layer < self.num_layers():
            raise ModelConfigError(f"layer {layer} is out of range 0..{self.num_layers() - 1}")
        prefix = self.layer_prefix(layer, params)
        hidden = jnp.asarray(hidden).astype(jnp.dtype(dtype))
        local = _local(params, prefix)
        if not local:
            raise ModelConfigError(f"no tensors named {prefix}* in the parameters passed for layer {layer}")
        local_amax = _local(input_amax or {}, prefix)
        window = self.sliding_window(layer)
        if not self.is_moe_layer(layer):
            if any(n.startswith(_EXPERTS) for n in local):
                raise ModelConfigError(
                    f"layer {layer} has routed experts but the config makes it a dense layer "
                    "(check first_k_dense_replace / moe_layer_freq / decoder_sparse_step / mlp_only_layers)")
            hidden, observed, (hess, rows) = _run_dense_jit(type(self)._dense_layer, self.spec, local, local_amax,
                                                            hidden, _Static(window, collect_hessian))
            return hidden, LayerStats({prefix + k: v for k, v in observed.items()}, None,
                                      *_hessian_fields(prefix, hess, rows, collect_hessian))
        names = ExpertNames(prefix + "mlp.experts", self.spec.num_experts)
        stacks = names.stacks(params, hidden.dtype) if experts is None else experts
        if stacks.num_experts != self.spec.num_experts:
            raise ModelConfigError(f"layer {layer}: {stacks.num_experts} stacked experts given, "
                                   f"the config has {self.spec.num_experts}")
        in_amax = names.input_amax(input_amax or {})

        def routed_experts(dispatch):
            return run_experts(dispatch, stacks, in_amax, act_name=self.spec.act, chunk_size=self.expert_chunk_size,
                               collect_hessian=collect_hessian)

        return self._moe_forward(prefix, local, local_amax, hidden, routed_experts, _Static(window, collect_hessian))

    def moe_forward(self, layer: int, params: Params, hidden: jax.Array, routed_experts: Callable, *,
                    dtype=jnp.bfloat16) -> tuple[jax.Array, LayerStats]:
        """MoE layer `layer` with its routed experts computed by `routed_experts(dispatch) ->
        (y_sorted [T*k, H], down_input_amax f32 [E])` instead of from per-expert tensors in `params`
        (the expert-parallel forward, nvfp4_jax.expert_parallel, runs them on the devices that
        hold them). `params` needs only the layer's other tensors; no evaluation hook, no hessians."""
        if not self.is_moe_layer(layer):
            raise ModelConfigError(f"layer {layer} is not a MoE layer")
        prefix = self.layer_prefix(layer, params)
        local = {n: v for n, v in _local(params, prefix).items() if not n.startswith(_EXPERTS)}
        if not local:
            raise ModelConfigError(f"no tensors named {prefix}* in the parameters passed for layer {layer}")
        hidden = jnp.asarray(hidden).astype(jnp.dtype(dtype))
        return self._moe_forward(prefix, local, {}, hidden, routed_experts, _Static(self.sliding_window(layer), False))

    def _moe_forward(self, prefix: str, local: Params, local_amax: Params, hidden, routed_experts, static: _Static):
        # prefix: the layer's names in the spelling its tensors use (layer_prefix(layer, params))
        rest = {n: v for n, v in local.items() if not n.startswith(_EXPERTS)}
        rest_amax = {n: v for n, v in local_amax.items() if not n.startswith(_EXPERTS)}
        (h_resid, topk_ids, topk_w, shared_out), observed, dispatch, (hess, rows, gate_up_hess) = _moe_pre_jit(
            type(self)._moe_pre, self.spec, rest, rest_amax, hidden, static)
        y_sorted, down_amax, *down_hess = routed_experts(dispatch)
        out = _moe_post_jit(h_resid, y_sorted, dispatch.order, topk_ids, topk_w, shared_out)
        experts = RoutedExpertStats(
            prefix + "mlp.experts", dispatch.gate_up_input_amax, down_amax, dispatch.group_sizes,
            jnp.sort(topk_ids, axis=-1).astype(jnp.int32), gate_up_hess, down_hess[0] if down_hess else None)
        return out, LayerStats({prefix + k: v for k, v in observed.items()}, experts,
                               *_hessian_fields(prefix, hess, rows, static.collect_hessian))

    def forward(self, params: Params, input_ids, *, dtype=jnp.bfloat16):
        """Whole model: logits [B, S, V] and the LayerStats of every layer (tests, evaluation)."""
        hidden = self.embed(params, input_ids, dtype=dtype)
        all_stats = []
        for layer in range(self.num_layers()):
            hidden, stats = self.layer_forward(layer, params, hidden, dtype=dtype)
            all_stats.append(stats)
        return self.head(params, hidden), all_stats

    @staticmethod
    def _make_spec(config):  # pragma: no cover - abstract
        raise NotImplementedError
