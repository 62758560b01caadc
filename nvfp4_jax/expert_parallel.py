"""Expert parallelism: the routed experts of a MoE layer split over the devices (issue 12).

A Kimi-K2 MoE layer is about 34 GB in bf16 (384 routed experts of 88 MB, the rest under 1 GB):
it does not fit a 16 GB v5e or a 32 GB v6e chip when every device holds the whole layer, as the
data-parallel forward of :mod:`nvfp4_jax.sharding` does. Here the mesh has one axis, ``experts``,
over D devices: device ``d`` holds experts ``[d*C, (d+1)*C)`` with ``C = ceil(E / D)`` (the last
blocks padded with zero experts that the router never picks) and a copy of the layer's other tensors
(attention, router, shared experts, norms).

The calibration forward, one ``shard_map`` program per layer kind:

1. every device runs attention, router and shared experts on its own rows of the batch (data
   parallel; the per-device program is the one-device program of a one-device batch) and sorts its
   (token, k) assignments by expert (:func:`nvfp4_jax.models.moe.sort_by_expert`);
2. ring over the devices: the expert-sorted rows of each source device travel once around the ring
   (``ppermute``) with an output accumulator; at each stop the device computes the rows of its own
   experts (:func:`nvfp4_jax.models.moe.experts_chunk`, the ragged_dot function of the one-device
   chunked forward, contracting the device's stacked block as it is) and adds them to the
   accumulator. Rows of different experts are disjoint, so every row
   of the accumulator is one chunk's output plus zeros: exact. After D steps each accumulator is
   back at its source, which combines it (weighted sum, shared experts, residual). Peak memory per
   device is one source's rows and one accumulator, in flight twice;
3. statistics: gate/up input amax and token counts come from each device's own rows (merged by max
   and sum, as the data-parallel forward does); each expert's down input amax is the max over the
   sources of its own device's rows, then gathered to all. Max and integer sums are exact, so the
   statistics equal the one-device forward's whatever the device count; the per-row arithmetic is
   that of the one-device chunked forward (XLA CPU: bit-identical to any chunk size, tested).

Weights: :func:`read_layer` decodes every routed expert on the device that owns it (so a chip
never holds more than its block plus the shared part), :func:`place_experts` stacks each device's
block on that device once per layer (``jax.make_array_from_single_device_arrays``: no full stack
anywhere), in checkpoint orientation; the program reads those blocks directly (no copy of them
inside it), so a device holds its block once as decoded per-expert arrays (kept for the quantize
phase) and once stacked.

Batches whose size is not a multiple of D: the multiple runs as above; the remaining rows run on
every device at once (replicated rows, each device its own experts, ``psum`` of the outputs).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nvfp4_jax import resources
from nvfp4_jax.models.exact_jit import exact_jit
from nvfp4_jax.models.moe import PROJECTIONS, Dispatch, ExpertStacks, experts_chunk
from nvfp4_jax.models.ops import ModelConfigError
from nvfp4_jax.models.stats import LayerStats, merge_layer_stats

AXIS = "experts"
# --expert-parallel. auto: MoE layers over this process's devices when it has several; processes:
# over the devices of every process of a multi-process run (opt-in; CPU runs use gloo collectives,
# see ARCHITECTURE.md); off: never
MODES = ("auto", "processes", "off")
DEFAULT_MODE = "auto"


def expert_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh ``("experts",)`` over ``devices`` (default: every device of the run, all
    processes), ordered by process then id, so each process's devices (and so its rows of a batch
    and its experts) are one contiguous block."""
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object), (AXIS,))


def spans_processes(mesh: Optional[Mesh]) -> bool:
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def expert_owners(family, layer: int, names: Sequence[str], mesh: Mesh) -> dict[str, int]:
    """The process that holds each routed-expert tensor of ``layer`` (the owner of its device):
    it quantizes and writes it (``ConversionPlan.owners(pinned=)``)."""
    return {n: device.process_index for n, device in _tensor_devices(family, layer, names, mesh) if device is not None}


