"""``nvfp4-jax eval SRC CKPT``: how much quality an NVFP4 checkpoint lost against its source.

Both models run on held-out text (a built-in paragraph, different from the calibration text, or
``--text FILE``), tokenized with the source's ``tokenizer.json``, layer by layer (one layer of each
model in memory at a time):

- source: the decoded source weights (bf16 by default), as the converter reads them;
- NVFP4: every quantized linear's weight is ``dequantize(weight, weight_scale, weight_scale_2)``
  and its input is fake-quantized as the serving engines quantize it: tensor scale = the
  checkpoint's ``input_scale`` (amax = input_scale * 2688), dynamic per-block E4M3 scales
  (``numerics.fake_quant``); routed experts with their own per-expert input scales. Unquantized
  tensors are taken from the NVFP4 checkpoint itself. The input quantization is the
  ``input_amax`` argument of ``family.layer_forward``.

Reported: per-token KL(source || NVFP4) over the vocabulary (mean, median, p99, max), top-1
agreement, perplexity of both on the text, MoE routing agreement, and per-module / per-layer
relative Frobenius error ``||dequant(W_q) - W|| / ||W||`` of every quantized weight. Written to
``OUT/eval_report.json`` and ``OUT/eval_plot.png`` (default OUT = CKPT/eval).

Reads ModelOpt NVFP4 checkpoints (ours or ModelOpt's) and compressed-tensors
``nvfp4-pack-quantized`` ones (``weight_packed``, ``weight_global_scale = 1/weight_scale_2``,
``input_global_scale = 1/input_scale``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import numerics
from nvfp4_jax.checkpoint import formats
from nvfp4_jax.checkpoint.safetensors_io import CheckpointError, FileCache, scan_checkpoint
from nvfp4_jax.errors import NVFP4Error

# Held-out text: none of it appears in examples.CALIBRATION_TEXT. Mixed prose, code, numbers and
# several scripts so byte-level and BPE tokenizers alike see varied tokens (about 2,300 bytes).
HELDOUT_TEXT = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the one hundred and
twelve steps out of habit, and trimmed the wick before the first ships rounded the northern cape.
Glaciers carve valleys slowly: a few centimetres a day, grinding bedrock into fine flour that turns
meltwater rivers a milky turquoise. Bread rises because yeast ferments sugars into carbon dioxide,
which the gluten network traps in small elastic pockets.
class Matrix:
    def __init__(self, rows, cols):
        self.data = [[0.0] * cols for _ in range(rows)]
    def transpose(self):
        return [list(r) for r in zip(*self.data)]
UPDATE accounts SET balance = balance - 250 WHERE id = 7 AND balance >= 250; COMMIT;
Le marché ouvre à sept heures et ferme à midi. Die Bibliothek bleibt am Sonntag geschlossen.
La biblioteca abre los sábados por la mañana. Il treno per Milano parte dal binario nove.
東京の空は今日も晴れています。 我们明天早上八点在火车站见面。 서울은 봄에 벚꽃이 아름답습니다.
Fibonacci: 1 1 2 3 5 8 13 21 34 55 89 144 233 377 610 987 1597 2584 4181 6765 10946.
A binary search halves the interval at each step, so a sorted list of a million items needs at
most twenty comparisons to find any key or to prove that the key is absent.
<html><body><h1>Orders</h1><ul><li>tea: 3</li><li>rice: 12</li></ul></body></html>
The orchestra tuned to the oboe's A, a sound that drifted over the empty seats like a question.
In the spring of 1761 astronomers across Europe watched Venus cross the face of the Sun, timing
the contacts to estimate the distance between the Earth and the Sun.
git rebase -i HEAD~3 && git push --force-with-lease origin feature/fp4-export
Volcanic soils are fertile because ash weathers quickly into clay minerals rich in potassium.
The committee postponed the vote until every member had read the revised budget, line by line.
x = [i * i for i in range(10) if i % 2 == 0]; print(sum(x), max(x), len(x))
Migrating birds navigate by the stars, the Earth's magnetic field and the polarization of light.
She folded the letter twice, sealed it with green wax, and left it on the desk by the window.
"""


class EvalError(NVFP4Error, ValueError):
    """The checkpoints cannot be evaluated (format, names or shapes); the message says why."""


# ---------------------------------------------------------------------------------------------
# the NVFP4 checkpoint


