"""Reference calibration: input amax of every linear of a transformers (PyTorch) causal LM.

``calibrate(model, batches)`` runs one forward per batch and records

    {"input_amax": {module_name: float},
     "experts": {"model.layers.{l}.mlp.experts": {"gate_up_input_amax": [E] floats,
                                                   "down_input_amax": [E] floats,
                                                   "tokens_per_expert": [E] ints}}}

Module names are the checkpoint names (the ``named_modules()`` names of a ``*ForCausalLM``, which
for the supported families equal the checkpoint tensor names without ``.weight``). amax is
``max |x|`` of the linear input over all tokens, computed on the tensor the model actually feeds to
the linear (the model's dtype), widened to a python float.

Non-routed linears (``nn.Linear``, lm_head included) are observed with forward pre-hooks.

Routed experts: transformers 5 stores them fused: ``mlp.experts`` is one module with 3-D parameters
``gate_up_proj [E, 2I, H]`` (gate rows first, then up) and ``down_proj [E, H, I]``, called as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``; its forward dispatches
to an implementation chosen by ``config._experts_implementation`` (eager loop, batched_mm,
grouped_mm, ...). A pre-hook on that module reads the routing from its arguments and, for each
expert that got tokens, takes max|x| over its tokens (gate/up input) and recomputes the down-proj
input ``act(x @ gate^T) * (x @ up^T)`` exactly as the eager implementation does (same dtype, one
``F.linear`` per expert). The checkpoint stores these as ``...mlp.experts.{e}.{gate,up,down}_proj``.
Older layouts with an ``nn.ModuleList`` of per-expert MLPs (``experts.{e}.gate_proj`` ...) are
observed with hooks on the per-expert linears and reported in the same ``experts`` form.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["calibrate", "merge_stats", "find_fused_experts", "CalibrationRecorder"]


def _amax(x: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return float(x.detach().abs().amax().float())


def find_fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding all routed experts of a layer as 3-D parameters (transformers 5 layout)."""
    out = {}
    for name, m in model.named_modules():
        gu = getattr(m, "gate_up_proj", None)
        up = getattr(m, "up_proj", None)
        dp = getattr(m, "down_proj", None)
        w = gu if isinstance(gu, torch.Tensor) else up
        if isinstance(w, torch.Tensor) and isinstance(dp, torch.Tensor) and w.ndim == 3 and dp.ndim == 3:
            out[name] = m
    return out