def _tensor_devices(family, layer: int, names: Sequence[str], mesh: Mesh):
    """(name, device) for each tensor of ``layer``: the device of ``mesh`` that holds a routed
    expert's tensor, None for the layer's other tensors."""
    prefix = family.layer_prefix(layer)
    blocks = ExpertBlocks(family.num_experts, mesh.size)
    devices = list(mesh.devices.flat)
    for n in family.layer_param_names(layer, names):
        e = expert_of(n, prefix)
        yield n, (None if e is None else devices[blocks.owner(e)])


def enabled(mode: str, family, layer: int, num_devices: int) -> bool:
    """Whether ``layer`` runs expert parallel under ``--expert-parallel mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown expert-parallel mode {mode!r}; choose one of {MODES}")
    return mode != "off" and num_devices > 1 and family is not None and family.is_moe_layer(layer)


class ExpertBlocks(NamedTuple):
    """Which device holds which routed experts: device d holds [d * per_device, (d+1) * per_device)."""

    num_experts: int
    num_devices: int

    @property
    def per_device(self) -> int:
        return -(-self.num_experts // self.num_devices)

    @property
    def padded(self) -> int:
        return self.per_device * self.num_devices

    def owner(self, expert: int) -> int:
        return expert // self.per_device

    def experts_of(self, device_index: int) -> range:
        lo = device_index * self.per_device
        return range(min(lo, self.num_experts), min(lo + self.per_device, self.num_experts))


_EXPERT_NAME = re.compile(r"mlp\.experts\.(\d+)\.")


def expert_of(name: str, layer_prefix: str) -> Optional[int]:
    """The routed-expert index of a checkpoint tensor of the layer (None: not a routed expert)."""
    if not name.startswith(layer_prefix):
        return None
    m = _EXPERT_NAME.match(name[len(layer_prefix):])
    return int(m.group(1)) if m else None


def read_layer(family, reader, layer: int, names: Sequence[str], mesh: Mesh, dtype=jnp.bfloat16,
               only_local: bool = True) -> dict[str, jax.Array]:
    """Layer ``layer``'s tensors from ``reader``: each routed expert decoded on the device of
    ``mesh`` that owns it, the rest on the default device. With ``only_local`` (multi-process),
    experts owned by another process's devices are not read at all."""
    out = {}
    for n, device in _tensor_devices(family, layer, names, mesh):
        if device is None:
            out[n] = reader.get(n, dtype=family.param_dtype(n, dtype))
            continue
        if device.process_index != jax.process_index():
            if only_local:
                continue
            raise ModelConfigError(f"{n} belongs to a device of process {device.process_index}")
        with jax.default_device(device):
            out[n] = jax.device_put(reader.get(n, dtype=family.param_dtype(n, dtype)), device)
    return out


def place_experts(family, layer: int, params: Mapping[str, jax.Array], mesh: Mesh, dtype) -> tuple:
    """(gate, up, down) stacks ``[E_pad, ...]`` sharded along ``experts`` over ``mesh``: each
    device stacks only its own experts (read from ``params`` by checkpoint name, zeros past E);
    only this process's devices' experts need be in ``params``."""
    prefix = family.layer_prefix(layer) + "mlp.experts"
    blocks = ExpertBlocks(family.num_experts, mesh.size)
    sharding = NamedSharding(mesh, P(AXIS))
    devices = list(mesh.devices.flat)
    stacks = []
    for proj in PROJECTIONS:
        shape = None
        shards = []
        for d, device in enumerate(devices):
            if device.process_index != jax.process_index():
                continue
            parts = []
            for e in range(d * blocks.per_device, (d + 1) * blocks.per_device):
                key = f"{prefix}.{e}.{proj}.weight"
                if e < blocks.num_experts:
                    if key not in params:
                        raise ModelConfigError(f"routed expert tensor {key!r} is missing (expert-parallel forward)")
                    w = params[key]
                    shape = tuple(w.shape)
                    parts.append(jax.device_put(w.astype(dtype), device))
                else:
                    parts.append(None)
            shards.append((device, parts))
        if shape is None:
            raise ModelConfigError(f"no routed expert tensors {prefix}.*.{proj}.weight on this process")
        arrays = []
        for device, parts in shards:
            with jax.default_device(device):
                zero = jnp.zeros(shape, dtype)
                arrays.append(jnp.stack([zero if p is None else p for p in parts]))
        stacks.append(jax.make_array_from_single_device_arrays((blocks.padded, *shape), sharding, arrays))
    return tuple(stacks)


