"""Multi-device conversion over the local devices with ``jax.sharding`` (issue 6, multi-device).

Two kinds of work are spread over a :class:`jax.sharding.Mesh` with the axes ``("experts",
"samples")``:

* quantization: a stack of same-shaped weights ``[M, N, K]`` (routed experts, or any linears of
  one shape) is split along M; every device quantizes its rows with :func:`numerics.quantize`.
  Rows never interact (every reduction of the format is inside one row), so the bytes are those
  of the one-device call; M is padded to a multiple of the device count with zero rows whose
  results are dropped.
* calibration: a batch of hidden states ``[B, S, H]`` is split along B; every device runs the
  whole decoder layer (parameters replicated) on its rows, and the per-device statistics are
  merged on the host: amax by max, token counts by sum (in int64). Both merges are exact, so the
  statistics do not depend on how the samples were split. Hidden states are bit-identical to the
  one-device forward when each device gets the same number of rows as a one-device batch (see
  :func:`regroup_batches`): the per-device program is then the one-device program.

Both use every device of the mesh (the two axes flattened), so the factorization of the mesh only
matters to code that wants both axes at once (experts and samples, e.g. an expert-parallel MoE
forward, which this module does not do: every device holds a whole layer during calibration).

>>> mesh = device_mesh()
>>> q = quantize_sharded(jnp.ones((3, 4, 32), jnp.bfloat16), jnp.ones(3), mesh)
>>> q.weight.shape
(3, 4, 16)
"""

from __future__ import annotations

import functools
import json
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nvfp4_jax import numerics
from nvfp4_jax.models.exact_jit import exact_jit
from nvfp4_jax.models.ops import ModelConfigError
from nvfp4_jax.models.stats import LayerStats, merge_layer_stats

AXES = ("experts", "samples")
_EXPERTS_SPEC = P(("experts", "samples"))  # the stacked axis over every device
_SAMPLES_SPEC = P(("samples", "experts"))  # the batch axis over every device