def _find_modulelist_experts(model: nn.Module) -> dict[str, nn.ModuleList]:
    """``...experts`` ModuleLists of per-expert MLPs with gate_proj/up_proj/down_proj Linears."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.endswith("experts") and len(m) > 0:
            if all(
                isinstance(getattr(e, "down_proj", None), nn.Linear)
                and isinstance(getattr(e, "up_proj", None), nn.Linear)
                for e in m
            ):
                out[name] = m
    return out


class CalibrationRecorder:
    """Installs hooks on a model, accumulates statistics, removes the hooks on ``close()``.

    Usable as a context manager::

        with CalibrationRecorder(model) as rec:
            model(ids)
        stats = rec.stats()
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.input_amax: dict[str, float] = {}
        self.experts: dict[str, dict[str, list]] = {}
        self._handles: list[Any] = []
        fused = find_fused_experts(model)
        listed = _find_modulelist_experts(model)
        expert_prefixes = tuple(p + "." for p in list(fused) + list(listed))

        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith(expert_prefixes):
                self._handles.append(m.register_forward_pre_hook(self._linear_hook(name)))
        for name, m in fused.items():
            E = self._num_experts(m)
            self.experts[name] = self._empty(E)
            self._handles.append(m.register_forward_pre_hook(self._fused_hook(name), with_kwargs=True))
        for name, ml in listed.items():
            E = len(ml)
            self.experts[name] = self._empty(E)
            for e, em in enumerate(ml):
                first = em.gate_proj if isinstance(getattr(em, "gate_proj", None), nn.Linear) else em.up_proj
                self._handles.append(first.register_forward_pre_hook(self._list_hook(name, e, "gate_up")))
                self._handles.append(em.down_proj.register_forward_pre_hook(self._list_hook(name, e, "down")))

    # -- bookkeeping -------------------------------------------------------------------------
    @staticmethod
    def _empty(E: int) -> dict[str, list]:
        return {"gate_up_input_amax": [0.0] * E, "down_input_amax": [0.0] * E, "tokens_per_expert": [0] * E}

    @staticmethod
    def _num_experts(m: nn.Module) -> int:
        w = m.gate_up_proj if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) else m.up_proj
        return int(w.shape[0])

    def _linear_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            a = _amax(x)
            self.input_amax[name] = max(self.input_amax.get(name, 0.0), a)

        return hook

    def _list_hook(self, prefix: str, e: int, which: str):
        def hook(module, args):
            x = args[0]
            rec = self.experts[prefix]
            key = "gate_up_input_amax" if which == "gate_up" else "down_input_amax"
            rec[key][e] = max(rec[key][e], _amax(x))
            if which == "gate_up":
                rec["tokens_per_expert"][e] += int(x.reshape(-1, x.shape[-1]).shape[0])

        return hook

    def _fused_hook(self, prefix: str):
        def hook(module, args, kwargs):
            hs = args[0] if len(args) > 0 else kwargs["hidden_states"]
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            self._record_fused(prefix, module, hs, idx)
            return None

        return hook

    @torch.no_grad()
    def _record_fused(self, prefix: str, m: nn.Module, hs: torch.Tensor, idx: torch.Tensor) -> None:
        E = self._num_experts(m)
        rec = self.experts[prefix]
        hs = hs.reshape(-1, hs.shape[-1])
        idx = idx.reshape(hs.shape[0], -1)
        valid = (idx >= 0) & (idx < E)  # expert-parallel sentinels (>= E) are not local experts
        counts = torch.bincount(idx[valid].long(), minlength=E).cpu().tolist()
        transposed = bool(getattr(m, "is_transposed", False))
        has_gate = bool(getattr(m, "has_gate", True)) and isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
        has_bias = bool(getattr(m, "has_bias", False))
        for e in range(E):
            if counts[e] == 0:
                continue
            tok = (idx == e).any(dim=-1).nonzero().squeeze(-1)
            x = hs[tok]
            rec["tokens_per_expert"][e] += int(counts[e])
            rec["gate_up_input_amax"][e] = max(rec["gate_up_input_amax"][e], _amax(x))
            w = m.gate_up_proj[e] if has_gate else m.up_proj[e]
            if transposed:
                h = x @ w
            else:
                h = F.linear(x, w)
            if has_bias:
                h = h + (m.gate_up_proj_bias[e] if has_gate else m.up_proj_bias[e])
            if has_gate:
                h = m._apply_gate(h) if hasattr(m, "_apply_gate") else _default_gate(m, h)
            else:
                h = m.act_fn(h)
            rec["down_input_amax"][e] = max(rec["down_input_amax"][e], _amax(h))

    # -- results ------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "input_amax": dict(self.input_amax),
            "experts": {
                k: {kk: list(vv) for kk, vv in v.items()} for k, v in self.experts.items()
            },
        }

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _default_gate(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return m.act_fn(gate) * up


def _as_batch(b: Any, device: torch.device) -> dict:
    if isinstance(b, dict):
        out = {}
        for k, v in b.items():
            out[k] = torch.as_tensor(v).to(device) if not isinstance(v, torch.Tensor) else v.to(device)
        if out["input_ids"].ndim == 1:
            out = {k: v.unsqueeze(0) for k, v in out.items()}
        return out
    t = b if isinstance(b, torch.Tensor) else torch.as_tensor(b)
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be an integer tensor, got {t.dtype} (shape {list(t.shape)})")
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise ValueError(f"token ids must be [B, S] or [S], got shape {list(t.shape)}")
    return {"input_ids": t.long().to(device)}


def merge_stats(a: dict, b: dict) -> dict:
    """Merge two calibrate() results: amax by max, token counts by sum."""
    out = {"input_amax": dict(a.get("input_amax", {})), "experts": {}}
    for k, v in b.get("input_amax", {}).items():
        out["input_amax"][k] = max(out["input_amax"].get(k, 0.0), v)
    for src in (a.get("experts", {}), b.get("experts", {})):
        for p, r in src.items():
            cur = out["experts"].get(p)
            if cur is None:
                out["experts"][p] = {kk: list(vv) for kk, vv in r.items()}
                continue
            if len(cur["tokens_per_expert"]) != len(r["tokens_per_expert"]):
                raise ValueError(f"merge_stats: {p} has {len(cur['tokens_per_expert'])} vs "
                                 f"{len(r['tokens_per_expert'])} experts")
            for kk in ("gate_up_input_amax", "down_input_amax"):
                cur[kk] = [max(x, y) for x, y in zip(cur[kk], r[kk])]
            cur["tokens_per_expert"] = [x + y for x, y in zip(cur["tokens_per_expert"], r["tokens_per_expert"])]
    return out


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any]) -> dict:
    """Run ``model`` on each batch and return the calibration statistics (see module docstring).

    ``batches``: an iterable of token-id batches, each a LongTensor/list ``[B, S]`` or ``[S]``, or a
    dict of model inputs with ``input_ids`` (e.g. with an ``attention_mask``; note that padded
    positions still pass through the linears and count). ModelOpt's reference run used one
    sequence per forward. Multiple batches merge by max (amax) and sum (token counts).
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        device = torch.device("cpu")
    with CalibrationRecorder(model) as rec:
        try:
            n = 0
            for b in batches:
                kw = _as_batch(b, device)
                model(**kw, use_cache=False)
                n += 1
            if n == 0:
                raise ValueError("calibrate: no batches given")
        finally:
            model.train(was_training)
        return rec.stats()