def quantize_on_owner_devices(weights: Mapping[str, jax.Array], groups: Sequence[Sequence[str]], mode: str = "max"):
    """:func:`nvfp4_jax.layer_quant.quantize_layer` of ``weights`` with each weight quantized on
    the device that holds it (routed experts where :func:`read_layer` put them), so no device
    gathers another's experts; fused groups never span devices (their members are one expert's, or
    the replicated part's). The same bytes and per-weight figures as one call; dicts in its order."""
    from nvfp4_jax import layer_quant

    by_device: dict = {}
    for m, w in weights.items():
        devices = w.devices() if isinstance(w, jax.Array) else {jax.devices()[0]}
        by_device.setdefault(min(devices, key=lambda d: d.id), {})[m] = w
    parts = []
    for device, ws in sorted(by_device.items(), key=lambda kv: kv[0].id):
        mine = [g for g in groups if any(m in ws for m in g)]
        split = [g for g in mine if not all(m in ws for m in g if m in weights)]
        if split:
            raise ModelConfigError(f"fused group {list(split[0])} is spread over devices")
        with jax.default_device(device):
            parts.append(layer_quant.quantize_layer(ws, mine, mode=mode))
    merged = layer_quant.QuantizedLayer({}, sorted(m for q in parts for m in q.zero_weight_amax))
    for m in sorted(weights):  # quantize_layer's order
        q = next(q for q in parts if m in q.tensors)
        merged.tensors[m] = q.tensors[m]
        merged.squared_error[m], merged.squared_norm[m] = q.squared_error[m], q.squared_norm[m]
    return merged


def _routed(dispatch: Dispatch, stacks, blocks: ExpertBlocks, act: str, replicated: bool):
    """Inside the shard_map: (y_sorted of this device's rows, down input amax f32 [E]) with each
    device computing its own experts (see the module docstring)."""
    weights = ExpertStacks(*stacks)  # this device's block [C, ...], contracted as it is: no re-stack
    me = jax.lax.axis_index(AXIS)
    start = (me * blocks.per_device).astype(jnp.int32)
    pad = blocks.padded - blocks.num_experts

    def chunk(x_sorted, expert_sorted, group_sizes):
        sizes = jnp.concatenate([group_sizes, jnp.zeros((pad,), group_sizes.dtype)]) if pad else group_sizes
        y, down_amax, _ = experts_chunk(Dispatch(x_sorted, expert_sorted, None, sizes, None), start, weights,
                                        act_name=act)
        return y, down_amax

    x, es, gs = dispatch.x_sorted, dispatch.expert_sorted, dispatch.group_sizes
    if replicated:  # every device has the same rows: each adds its experts' rows
        y, down_amax = chunk(x, es, gs)
        y = jax.lax.psum(y, AXIS)
    else:
        d = blocks.num_devices
        ring = [(i, (i + 1) % d) for i in range(d)]

        def step(_, carry):
            x, es, gs, y, amax = carry
            y_part, a = chunk(x, es, gs)
            y = (y + y_part).astype(y.dtype)  # rows of other experts are zeros: exact
            x, es, gs, y = jax.lax.ppermute((x, es, gs, y), AXIS, ring)
            return x, es, gs, y, jnp.maximum(amax, a)

        init = (x, es, gs, jnp.zeros_like(x), jnp.zeros((blocks.per_device,), jnp.float32))
        _, _, _, y, down_amax = jax.lax.fori_loop(0, d, step, init)
    down_amax = jax.lax.all_gather(down_amax, AXIS, tiled=True)[:blocks.num_experts]
    return y, down_amax


