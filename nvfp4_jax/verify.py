"""``nvfp4-jax verify CKPT``: check that an NVFP4 checkpoint will load in vLLM and SGLang.

Works on ModelOpt NVFP4 checkpoints (ours or ModelOpt's own) and on compressed-tensors
``nvfp4-pack-quantized`` checkpoints. Scans the safetensors files leniently (every problem becomes
a finding) and reads the (small) scale tensors as raw bytes, so it needs no JAX; the name rules
come from ``nvfp4_jax.checkpoint.layout`` and the family specs.

Checks (SPEC sections 1, 3, 4, 6):
  * config: ``quantization_config`` in config.json and hf_quant_config.json, consistent, with the
    keys both engines need; no leftover source quantization block; the config keys the family's
    spec requires (DeepSeek/Kimi router keys);
  * tensors: for every quantized linear the four tensors with SPEC dtypes and shapes, K % 16 == 0,
    no NaN/Inf/zero/negative scale; no leftovers (weight_packed, weight_scale_inv, weight_shape,
    FP8 weights, stacked 3-D expert tensors); index and shard headers consistent;
  * fused groups: one weight_scale_2 and one input_scale per group;
  * exclusions: the quantized state of every module in the files against what vLLM and SGLang
    would decide from the exclude list (simulations in layout.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import zlib
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from nvfp4_jax.checkpoint import formats
from nvfp4_jax.checkpoint.layout import (
    FusedShardMismatch,
    Layout,
    get_layout,
    natural_key,
)
from nvfp4_jax.checkpoint.safetensors_io import DTYPES, ERROR, WARNING, TensorEntry, scan_checkpoint
from nvfp4_jax.checkpoint.writer import CHECKSUMS_NAME
from nvfp4_jax.families import find_family_spec

__all__ = ["Finding", "verify", "run_verify"]

INFO = "info"

@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning" | "info"
    name: str      # tensor, module or file the finding is about
    message: str

    def line(self) -> str:
        return f"{self.severity.upper()}: {self.name}: {self.message}"


# --------------------------------------------------------------------------------------------
# safetensors access (headers + small reads)
# --------------------------------------------------------------------------------------------

class _Store:
    """The checkpoint's tensors (scanned leniently: problems become findings) and small reads."""

    def __init__(self, root: Path, findings: list):
        scan = scan_checkpoint(root, strict=False)
        findings.extend(Finding(p.severity, p.subject, p.message) for p in scan.problems)
        self.tensors: dict[str, TensorEntry] = scan.tensors
        self._handles: dict[Path, Any] = {}

    def handle(self, ref: TensorEntry):
        """The open file of ``ref``, positioned at its first byte."""
        fh = self._handles.get(ref.file)
        if fh is None:
            fh = self._handles[ref.file] = open(ref.file, "rb")
        fh.seek(ref.start)
        return fh

    def read(self, ref: TensorEntry) -> bytes:
        return self.handle(ref).read(ref.nbytes)

    def f32_values(self, ref: TensorEntry) -> np.ndarray:
        return np.frombuffer(self.read(ref), dtype="<f4").reshape(ref.shape)

    def close(self):
        for fh in self._handles.values():
            fh.close()


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