def input_amax_from_scale(scale) -> np.float32:
    """A float32 amax whose ``scale_from_amax`` is ``scale``: amax = scale * 2688, moved by a few
    ulps where the round trip through the division would not give ``scale`` back. Every scale a
    calibration writes (``amax / 2688``) is reached exactly; a hand-made scale that no float32 amax
    maps to gets the nearest one."""
    s = np.float32(scale)
    a0 = np.float32(np.float64(s) * numerics.AMAX_DIVISOR)
    cands = [a0]
    up = down = a0
    for _ in range(4):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        cands += [up, down]
    # float64 division rounded once to float32 == the correctly rounded float32 division
    back = [np.float32(np.float64(a) / numerics.AMAX_DIVISOR) for a in cands]
    return cands[int(np.argmin([abs(np.float64(b) - np.float64(s)) for b in back]))]


class NVFP4Checkpoint:
    """Read access to a ModelOpt NVFP4 (or compressed-tensors nvfp4-pack-quantized) checkpoint.

    ``names()`` are logical names as in the source: a quantized module appears as
    ``"<module>.weight"`` (dequantized on read); scale tensors are hidden.
    """

    def __init__(self, path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.exists():
            raise EvalError(f"{self.path}: no config.json (is this a checkpoint directory?)")
        self.config = json.loads(cfg_path.read_text())
        self._format = self._detect_format()
        self.format = self._format.name
        self.entries = self._scan()
        self._cache = FileCache()
        stored = self._format.stored_params
        suffix = stored["weight"]
        self.quantized: list[str] = sorted(
            n[: -len(".weight_scale")] for n in self.entries
            if n.endswith(".weight_scale") and f"{n[: -len('.weight_scale')]}.{suffix}" in self.entries
            and self.entries[n].dtype == "F8_E4M3")
        qset = set(self.quantized)
        hidden = set()
        for m in self.quantized:
            for p in (stored[q] for q in formats.QUANTIZED_PARAMS):
                if f"{m}.{p}" not in self.entries:
                    raise EvalError(f"{self.path}: quantized module {m} has no {p!r} tensor")
                hidden.add(f"{m}.{p}")
        self._plain = sorted(n for n in self.entries if n not in hidden)
        self._names = sorted(self._plain + [f"{m}.weight" for m in qset])

    def _detect_format(self) -> formats.OutputFormat:
        hf = self.path / "hf_quant_config.json"
        qc = self.config.get("quantization_config") or {}
        try:
            fmt = formats.detect_format(qc, json.loads(hf.read_text()) if hf.exists() else None)
        except formats.FormatError as e:
            raise EvalError(f"{self.path}: {e}") from None
        if fmt is None:
            raise EvalError(f"{self.path}: config.json has no NVFP4 quantization_config (quant_method "
                            f"{qc.get('quant_method')!r}); eval needs a ModelOpt NVFP4 or compressed-tensors "
                            "nvfp4-pack-quantized checkpoint as CKPT")
        return fmt

    def _scan(self):
        try:
            return scan_checkpoint(self.path).tensors
        except CheckpointError as err:
            raise EvalError(str(err)) from None

    def names(self) -> list[str]:
        return list(self._names)

    def raw(self, name: str) -> np.ndarray:
        try:
            return self._cache.read(self.entries[name])
        except KeyError:
            raise EvalError(f"{self.path}: no tensor {name!r}") from None

    def nvfp4(self, module: str) -> tuple[numerics.NVFP4Tensor, np.float32]:
        """(weight as NVFP4Tensor, input_scale) of a quantized module, in ModelOpt terms."""
        stored = self._format.stored_params
        w = self.raw(f"{module}.{stored['weight']}")
        s2 = self._format.tensor_scale(self.raw(f"{module}.{stored['weight_scale_2']}"))
        si = self._format.tensor_scale(self.raw(f"{module}.{stored['input_scale']}"))
        t = numerics.NVFP4Tensor(weight=jnp.asarray(np.asarray(w)),
                                 weight_scale=jnp.asarray(np.asarray(self.raw(f"{module}.weight_scale"))),
                                 weight_scale_2=jnp.asarray(s2, jnp.float32))
        return t, si

    def get(self, name: str, dtype=jnp.bfloat16) -> jax.Array:
        """A logical tensor: quantized weights dequantized (float32, then cast), others cast."""
        if name.endswith(".weight") and name[: -len(".weight")] in set(self.quantized):
            t, _ = self.nvfp4(name[: -len(".weight")])
            return _dequant_f32(t).astype(dtype)
        return jnp.asarray(np.asarray(self.raw(name))).astype(dtype)

    def layer_params(self, family, layer: int, dtype, fake_quant_inputs: bool = True):
        """(layer tensors as the model forward wants them, ``{module: input amax}`` of every
        quantized linear for ``layer_forward(input_amax=...)`` (empty without
        fake_quant_inputs), ``{module: dequantized weight float32}`` for the error statistics)."""
        names = family.layer_param_names(layer, self._names)
        qset = set(self.quantized)
        params, input_amax, deq = {}, {}, {}
        for n in names:
            mod = n[: -len(".weight")] if n.endswith(".weight") else None
            if mod in qset:
                t, si = self.nvfp4(mod)
                w32 = _dequant_f32(t)
                deq[mod] = w32
                params[n] = w32.astype(family.param_dtype(n, dtype))
                if fake_quant_inputs:
                    input_amax[mod] = jnp.asarray(input_amax_from_scale(si), jnp.float32)
            else:
                params[n] = self.get(n, family.param_dtype(n, dtype))
        return params, input_amax, deq

    def close(self):
        self._cache.close()


# ---------------------------------------------------------------------------------------------
# held-out tokens


def heldout_tokens(src: Path, text: Optional[str], num_samples: int, seq_len: int) -> np.ndarray:
    """int32 [B, S]: consecutive non-overlapping windows of the tokenized text (B <= num_samples;
    fewer when the text is short, S shortened when the text is shorter than one window)."""
    from nvfp4_jax.calib_data import load_tokenizer

    if num_samples < 1 or seq_len < 2:
        raise EvalError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    ids = load_tokenizer(src).encode(HELDOUT_TEXT if text is None else text)  # tokenizer.json or tiktoken
    if len(ids) < 2:
        raise EvalError("the held-out text gives fewer than 2 tokens")
    seq_len = min(seq_len, len(ids))
    n = max(1, min(num_samples, len(ids) // seq_len))
    return np.asarray([ids[i * seq_len:(i + 1) * seq_len] for i in range(n)], np.int32)


# ---------------------------------------------------------------------------------------------
# forward of both models


@jax.jit
def _err_norm(w_src, w_deq):
    a = w_src.astype(jnp.float32)
    d = w_deq.astype(jnp.float32) - a
    return jnp.stack([jnp.sum(d * d), jnp.sum(a * a)])


def _rel_err(w_src, w_deq) -> tuple[float, float]:
    """(||deq - w||^2, ||w||^2) in float32."""
    e2, n2 = np.asarray(_err_norm(w_src, w_deq), np.float64)
    return float(e2), float(n2)


_dequant_f32 = jax.jit(lambda t: numerics.dequantize(t, jnp.float32))  # one compile per shape


def forward_both(src, ckpt, tokens, *, dtype=jnp.bfloat16, fake_quant_inputs: bool = True,
                 with_source: bool = True) -> dict:
    """Run source and NVFP4 model on ``tokens`` [B, S].

    Returns {"logits_src", "logits_q" (float32 numpy [B, S, V]), "modules" {module: {"rel_error",
    "err2", "norm2", "layer"}}, "routing" {layer: agreement}, "family", "format"}.
    with_source=False skips the source forward (logits_src None, no routing agreement); the
    source weights are still read for the error statistics.
    """
    from nvfp4_jax.checkpoint.reader import CheckpointReader
    from nvfp4_jax.models import get_family

    reader = CheckpointReader(src)
    q = NVFP4Checkpoint(ckpt)
    try:
        family = get_family(reader.config)
        qfam = get_family(q.config)
        if qfam.name != family.name or qfam.num_layers() != family.num_layers():
            raise EvalError(f"{ckpt} ({qfam.name}, {qfam.num_layers()} layers) is not a conversion of "
                            f"{src} ({family.name}, {family.num_layers()} layers)")
        src_names, q_names = reader.names(), q.names()
        dtype = jnp.dtype(dtype)
        tokens = jnp.asarray(tokens, jnp.int32)
        h_s = None
        if with_source:
            h_s = family.embed(reader.get_many(family.embed_param_names(src_names), dtype), tokens, dtype=dtype)
        h_q = family.embed({n: q.get(n, dtype) for n in family.embed_param_names(q_names)}, tokens, dtype=dtype)
        modules, routing = {}, {}
        for layer in range(family.num_layers()):
            ps = family.read_layer(reader, layer, dtype=dtype)
            pq, in_amax, deq = q.layer_params(family, layer, dtype, fake_quant_inputs)
            for mod, w32 in deq.items():
                if f"{mod}.weight" not in ps:
                    raise EvalError(f"quantized module {mod} of {ckpt} has no weight in the source {src}")
                if tuple(ps[f"{mod}.weight"].shape) != tuple(w32.shape):
                    raise EvalError(f"{mod}: NVFP4 shape {tuple(w32.shape)} != source shape "
                                    f"{tuple(ps[mod + '.weight'].shape)}")
                err2, norm2 = _rel_err(ps[f"{mod}.weight"], w32)  # source values (bf16-exact)
                modules[mod] = {"layer": layer, "err2": err2, "norm2": norm2,
                                "rel_error": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0}
            moe = family.is_moe_layer(layer)
            if with_source:
                h_s, st_s = family.layer_forward(layer, ps, h_s, dtype=dtype)
            h_q, st_q = family.layer_forward(layer, pq, h_q, dtype=dtype, input_amax=in_amax)
            if moe and with_source:
                a = np.asarray(st_s.experts.topk_ids)
                b = np.asarray(st_q.experts.topk_ids)
                overlap = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist())])
                routing[layer] = {"same_topk_set": float(np.mean(np.all(a == b, axis=-1))),
                                  "expert_overlap": float(overlap)}
            del ps, pq, in_amax, deq
        logits_s = None
        if with_source:
            logits_s = np.asarray(family.head(reader.get_many(family.head_param_names(src_names), dtype), h_s),
                                  np.float32)
        logits_q = family.head({n: q.get(n, dtype) for n in family.head_param_names(q_names)}, h_q)
        return {"logits_src": logits_s, "logits_q": np.asarray(logits_q, np.float32),
                "modules": modules, "routing": routing, "family": family.name, "format": q.format,
                "num_layers": family.num_layers()}
    finally:
        q.close()
        reader.close()