_FORWARD_CACHE: dict = {}


def _forward_fn(family, canon: int, mesh: Mesh, dtype, signature, replicated: bool):
    config = json.dumps(family.config, sort_keys=True, default=str)
    key = (type(family), family.spec, config, canon, mesh, jnp.dtype(dtype).name, signature, replicated)
    fn = _FORWARD_CACHE.get(key)
    if fn is None:
        blocks = ExpertBlocks(family.num_experts, mesh.size)

        def local(rest, stacks, h):
            out, stats = family.moe_forward(
                canon, rest, h, functools.partial(_routed, stacks=stacks, blocks=blocks, act=family.spec.act,
                                                  replicated=replicated), dtype=dtype)
            stats = stats.replace(experts=stats.experts.replace(topk_ids=None))
            if replicated:
                return out, stats
            return out, jax.tree.map(lambda v: v[None], stats)  # one row of statistics per device

        rows = P() if replicated else P(AXIS)
        fn = exact_jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), rows), out_specs=(rows, rows),
                                   check_vma=False))
        _FORWARD_CACHE[key] = fn
    return fn


def _canonical_layer(family, layer: int) -> int:
    from nvfp4_jax.sharding import _canonical_layer as canonical

    return canonical(family, layer)


class LayerProgram(NamedTuple):
    """One MoE layer ready for the expert-parallel forward: its jitted programs and placed tensors."""

    rest: dict  # the layer's other tensors, replicated, under the canonical layer's names
    stacks: tuple  # (gate, up, down) sharded over the experts axis
    rows_fn: object  # batch rows split over the devices
    replicated_fn: object  # rows on every device


def prepare(family, layer: int, params: Mapping[str, jax.Array], mesh: Mesh, dtype=jnp.bfloat16) -> LayerProgram:
    """Place layer ``layer``'s tensors on ``mesh`` and get its programs (compiled once per kind)."""
    prefix = family.layer_prefix(layer)
    canon = _canonical_layer(family, layer)
    canon_prefix = family.layer_prefix(canon)
    stacks = place_experts(family, layer, params, mesh, dtype)
    rest = {canon_prefix + k[len(prefix):]: v for k, v in params.items()
            if k.startswith(prefix) and expert_of(k, prefix) is None}
    if not rest:
        raise ModelConfigError(f"no tensors named {prefix}* besides routed experts for layer {layer}")
    rest = jax.tree.map(lambda v: _replicated(v, mesh), rest)
    sig = (tuple(sorted((k, tuple(v.shape), v.dtype.name) for k, v in rest.items())),
           tuple((tuple(s.shape), s.dtype.name) for s in stacks))
    return LayerProgram(rest, stacks, _forward_fn(family, canon, mesh, dtype, sig, False),
                        _forward_fn(family, canon, mesh, dtype, sig, True))


def _replicated(v, mesh: Mesh) -> jax.Array:
    """``v`` (the same on every process) on every device of ``mesh``, built from this process's
    devices only (valid when the mesh spans processes)."""
    sharding = NamedSharding(mesh, P())
    if not spans_processes(mesh):
        return jax.device_put(v, sharding)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return jax.make_array_from_single_device_arrays(tuple(v.shape), sharding, [jax.device_put(v, d) for d in local])