class _Verifier:
    def __init__(self, path: str | os.PathLike, check_values: bool = True):
        self.root = Path(path)
        self.check_values = check_values
        self.findings: list[Finding] = []
        self.fmt = "unknown"
        self.stats: dict[str, Any] = {}

    def add(self, sev, name, msg):
        self.findings.append(Finding(sev, name, msg))

    # -- config ----------------------------------------------------------------------------
    def _load_json(self, fn: str):
        p = self.root / fn
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except Exception as e:  # noqa: BLE001
            self.add(ERROR, fn, f"not valid JSON: {e}")
            return None

    def check_config(self, tensor_names: list[str]) -> list[tuple[str, list[str]]]:
        """Returns the exclude lists to simulate, as (label, entries)."""
        cfg = self.config
        hq = self._load_json("hf_quant_config.json")
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        has_ws2 = any(n.endswith(".weight_scale_2") for n in tensor_names)
        has_wgs = any(n.endswith(".weight_global_scale") for n in tensor_names)
        lists: list[tuple[str, list[str]]] = []

        if "compression_config" in cfg:
            self.add(ERROR, "config.json", "leftover 'compression_config' block (old compressed-"
                     "tensors key) from the source checkpoint")
        self._check_nested_quant_configs(cfg, qc)

        qm = (qc or {}).get("quant_method") if isinstance(qc, dict) else None
        qfmt = (qc or {}).get("format") if isinstance(qc, dict) else None
        if (qm == "compressed-tensors" and formats.CompressedTensors.declared_format(qc) == formats.CT_FORMAT
                and not has_ws2):
            self.fmt = "compressed-tensors"
            self._check_ct_config(qc, hq)
            lists.append(("config.json ignore", list(qc.get("ignore") or [])))
            return lists

        self.fmt = "modelopt"
        if qc is None:
            self.add(ERROR, "config.json", "no quantization_config (vLLM and SGLang read "
                     "config.json first; SPEC section 6 requires the modelopt block there)")
        elif not isinstance(qc, dict):
            self.add(ERROR, "config.json", "quantization_config is not an object")
            qc = None
        elif qm != "modelopt":
            what = f"{qm}" + (f" '{qfmt}'" if qfmt else "")
            self.add(ERROR, "config.json",
                     f"quantization_config is a leftover source block (quant_method {what}), not "
                     f"the modelopt NVFP4 block; vLLM reads config.json before hf_quant_config.json "
                     f"and would load these NVFP4 tensors with the wrong method")
            qc = None
        if has_wgs and not has_ws2:
            self.add(ERROR, "config.json", "tensors are in compressed-tensors form "
                     "(weight_global_scale) but the config is not nvfp4-pack-quantized")

        hq_q = None
        if hq is None:
            if not (self.root / "hf_quant_config.json").exists():
                self.add(ERROR, "hf_quant_config.json", "missing (SPEC section 6 requires it)")
        elif not isinstance(hq.get("quantization"), dict):
            self.add(ERROR, "hf_quant_config.json", "no 'quantization' object")
        else:
            hq_q = hq["quantization"]
            if "producer" not in hq:
                self.add(WARNING, "hf_quant_config.json", "no 'producer' block")
            if hq_q.get("quant_algo") is None:
                self.add(ERROR, "hf_quant_config.json", "quantization.quant_algo missing")
            elif str(hq_q["quant_algo"]).upper() != "NVFP4":
                self.add(ERROR, "hf_quant_config.json",
                         f"quantization.quant_algo is {hq_q['quant_algo']!r}, expected 'NVFP4'")
            if "kv_cache_quant_algo" not in hq_q:
                self.add(ERROR, "hf_quant_config.json", "quantization.kv_cache_quant_algo key is "
                         "missing (vLLM requires the key; null is fine)")
            elif hq_q["kv_cache_quant_algo"] not in (None, "FP8", "NVFP4"):
                self.add(ERROR, "hf_quant_config.json", f"quantization.kv_cache_quant_algo "
                         f"{hq_q['kv_cache_quant_algo']!r} is not null, 'FP8' or 'NVFP4'")
            if "group_size" not in hq_q:
                self.add(ERROR, "hf_quant_config.json", "quantization.group_size missing "
                         "(SGLang: 'NVFP4 quantization requires group_size')")
            elif hq_q["group_size"] != 16:
                self.add(ERROR, "hf_quant_config.json",
                         f"quantization.group_size is {hq_q['group_size']!r}, expected 16")
            if "exclude_modules" not in hq_q:
                self.add(ERROR, "hf_quant_config.json", "quantization.exclude_modules missing")
            elif not isinstance(hq_q["exclude_modules"], list):
                self.add(ERROR, "hf_quant_config.json", "quantization.exclude_modules is not a list")
            else:
                lists.append(("hf_quant_config.json exclude_modules", list(hq_q["exclude_modules"])))

        if qc is not None:
            if str(qc.get("quant_algo", "")).upper() != "NVFP4":
                self.add(ERROR, "config.json", f"quantization_config.quant_algo is "
                         f"{qc.get('quant_algo')!r}, expected 'NVFP4'")
            ign = qc.get("ignore")
            if ign is None:
                self.add(ERROR, "config.json", "quantization_config.ignore missing (the engines "
                         "then quantize lm_head and every excluded linear)")
            elif not isinstance(ign, list):
                self.add(ERROR, "config.json", "quantization_config.ignore is not a list")
                ign = None
            gs = formats.declared_group_sizes(qc)
            if not gs:
                self.add(ERROR, "config.json", "quantization_config has no group_size (top level "
                         "or config_groups.*.weights); SGLang refuses to load")
            elif gs != {16}:
                self.add(ERROR, "config.json", f"quantization_config group_size values "
                         f"{sorted(gs)}, expected 16 everywhere")
            for gname, g in (qc.get("config_groups") or {}).items():
                for part in ("weights", "input_activations"):
                    a = (g or {}).get(part)
                    if not isinstance(a, dict):
                        self.add(ERROR, "config.json", f"config_groups.{gname}.{part} missing")
                        continue
                    if a.get("num_bits") != 4 or a.get("type") != "float":
                        self.add(ERROR, "config.json", f"config_groups.{gname}.{part} is not "
                                 f"4-bit float (num_bits={a.get('num_bits')}, type={a.get('type')})")
            if hq_q is not None:
                if str(hq_q.get("quant_algo", "")).upper() != str(qc.get("quant_algo", "")).upper():
                    self.add(ERROR, "config.json", "quant_algo differs between config.json and "
                             "hf_quant_config.json")
                ex = hq_q.get("exclude_modules")
                if isinstance(ex, list) and ign is not None and sorted(ex) != sorted(ign):
                    only_a = sorted(set(ign) - set(ex))[:5]
                    only_b = sorted(set(ex) - set(ign))[:5]
                    self.add(ERROR, "config.json", f"quantization_config.ignore differs from "
                             f"hf_quant_config.json exclude_modules (only in config.json: {only_a}; "
                             f"only in hf_quant_config.json: {only_b})")
                    lists.append(("config.json ignore", list(ign)))
            elif ign is not None:
                lists.append(("config.json ignore", list(ign)))
        return lists

    def _check_nested_quant_configs(self, cfg: dict, qc) -> None:
        """A wrapper's nested configs (Kimi-K2.5's ``text_config``) may repeat the top-level block,
        nothing else: transformers and SGLang's KimiK25Config copy a nested block to the top level,
        so a stale source block there (the INT4 one) would replace the NVFP4 one."""
        for key, sub in cfg.items():
            nested = sub.get("quantization_config") if isinstance(sub, dict) else None
            if nested is not None and nested != qc:
                what = nested.get("quant_method") if isinstance(nested, dict) else type(nested).__name__
                fmt = nested.get("format") if isinstance(nested, dict) else None
                self.add(ERROR, "config.json", f"{key}.quantization_config is a leftover source block (quant_method "
                         f"{what}{f' {fmt!r}' if fmt else ''}) differing from the top-level one; loaders copy it "
                         f"to the top level and would load the NVFP4 tensors with the wrong method")

    def _check_ct_config(self, qc: dict, hq):
        if hq is not None:
            self.add(WARNING, "hf_quant_config.json", "present in a compressed-tensors checkpoint; "
                     "engines use config.json's compressed-tensors block and ignore it")
        groups = qc.get("config_groups") or {}
        if not groups:
            self.add(ERROR, "config.json", "compressed-tensors quantization_config has no config_groups")
        for gname, g in groups.items():
            w = (g or {}).get("weights") or {}
            if (w.get("num_bits"), w.get("type"), w.get("group_size"), w.get("strategy")) != (
                    4, "float", 16, "tensor_group"):
                self.add(ERROR, "config.json", f"config_groups.{gname}.weights is not NVFP4 "
                         f"(4-bit float, tensor_group, group 16): {w}")
            if w.get("symmetric") is False:
                self.add(ERROR, "config.json", f"config_groups.{gname}.weights not symmetric")
            a = (g or {}).get("input_activations")
            if a is None:
                self.add(ERROR, "config.json", f"config_groups.{gname}.input_activations missing")
            elif (a.get("num_bits"), a.get("type"), a.get("group_size")) != (4, "float", 16):
                self.add(ERROR, "config.json", f"config_groups.{gname}.input_activations is not "
                         f"NVFP4: {a}")
        if "ignore" not in qc:
            self.add(ERROR, "config.json", "quantization_config.ignore missing")

    def check_arch(self):
        spec = find_family_spec(self.config)
        if spec is None:
            return
        src = spec.text_config(self.config)
        for k in spec.required_config_keys:
            if k not in src:
                self.add(ERROR, "config.json", f"'{k}' missing: {spec.required_config_reason}")

    # -- tensors ---------------------------------------------------------------------------
    def check_tensors(self, store: _Store, layout: Layout):
        names = list(store.tensors)
        T = store.tensors
        ct = self.fmt == "compressed-tensors"
        by_mod: dict[str, dict[str, TensorEntry]] = {}
        for n, ref in T.items():
            mod, _, leaf = n.rpartition(".")
            by_mod.setdefault(mod, {})[leaf] = ref

        # leftovers of source formats / stacked experts
        for n, ref in T.items():
            leaf = n.rpartition(".")[2]
            if leaf == "weight_scale_inv":
                self.add(ERROR, n, "leftover FP8-block scale (weight_scale_inv) from the source")
            elif leaf == "weight_shape":
                self.add(ERROR, n, "leftover compressed-tensors INT4 weight_shape from the source")
            elif leaf == "weight_packed" and (not ct or ref.dtype != "U8"):
                self.add(ERROR, n, f"leftover compressed-tensors weight_packed ({ref.dtype}"
                         f"{list(ref.shape)}) from the INT4 source")
            if ".experts." in n + "." and len(ref.shape) == 3:
                self.add(ERROR, n, f"stacked 3-D expert tensor {list(ref.shape)}; SPEC section 4 "
                         f"requires one module per expert")

        linear = layout.linear_modules(names)
        if layout.lm_head in by_mod and "weight" in by_mod[layout.lm_head]:
            linear = linear + [layout.lm_head]
        for r in layout.routers(names):
            w = by_mod[r].get("weight")
            if w is not None and (w.dtype == "U8" or "weight_scale" in by_mod[r]):
                self.add(ERROR, r, "router is quantized; both engines build it unquantized")

        quantized: set[str] = set()
        pertensor: dict[str, dict[str, np.ndarray]] = {}
        for m in linear:
            t = by_mod.get(m, {})
            if ct:
                is_q = "weight_packed" in t or "weight_global_scale" in t
            else:
                w = t.get("weight")
                is_q = (w is not None and w.dtype == "U8") or any(
                    k in t for k in ("weight_scale_2", "input_scale")) or (
                    "weight_scale" in t and t["weight_scale"].dtype == "F8_E4M3")
            if not is_q:
                w = t.get("weight")
                if w is not None and w.dtype in ("F8_E4M3", "F8_E5M2"):
                    self.add(ERROR, m + ".weight", f"FP8 weight ({w.dtype}) left from the source; "
                             f"unquantized linears must be bf16")
                continue
            quantized.add(m)
            pertensor[m] = self._check_module(store, m, t, ct)
        self.stats.update(linears=len(linear), quantized=len(quantized))
        return linear, quantized, pertensor

    def _check_module(self, store: _Store, m: str, t: dict, ct: bool) -> dict[str, np.ndarray]:
        wname, s2name, inname = (("weight_packed", "weight_global_scale", "input_global_scale")
                                 if ct else ("weight", "weight_scale_2", "input_scale"))
        scalars = {}
        if ct and "weight" in t:
            self.add(ERROR, m + ".weight", "plain 'weight' beside weight_packed")
        if ct:
            for leftover in ("weight_scale_2", "input_scale"):
                if leftover in t:
                    self.add(ERROR, f"{m}.{leftover}", "ModelOpt tensor in a compressed-tensors checkpoint")
        else:
            for leftover in ("weight_global_scale", "input_global_scale"):
                if leftover in t:
                    self.add(ERROR, f"{m}.{leftover}", "compressed-tensors tensor in a ModelOpt checkpoint")
        w = t.get(wname)
        N = K = None
        if w is None:
            self.add(ERROR, f"{m}.{wname}", "missing packed weight")
        elif w.dtype != "U8" or len(w.shape) != 2:
            self.add(ERROR, f"{m}.{wname}", f"expected U8 [N, K/2], found {w.dtype}{list(w.shape)}")
        else:
            N, K = w.shape[0], 2 * w.shape[1]
            if K % 16:
                self.add(ERROR, f"{m}.{wname}", f"K = {K} is not a multiple of 16 (block size); "
                         f"such a linear must stay unquantized")
        ws = t.get("weight_scale")
        if ws is None:
            self.add(ERROR, f"{m}.weight_scale", "missing block scale weight_scale")
        elif ws.dtype != "F8_E4M3":
            self.add(ERROR, f"{m}.weight_scale", f"dtype {ws.dtype}, expected F8_E4M3")
        else:
            if N is not None and K % 16 == 0 and tuple(ws.shape) != (N, K // 16):
                self.add(ERROR, f"{m}.weight_scale", f"shape {list(ws.shape)}, expected "
                         f"[{N}, {K // 16}] = [N, K/16] (plain row-major, not swizzled)")
            if self.check_values:
                self._check_block_scales(store, f"{m}.weight_scale", ws)
        ok_shapes = ((1,), ()) if ct else ((),)
        for leaf in (s2name, inname):
            ref = t.get(leaf)
            if ref is None:
                why = ("engines allocate it with torch.empty and would read garbage"
                       if leaf in ("input_scale", "input_global_scale") else "required tensor scale")
                self.add(ERROR, f"{m}.{leaf}", f"missing {leaf} ({why})")
                continue
            if ref.dtype != "F32" or tuple(ref.shape) not in ok_shapes:
                exp = "F32 [1]" if ct else "F32 []"
                self.add(ERROR, f"{m}.{leaf}", f"{ref.dtype}{list(ref.shape)}, expected {exp}")
                if ref.dtype != "F32":
                    continue
            v = store.f32_values(ref).reshape(-1)
            if v.size:
                x = float(v[0])
                if math.isnan(x) or math.isinf(x):
                    self.add(ERROR, f"{m}.{leaf}", f"{leaf} is {x}")
                elif x <= 0:
                    self.add(ERROR, f"{m}.{leaf}", f"{leaf} is {x}, must be > 0")
                scalars[leaf] = v[:1].copy()
        return scalars

    def _check_block_scales(self, store: _Store, name: str, ref: TensorEntry):
        b = np.frombuffer(store.read(ref), dtype=np.uint8)
        if b.size == 0:
            return
        shape = ref.shape if math.prod(ref.shape) == b.size else (b.size,)
        mag = b & 0x7F
        nan = mag == 0x7F
        zero = mag == 0
        neg = ((b & 0x80) != 0) & ~nan & ~zero
        for mask, what in ((nan, "NaN"), (zero, "zero"), (neg, "negative")):
            cnt = int(mask.sum())
            if cnt:
                first = np.unravel_index(int(np.argmax(mask)), shape)
                val = b[int(np.argmax(mask)):int(np.argmax(mask)) + 1].view(ml_dtypes.float8_e4m3fn)[0]
                self.add(ERROR, name, f"{cnt} {what} block scale(s) in weight_scale (first at "
                         f"{[int(i) for i in first]}, value {float(val)})")

    # -- fused groups ----------------------------------------------------------------------
    def check_groups(self, layout: Layout, linear: list[str], quantized: set[str], scalars):
        ct = self.fmt == "compressed-tensors"
        for g in layout.fused_groups(linear):
            inq = [m for m in g if m in quantized]
            if inq and len(inq) != len(g):
                self.add(ERROR, g[0].rpartition(".")[0],
                         f"fused group half quantized: {[m.rpartition('.')[2] for m in inq]} "
                         f"quantized, {[m.rpartition('.')[2] for m in g if m not in quantized]} not; "
                         f"engines fuse them into one GEMM with one precision")
                continue
            if not inq:
                continue
            kind = layout.group_key(g[0])[1]
            short = "/".join(m.rpartition(".")[2] for m in g)
            for leaf in (("weight_global_scale", "input_global_scale") if ct
                         else ("weight_scale_2", "input_scale")):
                vals = {m: scalars.get(m, {}).get(leaf) for m in g}
                if any(v is None for v in vals.values()):
                    continue
                flat = {m: float(v[0]) for m, v in vals.items()}
                if len({np.float32(x).tobytes() for x in flat.values()}) > 1:
                    desc = ", ".join(f"{m.rpartition('.')[2]}={x!r}" for m, x in flat.items())
                    extra = {"gate_up": "for MoE experts vLLM keeps the gate's scale for both "
                                        "(garbage output)",
                             "qkv_a": "fused_qkv_a_proj keeps one scale",
                             "qkv": "qkv_proj keeps one scale"}.get(kind, "")
                    self.add(ERROR, g[0].rpartition(".")[0],
                             f"fused group {short} has different {leaf}: {desc}; the engines keep one "
                             f"{leaf} per fused GEMM ({extra})")

    # -- wrapper: vision tower and projector ---------------------------------------------
    def check_passthrough(self, store: _Store, layout: Layout, lists: list[tuple[str, list[str]]]):
        """A wrapper's modules outside the text model (vision tower, projector) stay unquantized
        (both engines build them without a quantization config) and are named by every exclude
        list, as the checkpoint spells them."""
        mods = layout.passthrough_modules(store.tensors)
        for m in mods:
            for leaf in ("weight_packed", "weight_scale", "weight_scale_2", "input_scale", "weight_global_scale"):
                if f"{m}.{leaf}" in store.tensors:
                    self.add(ERROR, f"{m}.{leaf}", "vision/projector module is quantized; vLLM and SGLang build "
                             "it without a quantization config")
            w = store.tensors.get(f"{m}.weight")
            if w is not None and w.dtype in ("U8", "F8_E4M3", "F8_E5M2"):
                self.add(ERROR, f"{m}.weight", f"vision/projector weight is {w.dtype}; it must stay as the source had it")
        for label, entries in lists:
            missing = [m for m in mods if f"{m}.weight" in store.tensors and not _listed(m, entries)]
            if missing:
                self.add(ERROR, label, f"{len(missing)} vision/projector module(s) not excluded (first: {missing[0]}); "
                         f"list them (e.g. {layout.passthrough_entries(store.tensors)}) so that no loader expects "
                         f"NVFP4 tensors for them")

    # -- exclusions ------------------------------------------------------------------------
    def check_exclusions(self, layout: Layout, linear: list[str], quantized: set[str],
                         lists: list[tuple[str, list[str]]]):
        if self.fmt == "compressed-tensors":
            self._check_ct_ignore(layout, linear, quantized, lists)
            return
        engine_label = {("vllm", "expanded"): "vLLM", ("vllm", "raw"): "vLLM (no weight mapper)",
                        ("sglang", "unpacked"): "SGLang",
                        ("sglang", "packed"): "SGLang (with packed_modules_mapping)"}
        for label, entries in lists:
            bad = [e for e in entries if not isinstance(e, str)]
            if bad:
                self.add(ERROR, label, f"non-string entries {bad[:3]}")
                entries = [e for e in entries if isinstance(e, str)]
            reported: set[tuple[str, str]] = set()
            for engine, variant in Layout.VARIANTS:
                eng = engine_label[(engine, variant)]
                for prefix, members in sorted(layout.engine_modules(linear, engine).items(),
                                              key=lambda kv: natural_key(kv[0])):
                    st = {m in quantized for m in members}
                    if len(st) > 1:
                        if prefix.endswith(".experts"):
                            key = (prefix, "mixed")
                            if key not in reported:
                                reported.add(key)
                                nq = sum(m not in quantized for m in members)
                                self.add(ERROR, prefix, f"{nq} of {len(members)} expert linears are "
                                         f"not quantized; both engines quantize a layer's experts "
                                         f"all or nothing")
                        continue  # fused half-quantized groups reported by check_groups
                    is_q = st.pop()
                    try:
                        why = layout.engine_excluded(prefix, entries, engine, variant)
                    except FusedShardMismatch as e:
                        key = (prefix, "mismatch-" + engine)
                        if key not in reported:
                            reported.add(key)
                            self.add(ERROR, prefix, f"fused group half excluded in {label}: {e}")
                        continue
                    key = (prefix, engine + str(is_q))
                    if key in reported:
                        continue
                    if is_q and why is not None:
                        reported.add(key)
                        self.add(ERROR, prefix, f"quantized in the files but {eng} would load it "
                                 f"unquantized: {why} ({label})")
                    elif not is_q and why is None:
                        reported.add(key)
                        self.add(ERROR, prefix, f"not quantized in the files but {eng} would expect "
                                 f"NVFP4 tensors: no entry of {label} excludes it")

    def _check_ct_ignore(self, layout, linear, quantized, lists):
        for label, entries in lists:
            def ignored(m):
                for e in entries:
                    if e.startswith("re:"):
                        if re.match(e[3:], m):
                            return True
                    elif e == m:
                        return True
                return False
            for m in linear:
                ig = ignored(m)
                if (m in quantized) and ig:
                    self.add(ERROR, m, f"quantized in the files but ignored by {label}")
                elif (m not in quantized) and not ig:
                    self.add(ERROR, m, f"not quantized in the files and not in {label}")

    # -- driver ----------------------------------------------------------------------------
    def check_bytes(self, store: _Store) -> None:
        """Every tensor byte: no NaN/Inf in floating tensors, and each tensor's CRC-32 equal to the
        one recorded at convert time (``nvfp4_checksums.json``, when present)."""
        sums = self._load_json(CHECKSUMS_NAME) if (self.root / CHECKSUMS_NAME).exists() else None
        recorded = {n: (f, c) for f, names in ((sums or {}).get("files") or {}).items() for n, c in names.items()}
        for name in sorted(set(recorded) - set(store.tensors)):
            self.add(ERROR, name, f"listed in {CHECKSUMS_NAME} ({recorded[name][0]}) but not in the checkpoint")
        for name, ref in store.tensors.items():
            crc, bad, first = _scan_bytes(store, ref)
            if bad:
                self.add(ERROR, name, f"{bad} NaN/Inf value(s), the first at flat index {first}")
            if sums is not None:
                want = recorded.get(name)
                if want is None:
                    self.add(ERROR, name, f"not listed in {CHECKSUMS_NAME}: added after the conversion?")
                elif want[1] != f"{crc:08x}":
                    self.add(ERROR, name, f"CRC-32 {crc:08x} differs from {want[1]} recorded in {CHECKSUMS_NAME}: "
                                          "its bytes changed after the conversion")

    def run(self) -> list[Finding]:
        if not self.root.is_dir():
            self.add(ERROR, str(self.root), "not a directory")
            return self.findings
        cfg = self._load_json("config.json")
        if cfg is None:
            if not (self.root / "config.json").exists():
                self.add(ERROR, "config.json", "missing")
            return self.findings
        self.config = cfg
        store = _Store(self.root, self.findings)
        try:
            names = list(store.tensors)
            lists = self.check_config(names)
            self.check_arch()
            layout = get_layout(cfg, strict=False)
            if layout.generic:
                self.add(INFO, "config.json", f"model_type {layout.model_type!r} has no dedicated "
                         f"layout; using generic name rules")
            linear, quantized, scalars = self.check_tensors(store, layout)
            self.check_passthrough(store, layout, lists)
            if not quantized:
                self.add(ERROR, str(self.root), "no quantized linear found")
            self.check_groups(layout, linear, quantized, scalars)
            self.check_exclusions(layout, linear, quantized, lists)
            if self.check_values:
                self.check_bytes(store)
        finally:
            store.close()
        return self.findings


def _listed(module: str, entries) -> bool:
    """Whether an exclude/ignore entry names ``module``: exact, ModelOpt glob or ``re:`` regex."""
    for e in entries:
        if not isinstance(e, str):
            continue
        if e.startswith("re:"):
            if re.match(e[3:], module):
                return True
        elif e == module or fnmatchcase(module, e):
            return True
    return False


_SCAN_CHUNK = 64 << 20


def _scan_bytes(store: _Store, ref: TensorEntry) -> tuple[int, int, int]:
    """(CRC-32 of the tensor's bytes, count of NaN/Inf values, flat index of the first one or -1)."""
    dt = DTYPES.get(ref.dtype) if ref.dtype.startswith(("F", "BF")) else None  # the floating dtypes
    fh = store.handle(ref)
    crc, bad, first, done = 0, 0, -1, 0
    step = _SCAN_CHUNK - _SCAN_CHUNK % (np.dtype(dt).itemsize if dt else 1)
    while done < ref.nbytes:
        chunk = fh.read(min(step, ref.nbytes - done))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        if dt is not None:
            vals = np.frombuffer(chunk, dtype=dt).astype(np.float32)
            nonfinite = ~np.isfinite(vals)
            n = int(nonfinite.sum())
            if n and first < 0:
                first = done // np.dtype(dt).itemsize + int(np.argmax(nonfinite))
            bad += n
        done += len(chunk)
    return crc, bad, first


def _with_source(v: _Verifier, source) -> list[Finding]:
    findings = v.run()
    if source is not None and v.root.is_dir():
        from nvfp4_jax.verify_source import verify_against_source

        findings = findings + verify_against_source(v.root, source)
    return findings


def verify(path, *, check_values: bool = True, source=None) -> list[Finding]:
    """All findings for the checkpoint directory ``path`` (empty list: clean); with ``source``,
    also the output checked against that source checkpoint (:mod:`nvfp4_jax.verify_source`)."""
    return _with_source(_Verifier(path, check_values), source)


def _summary(v: _Verifier, findings: list[Finding]) -> dict:
    n = {s: sum(f.severity == s for f in findings) for s in (ERROR, WARNING, INFO)}
    return {"path": str(v.root), "format": v.fmt, "errors": n[ERROR], "warnings": n[WARNING],
            "infos": n[INFO], "linears": v.stats.get("linears", 0),
            "quantized": v.stats.get("quantized", 0), "ok": n[ERROR] == 0 and n[WARNING] == 0}


def run_verify(path, as_json: bool = False, *, check_values: bool = True, source=None, out=None) -> int:
    """Print one line per finding and a summary; exit code 0 only when there is no error or
    warning."""
    out = out or sys.stdout
    v = _Verifier(path, check_values)
    findings = _with_source(v, source)
    s = _summary(v, findings)
    if source is not None:
        s["source"] = str(source)
    if as_json:
        json.dump({"summary": s, "findings": [asdict(f) for f in findings]}, out, indent=1)
        out.write("\n")
    else:
        for f in findings:
            out.write(f.line() + "\n")
        against = f", checked against {source}" if source is not None else ""
        out.write(f"verify {s['path']}: {'OK' if s['ok'] else 'FAILED'} -- format {s['format']}, "
                  f"{s['quantized']} of {s['linears']} linears quantized{against}, {s['errors']} error(s), "
                  f"{s['warnings']} warning(s)\n")
    return 0 if s["ok"] else 1