# ---------------------------------------------------------------------------------------------
# metrics


@jax.jit
def _token_metrics(ls, lq, targets):
    lps = jax.nn.log_softmax(ls, axis=-1)
    lpq = jax.nn.log_softmax(lq, axis=-1)
    kl = jnp.sum(jnp.exp(lps) * (lps - lpq), axis=-1)  # [B, S]
    agree = jnp.argmax(ls, -1) == jnp.argmax(lq, -1)
    nll_s = -jnp.take_along_axis(lps[:, :-1], targets[..., None], axis=-1)[..., 0]
    nll_q = -jnp.take_along_axis(lpq[:, :-1], targets[..., None], axis=-1)[..., 0]
    return jnp.maximum(kl, 0.0), agree, nll_s, nll_q


def metrics(logits_src, logits_q, tokens) -> tuple[dict, np.ndarray]:
    """(summary dict, per-token KL float64 [B*S]) from the two models' logits."""
    tokens = np.asarray(tokens, np.int32)
    kl, agree, nll_s, nll_q = (np.asarray(v, np.float64) for v in _token_metrics(
        jnp.asarray(logits_src, jnp.float32), jnp.asarray(logits_q, jnp.float32), jnp.asarray(tokens[:, 1:])))
    kl = kl.reshape(-1)
    summary = {
        "tokens": int(kl.size),
        "kl": {"mean": float(kl.mean()), "median": float(np.median(kl)),
               "p99": float(np.percentile(kl, 99)), "max": float(kl.max())},
        "top1_agreement": float(agree.mean()),
        "perplexity": {"source": float(np.exp(nll_s.mean())), "nvfp4": float(np.exp(nll_q.mean()))},
        "nll": {"source": float(nll_s.mean()), "nvfp4": float(nll_q.mean())},
    }
    return summary, kl