def device_mesh(devices: Optional[Sequence[jax.Device]] = None, samples: int = 1) -> Mesh:
    """A 2-D mesh ``("experts", "samples")`` over ``devices`` (default: this process's local
    devices), of shape ``(len(devices) // samples, samples)``.

    :func:`quantize_sharded` and :func:`forward_sharded` use all devices whatever the shape, so the
    default ``samples=1`` is as good as any for them.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("device_mesh: no devices given")
    n = len(devices)
    if samples < 1 or n % samples:
        raise ValueError(f"device_mesh: samples={samples} does not divide the {n} devices")
    return Mesh(np.asarray(devices, dtype=object).reshape(n // samples, samples), AXES)


# ---------------------------------------------------------------------------------------------
# quantization


@functools.lru_cache(maxsize=None)
def _quantize_fn(mesh: Mesh, check: bool):
    def local(w, amax):
        q = numerics.quantize(w, amax, check=False)
        if not check:
            return q, None, None
        # input checks in the same program: per row, non-finite count and own max |w|
        wf = w.astype(jnp.float32)
        bad = jnp.sum(~jnp.isfinite(wf), axis=(1, 2))
        own = jnp.max(jnp.abs(wf), axis=(1, 2))
        return q, bad, own

    f = jax.shard_map(local, mesh=mesh, in_specs=(_EXPERTS_SPEC, _EXPERTS_SPEC),
                      out_specs=_EXPERTS_SPEC, check_vma=False)
    return jax.jit(f)


def _stack_on_mesh(weights: Sequence, m_pad: int, mesh: Mesh) -> jax.Array:
    """Per-row weights -> one [m_pad, N, K] array sharded along axis 0, each device stacking only
    its own rows (no full stack on one device); rows past len(weights) are zeros."""
    sharding = NamedSharding(mesh, _EXPERTS_SPEC)
    shape0 = tuple(weights[0].shape)
    dtype = jnp.asarray(weights[0]).dtype
    for i, w in enumerate(weights):
        if tuple(w.shape) != shape0:
            raise ValueError(f"quantize_sharded: weight {i} has shape {tuple(w.shape)}, weight 0 {shape0}")
    global_shape = (m_pad, *shape0)
    shards = []
    for device, index in sharding.addressable_devices_indices_map(global_shape).items():
        rows = range(*index[0].indices(m_pad))
        parts = [jax.device_put(jnp.asarray(weights[r]).astype(dtype), device) if r < len(weights)
                 else jax.device_put(jnp.zeros(shape0, dtype), device) for r in rows]
        shards.append(jnp.stack(parts))
    return jax.make_array_from_single_device_arrays(global_shape, sharding, shards)


def quantize_sharded(stacked_w, amax, mesh: Optional[Mesh] = None, *, check: bool = True) -> numerics.NVFP4Tensor:
    """Quantize ``stacked_w`` ``[M, N, K]`` with one tensor amax per row (``amax`` ``[M]``), split
    along M over every device of ``mesh``; bytes identical to ``numerics.quantize(stacked_w, amax)``.

    ``stacked_w`` may also be a sequence of M ``[N, K]`` arrays: each device then stacks only its
    own rows, which saves the one-device copy of the whole stack.
    Returns an :class:`numerics.NVFP4Tensor` with leading axis M (arrays sharded over the mesh).
    With ``check``, raises ``ValueError`` naming the row for a NaN/Inf weight or an amax below the
    row's own max |w| (the checks of :func:`numerics.quantize`, computed in the same pass).
    """
    mesh = mesh or device_mesh()
    n = mesh.size
    as_list = isinstance(stacked_w, (list, tuple))
    if as_list:
        if not stacked_w:
            raise ValueError("quantize_sharded: no weights given")
        m, w0 = len(stacked_w), jnp.asarray(stacked_w[0])
        dtype, ndim, k = w0.dtype, w0.ndim + 1, (w0.shape[-1] if w0.ndim else None)
    else:
        stacked_w = jnp.asarray(stacked_w)
        m, dtype, ndim = stacked_w.shape[0] if stacked_w.ndim else 0, stacked_w.dtype, stacked_w.ndim
        k = stacked_w.shape[-1] if ndim == 3 else None
    if ndim != 3:
        raise ValueError(f"quantize_sharded needs stacked weights [M, N, K] (or M arrays [N, K]), got {ndim}-D")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"quantize_sharded needs floating weights, got {dtype}")
    if k % numerics.BLOCK:
        raise ValueError(f"K (last axis) must be a multiple of {numerics.BLOCK} for NVFP4, got K={k}; "
                         "leave this linear unquantized instead of padding it")
    amax = np.asarray(jax.device_get(amax), np.float32).reshape(-1) if amax is not None else None
    if amax is None or amax.shape != (m,):
        raise ValueError(f"quantize_sharded needs one amax per stacked weight: {m} values, got "
                         f"{None if amax is None else amax.shape}")
    if check and (not np.all(np.isfinite(amax)) or np.any(amax < 0)):
        raise ValueError(f"weight_amax must be finite and >= 0, got {amax}")

    m_pad = -(-m // n) * n
    amax_pad = np.concatenate([amax, np.ones(m_pad - m, np.float32)])  # pad rows: zeros, amax 1
    if as_list:
        w = _stack_on_mesh(stacked_w, m_pad, mesh)
    else:
        w = stacked_w
        if m_pad != m:
            w = jnp.concatenate([w, jnp.zeros((m_pad - m, *w.shape[1:]), w.dtype)])
        w = jax.device_put(w, NamedSharding(mesh, _EXPERTS_SPEC))
    a = jax.device_put(amax_pad, NamedSharding(mesh, _EXPERTS_SPEC))
    q, bad, own = _quantize_fn(mesh, bool(check))(w, a)
    if check:
        bad, own = np.asarray(bad)[:m], np.asarray(own)[:m]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"stacked weight {i} (of {m}) has {int(bad[i])} NaN/Inf value(s)")
        low = np.flatnonzero(own > amax)
        if low.size:
            i = int(low[0])
            raise ValueError(f"weight_amax {amax[i]} of stacked weight {i} is smaller than its own "
                             f"max |w| {own[i]}; a group amax must be the max over the group's members")
    if m_pad != m:
        q = jax.tree.map(lambda x: x[:m], q)
    return q


# ---------------------------------------------------------------------------------------------
# calibration forward


def regroup_batches(hidden_batches: Sequence, rows: int) -> list:
    """Concatenate consecutive equal-length batches ``[b, S, H]`` into batches of ``rows`` rows
    (the last of each length may be smaller); row order is kept. With ``rows = per_device * n``,
    :func:`forward_sharded` gives every device ``per_device`` rows; a batch that already has
    ``rows`` rows is passed through uncopied."""
    if rows < 1:
        raise ValueError(f"regroup_batches: rows must be >= 1, got {rows}")
    out: list = []
    pending: list = []  # slices of one sequence length waiting to fill a batch
    pending_rows = 0

    def flush():
        nonlocal pending, pending_rows
        if pending:
            out.append(pending[0] if len(pending) == 1 else jnp.concatenate(pending, axis=0))
        pending, pending_rows = [], 0

    for h in hidden_batches:
        if pending and tuple(pending[0].shape[1:]) != tuple(h.shape[1:]):
            flush()
        start = 0
        while start < h.shape[0]:
            if not pending and start == 0 and h.shape[0] == rows:
                out.append(h)  # already the right size
                start = rows
                continue
            take = min(rows - pending_rows, h.shape[0] - start)
            pending.append(h if (start == 0 and take == h.shape[0]) else h[start:start + take])
            pending_rows += take
            start += take
            if pending_rows == rows:
                flush()
    flush()
    return out


def _canonical_layer(family, layer: int) -> int:
    """The first layer with the same forward as ``layer`` (kind and attention window): all such
    layers share one compiled program, with names mapped to the canonical layer's."""
    kind = (family.layer_kind(layer), family.sliding_window(layer))
    for c in range(family.num_layers()):
        if (family.layer_kind(c), family.sliding_window(c)) == kind:
            return c
    return layer


