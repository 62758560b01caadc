"""Checkpoint layout: linears, fused groups, routers, presets, exclude lists.

Everything here works on tensor / module *names* only (no tensor data), in the checkpoint's own
naming (``model.layers.3.mlp.experts.5.gate_proj``); what differs between model families comes
from their :class:`nvfp4_jax.families.FamilySpec`.  It also carries a simulation of how vLLM and
SGLang decide whether a module is excluded from ModelOpt NVFP4 quantization, so that the
``exclude_modules`` list we write can be proven safe, and so that ``nvfp4_jax.verify`` can check
checkpoints written by anyone.

Engine rules simulated (read from the engines' sources):

vLLM (``vllm/model_executor/layers/quantization/modelopt.py``, ``ModelOptQuantConfigBase``
``is_layer_excluded`` / ``apply_vllm_mapper`` and
``vllm/model_executor/layers/quantization/utils/quant_utils.py`` ``is_layer_skipped``):
  * the engine sees *fused* module names: ``qkv_proj``, ``gate_up_proj``, ``fused_qkv_a_proj``
    (DeepSeek MLA with q_lora_rank) and one ``FusedMoE`` module ``model.layers.L.mlp.experts``
    for all routed experts of a layer;
  * an entry ``"prefix*"`` whose second-to-last character is not ``.`` is rewritten to the two
    entries ``prefix`` and ``prefix.*`` (``apply_vllm_mapper``; done when the model has a weight
    mapper) -- and the bare ``prefix`` then also takes part in *substring* matching;
  * ``is_layer_skipped``: a fused module is skipped when every shard name is listed *exactly*; a
    mix raises ``ValueError("Detected some but not all shards ...")``; a module whose name
    contains ``experts`` is skipped when any entry that contains ``experts`` contains the module
    name (so one excluded expert excludes the whole layer's MoE); otherwise an exact match;
  * then plain substring (``entry in prefix``, also after stripping ``language_model.``);
  * then ``fnmatch(prefix, entry)``;
  * ``vision_tower`` / ``vision_model`` / ``visual`` in the name -> unquantized.

SGLang (``python/sglang/srt/layers/quantization/modelopt_quant.py``, ``ModelOptQuantConfig``
``_get_quant_method`` / ``is_layer_excluded`` / ``apply_weight_name_mapper`` and
``python/sglang/srt/layers/quantization/utils.py`` ``is_layer_skipped``):
  * engine names ``qkv_proj``, ``gate_up_proj``, ``fused_qkv_a_proj_with_mqa``, ``mlp.experts``;
  * Linear: ``is_layer_skipped(prefix, exclude, packed_modules_mapping)`` (exact names, fused
    shards all-or-nothing, mismatch raises) OR ``is_layer_excluded``; FusedMoE: only
    ``is_layer_excluded``.  ``packed_modules_mapping`` comes from the quant config and is usually
    absent, so we simulate both with and without it;
  * ``is_layer_excluded``: the entry becomes a regex (``.`` escaped, ``*`` -> ``.*``) that must
    ``fullmatch`` the whole name, the name without ``language_model.``, or ANY single dotted part
    of the name; and if the entry's last dotted part is one of ``q_a_proj``, ``q_b_proj``,
    ``kv_a_proj_with_mqa``, ``kv_b_proj`` and is a substring of the module's last part, the module
    is excluded -- in every layer, whatever the layer number in the entry.
  * entries starting with ``language_model.`` are also added without that prefix.

Wrappers (Kimi-K2.5: the text model under ``language_model.``, a vision tower and a projector):
the engines' ``kimi_k25.py`` rename checkpoint names before building modules
(``FamilySpec.engine_renames``): vLLM ``language_model.model.layers.L`` -> ``language_model.layers.L``
and ``language_model.lm_head`` -> ``lm_head``, with no weight mapper for the exclude list, so its
entries must be written in those engine names too; SGLang strips ``language_model.`` (engine names
``model.layers.L``, ``lm_head``) and matches entries with and without that prefix. Both build the
vision tower and projector without a quantization config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Mapping, Sequence

from nvfp4_jax.errors import NVFP4Error
from nvfp4_jax.families import (
    FamilySpec,
    FusedGroup,
    UnsupportedModelError,
    family_spec,
    find_family_spec,
    generic_family_spec,
    model_type,
)

__all__ = [
    "PRESETS",
    "UnsupportedModelError",
    "FusedShardMismatch",
    "Layout",
    "get_layout",
    "default_preset",
    "vllm_match",
    "sglang_match",
    "natural_key",
]

PRESETS = ("all", "mlp_only", "experts_only")

# Leaf names of Linear modules (besides anything ending in "_proj").
_LINEAR_LEAVES = frozenset(
    {"fc1", "fc2", "qkv", "proj", "dense", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "head"}
)
_NORM_HINTS = ("norm", "layernorm", "ln_")
_VISION_HINTS = ("visual", "vision_tower", "vision_model", "mm_projector", "multi_modal_projector")
_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)$")

SGLANG_FUSED_TAILS = frozenset({"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"})
VLLM_VISION_HINTS = ("vision_tower", "vision_model", "visual")


class FusedShardMismatch(NVFP4Error, ValueError):
    """The exclude list names some but not all shards of a fused engine module (engine raises)."""


def natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# --------------------------------------------------------------------------------------------
# Engine matching simulations (operate on ENGINE module names, i.e. fused names)
# --------------------------------------------------------------------------------------------

def _vllm_expand(entries: Sequence[str]) -> list[str]:
    out = []
    for e in entries:
        if len(e) >= 2 and e[-1] == "*" and e[-2] != ".":
            out.append(e[:-1])
            out.append(e[:-1] + ".*")
        else:
            out.append(e)
    return out


def vllm_match(prefix: str, entries: Sequence[str], packed: Mapping[str, Sequence[str]],
               *, expand_star: bool = True) -> str | None:
    """Why vLLM's ModelOpt config treats engine module ``prefix`` as excluded, or None.

    ``packed``: the model's packed_modules_mapping (fused leaf -> shard leaves).
    Raises FusedShardMismatch where vLLM raises (some but not all shards of a fused module listed).
    """
    entries = list(entries)
    if expand_star:
        entries = _vllm_expand(entries)
    if entries:
        proj = prefix.split(".")[-1]
        if proj in packed:
            shards = [prefix.replace(proj, s) for s in packed[proj]]
            hits = [s in entries for s in shards]
            if any(hits) and not all(hits):
                listed = [s for s, h in zip(shards, hits) if h]
                raise FusedShardMismatch(
                    f"vLLM raises 'Detected some but not all shards of {prefix} are quantized': "
                    f"exclude list names {listed} but not "
                    f"{[s for s, h in zip(shards, hits) if not h]}")
            if hits and all(hits):
                return f"all shards {shards} listed by exact name"
        elif "experts" in prefix:
            for e in entries:
                if "experts" in e and prefix in e:
                    return (f"entry '{e}' contains '{prefix}' (vLLM: one excluded expert excludes "
                            f"the whole MoE of the layer)")
        elif prefix in entries:
            return f"exact entry '{prefix}'"
        stripped = prefix[len("language_model."):] if prefix.startswith("language_model.") else None
        for e in entries:
            if e != prefix and (e in prefix or (stripped is not None and e in stripped)):
                return f"entry '{e}' is a substring of '{prefix}'"
        for e in entries:
            if fnmatchcase(prefix, e):
                return f"entry '{e}' matches '{prefix}' by fnmatch"
    for hint in VLLM_VISION_HINTS:
        if hint in prefix:
            return f"vision module ('{hint}' in name)"
    return None


def _sglang_regex(pattern: str):
    try:
        return re.compile(pattern.replace(".", r"\.").replace("*", ".*"))
    except re.error:
        return None


def sglang_match(prefix: str, entries: Sequence[str], packed: Mapping[str, Sequence[str]] | None = None,
                 *, is_moe: bool = False) -> str | None:
    """Why SGLang's ModelOpt config treats engine module ``prefix`` as excluded, or None.

    ``packed``: the quant config's packed_modules_mapping (None: absent, the usual case).
    ``is_moe``: FusedMoE modules skip the exact-name is_layer_skipped step.
    Raises FusedShardMismatch where SGLang raises.
    """
    ents: list[str] = []
    for e in entries:
        ents.append(e)
        if e.startswith("language_model."):
            ents.append(e[len("language_model."):])
    ents = list(dict.fromkeys(ents))
    if not ents:
        return None
    if not is_moe:
        proj = prefix.split(".")[-1]
        if packed and proj in packed:
            shards = [prefix.replace(proj, s) for s in packed[proj]]
            hits = [s in ents for s in shards]
            if any(hits) and not all(hits):
                raise FusedShardMismatch(
                    f"SGLang raises 'Detected some but not all shards of {prefix} are quantized': "
                    f"exclude list names {[s for s, h in zip(shards, hits) if h]} only")
            if all(hits):
                return f"all shards {shards} listed by exact name"
        elif prefix in ents:
            return f"exact entry '{prefix}'"
    variants = [prefix]
    if prefix.startswith("language_model."):
        variants.append(prefix[len("language_model."):])
    for pattern in ents:
        rx = _sglang_regex(pattern)
        if rx is not None:
            for v in variants:
                if rx.fullmatch(v):
                    return f"entry '{pattern}' matches '{v}' as a glob"
                for part in v.split("."):
                    if rx.fullmatch(part):
                        return f"entry '{pattern}' matches the dotted part '{part}' of '{v}'"
        tail = pattern.rsplit(".", 1)[-1]
        if tail in SGLANG_FUSED_TAILS:
            for v in variants:
                if tail in v.rsplit(".", 1)[-1]:
                    return (f"entry '{pattern}' ends in '{tail}', which SGLang applies to that "
                            f"projection in every layer")
    return None


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """Name rules of one checkpoint: its family's spec applied to its config. Use get_layout(config).

    fused: the spec's fused groups that this config has.
    generic: the model_type has no spec; ``spec`` is the closest one (verify only).
    """

    spec: FamilySpec
    model_type: str
    num_hidden_layers: int | None
    fused: tuple[FusedGroup, ...]
    generic: bool = False
    _leaf_group: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._leaf_group = {leaf: (g, i) for g in self.fused for i, leaf in enumerate(g.leaves)}

    @property
    def family(self) -> str:
        return self.spec.name

    @property
    def lm_head(self) -> str:
        """The output head's module name in the checkpoint (``language_model.lm_head`` in a wrapper)."""
        return self.spec.text_prefix + "lm_head"

    # -- names ---------------------------------------------------------------------------
    @staticmethod
    def module_of(name: str) -> tuple[str, str]:
        mod, _, leaf = name.rpartition(".")
        return mod, leaf

    def is_router(self, module: str) -> bool:
        return module.endswith(self.spec.routers)

    def is_vision(self, module: str) -> bool:
        return any(h in module for h in _VISION_HINTS)

    def is_mtp(self, module: str) -> bool:
        if not self.spec.mtp_after_last_layer or self.num_hidden_layers is None:
            return False
        li = self.spec.layer_index(module)
        return li is not None and li >= self.num_hidden_layers

    def _is_linear_module(self, module: str) -> bool:
        leaf = module.rsplit(".", 1)[-1]
        if module == "lm_head" or module.endswith(".lm_head"):
            return False
        if "embed" in leaf or any(h in leaf for h in _NORM_HINTS):
            return False
        if self.is_router(module):
            return False
        return "_proj" in leaf or leaf.endswith("proj") or leaf in _LINEAR_LEAVES

    def linear_modules(self, names: Iterable[str]) -> list[str]:
        """Modules (name without .weight) that are Linear weights; no lm_head, embeddings,
        norms or routers. Accepts ModelOpt (.weight) and compressed-tensors (.weight_packed)."""
        mods = set()
        for n in names:
            mod, leaf = self.module_of(n)
            if leaf in ("weight", "weight_packed") and mod and self.spec.is_text(mod) and self._is_linear_module(mod):
                mods.add(mod)
        return sorted(mods, key=natural_key)

    def passthrough_modules(self, names: Iterable[str]) -> list[str]:
        """Modules outside the text model of a wrapper (vision tower, projector): copied as they are,
        never calibrated or quantized. Empty for a plain text model."""
        mods = {self.module_of(n)[0] for n in names if not self.spec.is_text(n)}
        return sorted(mods, key=natural_key)

    def passthrough_entries(self, names: Iterable[str]) -> list[str]:
        """Exclude entries for the passthrough modules: ``root*`` per top-level part (``vision_tower*``)."""
        return sorted({m.split(".", 1)[0] + "*" for m in self.passthrough_modules(names)}, key=natural_key)

    def spellings(self, entry: str) -> list[str]:
        """An exclude entry and, where vLLM renames the checkpoint name, vLLM's engine spelling: vLLM
        matches the list as written against its renamed modules (SGLang adds the stripped spelling
        itself)."""
        return list(dict.fromkeys((entry, self.spec.engine_rename(entry, "vllm"))))

    def routers(self, names: Iterable[str]) -> list[str]:
        mods = set()
        for n in names:
            mod, leaf = self.module_of(n)
            if leaf == "weight" and self.is_router(mod):
                mods.add(mod)
        return sorted(mods, key=natural_key)

    def embeddings(self, names: Iterable[str]) -> list[str]:
        mods = set()
        for n in names:
            mod, leaf = self.module_of(n)
            if leaf == "weight" and "embed" in mod.rsplit(".", 1)[-1] and not self.is_vision(mod):
                mods.add(mod)
        return sorted(mods, key=natural_key)

    # -- fused groups ---------------------------------------------------------------------
    def group_key(self, module: str) -> tuple[str, str] | None:
        """(parent, kind) of the SPEC section 4 group a module belongs to, or None."""
        parent, _, leaf = module.rpartition(".")
        hit = self._leaf_group.get(leaf)
        return None if hit is None else (parent, hit[0].kind)

    def _shard_order(self, module: str) -> int:
        return self._leaf_group[module.rsplit(".", 1)[-1]][1]

    def fused_groups(self, modules: Iterable[str]) -> list[tuple[str, ...]]:
        groups: dict[tuple[str, str], list[str]] = {}
        for m in modules:
            k = self.group_key(m)
            if k is not None:
                groups.setdefault(k, []).append(m)
        out = []
        for k, ms in groups.items():
            ms = sorted(set(ms), key=self._shard_order)
            if len(ms) >= 2:
                out.append(tuple(ms))
        return sorted(out, key=lambda g: natural_key(g[0]))

    def close_groups(self, quantized: Iterable[str], modules: Iterable[str]) -> set[str]:
        """Drop every fused group (and MoE layer for the engines) that is not fully quantized.

        Use after removing linears whose K is not a multiple of 16: engines need one precision per
        fused GEMM and per FusedMoE layer.
        """
        q = set(quantized)
        changed = True
        while changed:
            changed = False
            for g in self.fused_groups(modules):
                if any(m in q for m in g) and not all(m in q for m in g):
                    q.difference_update(g)
                    changed = True
            by_moe: dict[str, list[str]] = {}
            for m in modules:
                mm = _EXPERT_RE.match(m)
                if mm:
                    by_moe.setdefault(mm.group(1), []).append(m)
            for ms in by_moe.values():
                if any(m in q for m in ms) and not all(m in q for m in ms):
                    q.difference_update(ms)
                    changed = True
        return q

    # -- presets --------------------------------------------------------------------------
    def is_expert(self, module: str) -> bool:
        return _EXPERT_RE.match(module) is not None

    def is_mlp(self, module: str) -> bool:
        return ".mlp." in module or ".block_sparse_moe." in module or ".feed_forward." in module

    def quantized(self, modules: Iterable[str], preset: str) -> set[str]:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
        out = set()
        for m in modules:
            if not self._is_linear_module(m) or self.is_vision(m) or self.is_mtp(m):
                continue
            if preset == "all":
                ok = True
            elif preset == "mlp_only":
                ok = self.is_mlp(m)
            else:
                ok = self.is_expert(m)
            if ok:
                out.add(m)
        return out

    # -- engine names ----------------------------------------------------------------------
    def packed(self, engine: str) -> dict[str, list[str]]:
        """The engine's packed_modules_mapping for this checkpoint: fused leaf -> shard leaves."""
        return {g.engine_leaf[engine]: list(g.leaves) for g in self.fused}

    def engine_name(self, module: str, engine: str) -> str:
        """The module name the engine builds for a checkpoint module (fused / FusedMoE names)."""
        mm = _EXPERT_RE.match(module)
        if mm:
            return self.spec.engine_rename(mm.group(1), engine)
        parent, _, leaf = module.rpartition(".")
        hit = self._leaf_group.get(leaf)
        fused = module if hit is None else f"{parent}.{hit[0].engine_leaf[engine]}"
        return self.spec.engine_rename(fused, engine)

    def engine_modules(self, modules: Iterable[str], engine: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for m in modules:
            out.setdefault(self.engine_name(m, engine), []).append(m)
        return out

    def engine_excluded(self, engine_prefix: str, entries: Sequence[str], engine: str,
                        variant: str) -> str | None:
        """Reason or None; may raise FusedShardMismatch. variant: vLLM 'expanded'|'raw',
        SGLang 'packed'|'unpacked'."""
        is_moe = engine_prefix.endswith(".experts")
        if engine == "vllm":
            return vllm_match(engine_prefix, entries, self.packed("vllm"),
                              expand_star=(variant != "raw"))
        return sglang_match(engine_prefix, entries,
                            self.packed("sglang") if variant == "packed" else None, is_moe=is_moe)

    VARIANTS = (("vllm", "expanded"), ("vllm", "raw"), ("sglang", "unpacked"), ("sglang", "packed"))

    def check_exclude(self, exclude: Sequence[str], linear_modules: Iterable[str],
                      quantized: Iterable[str], *, lm_head: bool = True) -> list[str]:
        """Problems (empty when safe): every engine module must be excluded exactly when its
        checkpoint modules are not quantized, under every simulated engine variant."""
        q = set(quantized)
        mods = list(linear_modules) + ([self.lm_head] if lm_head else [])
        problems = []
        for engine, variant in self.VARIANTS:
            for prefix, members in self.engine_modules(mods, engine).items():
                states = {m in q for m in members}
                if len(states) > 1:
                    problems.append(f"{prefix}: members differ in precision {sorted(members)}")
                    continue
                want_excluded = not states.pop()
                try:
                    why = self.engine_excluded(prefix, exclude, engine, variant)
                except FusedShardMismatch as e:
                    problems.append(f"{engine}/{variant} {prefix}: {e}")
                    continue
                if want_excluded and why is None:
                    problems.append(f"{engine}/{variant} {prefix}: not quantized but not excluded")
                elif not want_excluded and why is not None:
                    problems.append(f"{engine}/{variant} {prefix}: quantized but excluded ({why})")
        return problems

    # -- exclude list ------------------------------------------------------------------------
    def _entry_safe(self, entry: str, quantized_engine: dict[str, list[tuple[str, str]]]) -> bool:
        for (engine, variant), prefixes in quantized_engine.items():
            for p in prefixes:
                try:
                    if self.engine_excluded(p, [entry], engine, variant) is not None:
                        return False
                except FusedShardMismatch:
                    return False
        return True

    def exclude_modules(self, all_linear_modules: Iterable[str], quantized: Iterable[str],
                        routers: Iterable[str] = (), *, extra: Iterable[str] = (),
                        lm_head: bool = True) -> list[str]:
        """The exclude_modules / ignore list: lm_head, routers, every linear not quantized (plus
        ``extra``, e.g. embeddings). Prefix wildcards are used only where no quantized module is
        matched under any simulated vLLM/SGLang rule. Each entry comes in the checkpoint's spelling
        and, for a wrapper, in vLLM's engine spelling too (:meth:`spellings`). Raises ValueError if
        no safe list exists.
        """
        all_lin = sorted(set(all_linear_modules), key=natural_key)
        q = set(quantized)
        unknown = q - set(all_lin)
        if unknown:
            raise ValueError(f"quantized modules not among the linears: {sorted(unknown)[:5]}")
        for g in self.fused_groups(all_lin):
            if any(m in q for m in g) and not all(m in q for m in g):
                raise ValueError(f"fused group {g} is only partly quantized; engines need one "
                                 f"precision per fused GEMM (use close_groups)")
        routers = list(routers)
        unq = [m for m in all_lin if m not in q]
        layer_depth = self.spec.layer_prefix.count(".") + 1
        # quantized engine names under every variant
        qeng: dict[tuple[str, str], list[str]] = {}
        for engine, variant in self.VARIANTS:
            qeng[(engine, variant)] = sorted(self.engine_modules(sorted(q), engine))

        entries: list[str] = []
        covered: set[str] = set()
        safe_cache: dict[str, bool] = {}

        def safe(e: str) -> bool:
            if e not in safe_cache:
                safe_cache[e] = self._entry_safe(e, qeng)
            return safe_cache[e]

        def add(e: str):
            if e not in entries:
                entries.append(e)

        def cover(e: str):
            if e.endswith("*"):
                base = e[:-1]
                covered.update(x for x in unq if x == base or x.startswith(base + "."))

        always = ([self.lm_head] if lm_head else []) + list(extra) + routers
        for m in always:
            for e in self.spellings(m):
                if e == m or safe(e):
                    add(e)
                    cover(e)
        # units: a fused group is handled as one (engines need all shards on the same side and the
        # same entry form, else vLLM's exact-shard check raises)
        units: list[tuple[str, ...]] = []
        grouped: set[str] = set()
        for g in self.fused_groups(unq):
            units.append(g)
            grouped.update(g)
        units += [(m,) for m in unq if m not in grouped]
        units.sort(key=lambda u: natural_key(u[0]))
        for unit in units:
            if all(m in covered for m in unit):
                continue
            parts = unit[0].split(".")
            chosen: list[str] | None = None
            # shortest dotted ancestor wildcard, at least "<layer prefix>.L" deep
            min_depth = min(layer_depth, len(parts))
            for d in range(min_depth, len(parts)):
                cand = self.spellings(".".join(parts[:d]) + "*")
                if all(safe(c) for c in cand):
                    chosen = cand
                    break
            if chosen is None:
                for form in ("{}", "{}*"):
                    cands = [c for m in unit for c in self.spellings(form.format(m))]
                    if all(safe(c) for c in cands):
                        chosen = cands
                        break
            if chosen is None:
                raise ValueError(f"no exclude entry for {unit} is safe under vLLM and SGLang rules")
            for c in chosen:
                add(c)
                cover(c)
            covered.update(unit)
        # engine-fused names where only unfused names were listed (SGLang without packed mapping)
        for _ in range(2):
            problems_fix = False
            for engine, variant in self.VARIANTS:
                for prefix, members in self.engine_modules(unq, engine).items():
                    try:
                        why = self.engine_excluded(prefix, entries, engine, variant)
                    except FusedShardMismatch:
                        why = "mismatch"
                    if why is None:
                        if not safe(prefix):
                            raise ValueError(f"cannot exclude {prefix} for {engine} safely")
                        add(prefix)
                        problems_fix = True
            if not problems_fix:
                break
        problems = self.check_exclude(entries, all_lin, q, lm_head=False)
        if problems:
            raise ValueError("exclude list is not safe:\n  " + "\n  ".join(problems[:20]))
        return sorted(entries, key=natural_key)


def get_layout(config: Mapping, *, strict: bool = True) -> Layout:
    """Layout for a config.json dict. Unsupported model types raise UnsupportedModelError
    (strict) or get the closest family's name rules (strict=False, used by verify)."""
    spec = find_family_spec(config)
    generic = spec is None
    if generic:
        if strict:
            family_spec(config)  # raises, naming the model_type
        spec = generic_family_spec(config)
    n_layers = spec.text_config(config).get("num_hidden_layers")
    return Layout(spec, str(model_type(config)), n_layers, spec.fused_groups(config), generic)


def default_preset(config: Mapping) -> str:
    spec = find_family_spec(config)
    return spec.default_preset if spec is not None else "all"