def _rows_global(h, mesh: Mesh) -> jax.Array:
    """This process's rows ``h`` as its block of a global batch split along ``experts`` (every
    process gives the same number of rows)."""
    sharding = NamedSharding(mesh, P(AXIS))
    n_proc = len({d.process_index for d in mesh.devices.flat})
    global_shape = (h.shape[0] * n_proc, *h.shape[1:])
    index = sharding.addressable_devices_indices_map(global_shape)
    first = min(idx[0].start or 0 for idx in index.values())
    arrays = [jax.device_put(h[(idx[0].start or 0) - first:(idx[0].stop or global_shape[0]) - first], d)
              for d, idx in index.items()]
    return jax.make_array_from_single_device_arrays(global_shape, sharding, arrays)


def _local_rows(a: jax.Array) -> jax.Array:
    """This process's rows of a global array split along axis 0 (on its first device)."""
    shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
    dev = jax.local_devices()[0]
    parts = [jax.device_put(s.data, dev) for s in shards]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _local_replica(a: jax.Array) -> jax.Array:
    return jax.device_put(a.addressable_shards[0].data, jax.local_devices()[0])


_COMPILED: dict = {}


def _compiled(fn, name: str, *args):
    """``fn``'s compiled program for ``args`` (once per argument shapes and shardings); its memory
    analysis goes to the run's resource report."""
    key = (fn, tuple((tuple(a.shape), a.dtype.name, a.sharding) for a in jax.tree.leaves(args)))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = fn.lower(*args).compile()
        resources.note_compiled(name, compiled)
    return compiled


def _call(fn, name: str, *args):
    return _compiled(fn, name, *args)(*args)


def _global_rows(h, mesh: Mesh, spec) -> jax.Array:
    """A batch as one global array over ``mesh``: a process-local batch (multi-process: this
    process's rows) becomes its share of the global batch."""
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return jax.device_put(h, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(h))


def forward(family, layer: int, params: Mapping[str, jax.Array], hidden_batches: Sequence,
            dtype=jnp.bfloat16, mesh: Optional[Mesh] = None):
    """Run MoE layer ``layer`` expert parallel on every batch of ``hidden_batches`` (``[b, S, H]``)
    -> (outputs, one per batch, same shapes; one merged :class:`LayerStats` of numpy values), the
    contract of :func:`nvfp4_jax.sharding.forward_sharded`."""
    mesh = mesh or expert_mesh(jax.local_devices())
    if not family.is_moe_layer(layer):
        raise ModelConfigError(f"layer {layer} is not a MoE layer: the expert-parallel forward is for MoE layers")
    program = prepare(family, layer, params, mesh, dtype)
    from nvfp4_jax.sharding import split_batches

    outputs, merged = split_batches(
        hidden_batches, mesh.size,
        lambda hs: _call(program.rows_fn, "expert_parallel_moe_layer", program.rest, program.stacks,
                         jax.device_put(hs, NamedSharding(mesh, P(AXIS)))),
        lambda hr: _call(program.replicated_fn, "expert_parallel_moe_layer_replicated_rows", program.rest,
                         program.stacks, jax.device_put(hr, NamedSharding(mesh, P()))))
    return outputs, _renamed(family, layer, merged)


class Across(NamedTuple):
    """How the processes of a run meet: the expert mesh over all their devices, and ``sync()``, a
    barrier of all processes with bounded waits (``Coordinator.barrier``). XLA CPU's gloo
    collectives set up their connections on the first collective of a device set and give up
    after 30 s, so every process must reach each collective program within that: they compile
    first (compile times differ), then meet at the barrier, then run."""

    mesh: Mesh
    sync: Callable[[], None]