_FORWARD_CACHE: dict = {}  # one jitted shard_map per layer kind, mesh, dtype and parameter shapes


def _forward_fn(family, canon: int, mesh: Mesh, dtype, params_sig):
    config = json.dumps(family.config, sort_keys=True, default=str)
    key = (type(family), family.spec, config, canon, mesh, jnp.dtype(dtype).name, params_sig)
    fn = _FORWARD_CACHE.get(key)
    if fn is None:
        def local(p, stacks, h):
            h, s = family.layer_forward(canon, p, h, dtype=dtype, experts=stacks)
            return h, jax.tree.map(lambda v: v[None], s)  # one row of statistics per device

        fn = exact_jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), _SAMPLES_SPEC), out_specs=_SAMPLES_SPEC,
                                     check_vma=False))
        _FORWARD_CACHE[key] = fn
    return fn


def forward_sharded(family, layer: int, params: Mapping[str, jax.Array], hidden_batches: Sequence,
                    dtype=jnp.bfloat16, mesh: Optional[Mesh] = None):
    """Run decoder layer ``layer`` on every batch of ``hidden_batches`` (``[b, S, H]`` each) with
    the batch axis split over every device of ``mesh`` and ``params`` replicated.

    Returns ``(new_hidden_batches, layer_stats)``: one output per input batch, same shapes
    (arrays sharded over the mesh), and one :class:`LayerStats` (numpy values) merged over all
    batches and devices with :func:`merge_layer_stats`, equal to merging the one-device stats of
    every batch. A batch whose size is not a multiple of the device count is
    split: the largest multiple is sharded, the remaining rows run replicated.
    """
    mesh = mesh or device_mesh()
    n = mesh.size
    prefix = family.layer_prefix(layer, params)
    canon = _canonical_layer(family, layer)
    canon_prefix = prefix[:-len(f"{layer}.")] + f"{canon}."  # the same spelling, canonical index
    local = {canon_prefix + k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    if not local:
        raise ModelConfigError(f"no tensors named {prefix}* in the parameters passed for layer {layer}")
    stacks = None
    if family.is_moe_layer(layer):  # routed experts stacked once for every batch, passed instead of per expert
        stacks = jax.device_put(family.expert_stacks(canon, local, dtype), NamedSharding(mesh, P()))
        local = {k: v for k, v in local.items() if not k.startswith(canon_prefix + "mlp.experts.")}
    local = jax.device_put(local, NamedSharding(mesh, P()))
    sig = (tuple(sorted((k, tuple(v.shape), v.dtype.name) for k, v in local.items())),
           None if stacks is None else tuple((tuple(a.shape), a.dtype.name) for a in stacks))
    fn = _forward_fn(family, canon, mesh, dtype, sig)
    replicated = NamedSharding(mesh, P())

    def rename(name: str) -> str:
        return prefix + name[len(canon_prefix):] if name.startswith(canon_prefix) else name

    outputs, merged = split_batches(
        hidden_batches, n,
        lambda hs: fn(local, stacks, jax.device_put(hs, NamedSharding(mesh, _SAMPLES_SPEC))),
        # fewer rows than devices: every device runs them (replicated)
        lambda hr: family.layer_forward(canon, local, jax.device_put(hr, replicated), dtype=dtype, experts=stacks))
    experts = merged.experts
    if experts is not None:
        experts = experts.replace(prefix=rename(experts.prefix))
    return outputs, LayerStats({rename(k): v for k, v in merged.input_amax.items()}, experts)


def split_batches(hidden_batches: Sequence, n: int, split_fn, rest_fn) -> tuple[list, LayerStats]:
    """Each batch ``[b, ...]`` as its first ``(b // n) * n`` rows through ``split_fn`` (rows split
    over the n devices) and the rest through ``rest_fn`` (replicated), both returning
    ``(output, LayerStats)`` -> (outputs, one per batch, the pieces joined; the merged statistics)."""
    outputs, stats = [], []
    for h in hidden_batches:
        b = h.shape[0]
        main = (b // n) * n
        pieces = []
        for rows, fn in ((h if main == b else h[:main], split_fn), (h[main:], rest_fn)):
            if rows.shape[0]:
                out, s = fn(rows)
                stats.append(s)
                pieces.append(out)
        outputs.append(pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0))
    return outputs, merge_layer_stats(stats)


__all__ = ["AXES", "split_batches", "device_mesh", "quantize_sharded", "regroup_batches", "forward_sharded"]