def layer_errors(modules: dict, num_layers: int) -> list[dict]:
    """Per layer: aggregated relative Frobenius error sqrt(sum err^2 / sum ||W||^2) over its
    quantized modules, with mean/max over modules and the worst module."""
    out = []
    for layer in range(num_layers):
        ms = {m: v for m, v in modules.items() if v["layer"] == layer}
        if not ms:
            out.append({"layer": layer, "modules": 0, "rel_error": None})
            continue
        e2 = sum(v["err2"] for v in ms.values())
        n2 = sum(v["norm2"] for v in ms.values())
        errs = [v["rel_error"] for v in ms.values()]
        worst = max(ms, key=lambda m: ms[m]["rel_error"])
        out.append({"layer": layer, "modules": len(ms), "rel_error": math.sqrt(e2 / n2) if n2 > 0 else 0.0,
                    "mean_module_rel_error": float(np.mean(errs)), "max_module_rel_error": float(max(errs)),
                    "worst_module": worst})
    return out


def plot(report: dict, kl: np.ndarray, path: Path) -> None:
    """Two panels: weight error per layer (aggregate + every module) and the per-token KL histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    layers = report["layers"]
    xs = [row["layer"] for row in layers if row["rel_error"] is not None]
    ys = [row["rel_error"] for row in layers if row["rel_error"] is not None]
    mods = report["modules"]
    kinds = {"routed expert": lambda m: ".experts." in m, "attention": lambda m: ".self_attn." in m}
    rng = np.random.default_rng(0)
    for label, colour in (("attention", "tab:orange"), ("routed expert", "tab:green"), ("other MLP", "tab:purple")):
        if label == "other MLP":
            sel = [m for m in mods if not any(f(m) for f in kinds.values())]
        else:
            sel = [m for m in mods if kinds[label](m)]
        if sel:
            x = np.asarray([mods[m]["layer"] for m in sel], float) + rng.uniform(-0.25, 0.25, len(sel))
            ax1.scatter(x, [mods[m]["rel_error"] for m in sel], s=10, alpha=0.6, color=colour,
                        label=f"{label} modules ({len(sel)})")
    if xs:
        ax1.bar(xs, ys, width=0.7, color="tab:blue", alpha=0.35, label="layer aggregate")
    ax1.set_xlabel("decoder layer")
    ax1.set_ylabel("relative Frobenius error  ||W_q - W|| / ||W||")
    ax1.set_title("NVFP4 weight reconstruction error per layer")
    ax1.set_xticks(range(len(layers)) if len(layers) <= 32 else None)
    ax1.set_ylim(bottom=0)
    ax1.grid(axis="y", alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")

    floor = 1e-8
    k = np.maximum(kl, floor)
    lo, hi = np.log10(k.min()), np.log10(max(k.max(), floor * 10))
    ax2.hist(k, bins=np.logspace(lo, hi + 1e-9, 40), color="tab:blue", alpha=0.8)
    ax2.set_xscale("log")
    s = report["kl"]
    for name, colour in (("mean", "tab:red"), ("median", "tab:green"), ("p99", "tab:orange")):
        ax2.axvline(max(s[name], floor), color=colour, ls="--", label=f"{name} {s[name]:.3g}")
    ax2.set_xlabel("per-token KL(source || NVFP4)  [nats]")
    ax2.set_ylabel("tokens")
    ax2.set_title(f"KL over {report['tokens']} held-out tokens; top-1 agreement "
                  f"{report['top1_agreement']:.1%}\nperplexity {report['perplexity']['source']:.3g} (source) "
                  f"vs {report['perplexity']['nvfp4']:.3g} (NVFP4)", fontsize=10)
    ax2.legend(fontsize=8)
    fig.suptitle(f"nvfp4-jax eval: {Path(report['checkpoint']).name} ({report['family']}, {report['format']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# entry point


def evaluate(src, ckpt, *, num_samples: int = 8, seq_len: int = 64, text: Optional[str] = None,
             dtype=jnp.bfloat16) -> tuple[dict, np.ndarray]:
    """(report dict, per-token KL) without writing anything."""
    t0 = time.perf_counter()
    tokens = heldout_tokens(Path(src), text, num_samples, seq_len)
    res = forward_both(src, ckpt, tokens, dtype=dtype)
    summary, kl = metrics(res["logits_src"], res["logits_q"], tokens)
    report = {
        "source": str(src), "checkpoint": str(ckpt), "family": res["family"], "format": res["format"],
        "compute_dtype": jnp.dtype(dtype).name,
        "weight_scales": weight_scales_mode(ckpt),
        "text": "built-in held-out paragraph" if text is None else "user file",
        "samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
        **summary,
        "routing_agreement": {str(k): v for k, v in res["routing"].items()},
        "weight_error": _aggregate(res["modules"]),
        "layers": layer_errors(res["modules"], res["num_layers"]),
        "modules": {m: {"layer": v["layer"], "rel_error": v["rel_error"]} for m, v in sorted(res["modules"].items())},
        "time_s": round(time.perf_counter() - t0, 3),
    }
    return report, kl


def weight_scales_mode(ckpt) -> str:
    """The ``--weight-scales`` mode the conversion report of ``ckpt`` names ("unknown" for a
    checkpoint without an nvfp4-jax report, e.g. ModelOpt's)."""
    try:
        report = json.loads((Path(ckpt) / "nvfp4_report.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    ws = report.get("weight_scales") if isinstance(report, dict) else None
    return str(ws.get("mode", "unknown")) if isinstance(ws, dict) else "max" if ws is None else "unknown"


def _aggregate(modules: dict) -> dict:
    if not modules:
        return {"modules": 0}
    e2 = sum(v["err2"] for v in modules.values())
    n2 = sum(v["norm2"] for v in modules.values())
    errs = [v["rel_error"] for v in modules.values()]
    return {"modules": len(modules), "rel_error": math.sqrt(e2 / n2) if n2 > 0 else 0.0,
            "rel_squared_error": e2 / n2 if n2 > 0 else 0.0,
            "mean_module_rel_error": float(np.mean(errs)), "max_module_rel_error": float(max(errs))}


def print_table(report: dict, file=sys.stdout) -> None:
    k, p = report["kl"], report["perplexity"]
    w = report["weight_error"]
    lines = [
        f"nvfp4-jax eval  {report['checkpoint']}  vs  {report['source']}",
        f"  {report['family']} / {report['format']}, {report['samples']} x {report['seq_len']} held-out tokens, "
        f"{report['compute_dtype']}",
        f"  {'weight scales':<24}{report['weight_scales']} (W4A4: KL, top-1 and errors below are of this mode)",
        f"  {'KL(src||nvfp4) mean':<24}{k['mean']:.4g}   median {k['median']:.4g}   p99 {k['p99']:.4g}   "
        f"max {k['max']:.4g}",
        f"  {'top-1 agreement':<24}{report['top1_agreement']:.2%}",
        f"  {'perplexity':<24}source {p['source']:.4g}   nvfp4 {p['nvfp4']:.4g}   "
        f"({(p['nvfp4'] / p['source'] - 1) * 100:+.2f}%)",
    ]
    if w.get("modules"):
        lines.append(f"  {'weight rel. error':<24}{w['rel_error']:.4f} overall (squared {w['rel_squared_error']:.4g}), "
                     f"module max {w['max_module_rel_error']:.4f} ({w['modules']} quantized modules)")
    if report["routing_agreement"]:
        same = np.mean([v["same_topk_set"] for v in report["routing_agreement"].values()])
        lines.append(f"  {'MoE routing':<24}{same:.2%} of tokens keep the same top-k experts (mean over layers)")
    lines.append(f"  {'layer':>7} {'modules':>8} {'rel_error':>10} {'max module':>11}  worst module")
    for row in report["layers"]:
        if row["rel_error"] is None:
            lines.append(f"  {row['layer']:>7} {0:>8} {'-':>10} {'-':>11}")
        else:
            lines.append(f"  {row['layer']:>7} {row['modules']:>8} {row['rel_error']:>10.4f} "
                         f"{row['max_module_rel_error']:>11.4f}  {row['worst_module']}")
    print("\n".join(lines), file=file)


def run_eval(src: Path, ckpt: Path, out=None, num_samples: int = 8, seq_len: int = 64, text=None) -> int:
    """``nvfp4-jax eval``: writes OUT/eval_report.json and OUT/eval_plot.png, prints a table."""
    src, ckpt = Path(src), Path(ckpt)
    out = ckpt / "eval" if out is None else Path(out)
    text_str = None
    if text is not None:
        try:
            text_str = Path(text).read_text(encoding="utf-8")
        except OSError as e:
            raise EvalError(f"cannot read --text {text}: {e}") from None
    try:
        report, kl = evaluate(src, ckpt, num_samples=num_samples, seq_len=seq_len, text=text_str)
    except (EvalError, CheckpointError) as e:
        raise EvalError(str(e)) from None
    if text is not None:
        report["text"] = str(text)
    out.mkdir(parents=True, exist_ok=True)
    report["plot"] = str(out / "eval_plot.png")
    (out / "eval_report.json").write_text(json.dumps(report, indent=2))
    plot(report, kl, out / "eval_plot.png")
    print_table(report)
    print(f"  report: {out / 'eval_report.json'}\n  plot:   {out / 'eval_plot.png'}")
    return 0


__all__ = ["EvalError", "HELDOUT_TEXT", "NVFP4Checkpoint", "evaluate", "forward_both", "heldout_tokens",
           "input_amax_from_scale", "metrics", "run_eval", "weight_scales_mode"]