def forward_across_processes(family, layer: int, params: Mapping[str, jax.Array], blocks: Sequence,
                             dtype, across: Across):
    """The expert-parallel forward of MoE layer ``layer`` over a mesh that spans processes.

    ``blocks``: ``(rows, replicated)`` pairs, the same count and shapes on every process: rows of a
    global batch split over the processes (this process's block, ``replicated`` False; the global
    batch is the processes' blocks in process order), or rows that every process holds in full
    (``replicated`` True, counted once: by process 0). Every process must call this with the same
    blocks' shapes, in the same order: each call runs the same collective programs on all.
    Returns (this process's outputs, one per block; the LayerStats of this process's share).
    """
    mesh = across.mesh
    program = prepare(family, layer, params, mesh, dtype)
    inputs = [_replicated(h, mesh) if replicated else _rows_global(h, mesh) for h, replicated in blocks]
    for (_, replicated), x in zip(blocks, inputs):  # compile everything before meeting
        _compiled(program.replicated_fn if replicated else program.rows_fn,
                  "expert_parallel_moe_layer_replicated_rows" if replicated else "expert_parallel_moe_layer",
                  program.rest, program.stacks, x)
    across.sync()
    outputs, stats = [], []
    for (h, replicated), x in zip(blocks, inputs):
        if replicated:
            out, s = _call(program.replicated_fn, "expert_parallel_moe_layer_replicated_rows", program.rest,
                           program.stacks, x)
            # one collective program at a time: a failed one (a peer lost mid-collective) raises
            # here, before the next would set up gloo again on the stale keys of the failed setup
            # (seen to hang instead of failing)
            jax.block_until_ready((out, s))
            outputs.append(_local_replica(out))
            if jax.process_index() == 0:
                stats.append(jax.tree.map(_local_replica, s))
        else:
            out, s = _call(program.rows_fn, "expert_parallel_moe_layer", program.rest, program.stacks, x)
            jax.block_until_ready((out, s))
            outputs.append(_local_rows(out))
            stats.append(jax.tree.map(_local_rows, s))
    merged = merge_layer_stats(stats) if stats else None
    return outputs, (None if merged is None else _renamed(family, layer, merged))


def _renamed(family, layer: int, merged: LayerStats) -> LayerStats:
    prefix, canon_prefix = family.layer_prefix(layer), family.layer_prefix(_canonical_layer(family, layer))

    def rename(name: str) -> str:
        return prefix + name[len(canon_prefix):] if name.startswith(canon_prefix) else name

    experts = merged.experts.replace(prefix=rename(merged.experts.prefix)) if merged.experts is not None else None
    return LayerStats({rename(k): v for k, v in merged.input_amax.items()}, experts)


def per_device_argument_bytes(family, layer: int, params: Mapping[str, jax.Array], hidden, mesh: Mesh,
                              dtype=jnp.bfloat16) -> dict:
    """What one device holds as arguments of the layer's compiled forward: from the input
    shardings' shard shapes, and from the compiled program's memory analysis where the backend
    gives one (``argument_size_in_bytes``, per device for an SPMD program)."""
    program = prepare(family, layer, params, mesh, dtype)
    h = jax.device_put(hidden, NamedSharding(mesh, P(AXIS)))
    args = (program.rest, program.stacks, h)
    by_shards = 0
    for a in jax.tree.leaves(args):
        shard_shape = a.sharding.shard_shape(a.shape)
        by_shards += int(np.prod(shard_shape)) * a.dtype.itemsize
    analysis = resources.memory_analysis(program.rows_fn.lower(*args).compile())
    experts = sum(int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize for s in program.stacks)
    rest = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in jax.tree.leaves(program.rest))
    return {"by_shard_shapes": by_shards, "experts_per_device": experts, "replicated": rest,
            "hidden_per_device": int(np.prod(h.sharding.shard_shape(h.shape))) * h.dtype.itemsize,
            "memory_analysis": analysis}


__all__ = ["AXIS", "Across", "forward_across_processes", "spans_processes", "expert_owners",
           "quantize_on_owner_devices", "MODES", "DEFAULT_MODE", "ExpertBlocks", "LayerProgram", "enabled", "expert_mesh", "expert_of",
           "forward", "per_device_argument_bytes", "place_experts", "prepare", "read_layer"]
