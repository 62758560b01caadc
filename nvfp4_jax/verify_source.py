"""``nvfp4-jax verify OUT --source SRC``: the output checked against the checkpoint it came from.

What the consumer-contract check (:mod:`nvfp4_jax.verify`) cannot see without the source:

* completeness: every source tensor is in the output, quantized or as it was (a tensor the report
  lists as dropped, with its reason, is accepted); the output holds nothing the source lacks;
* unquantized tensors equal their decoded source, value for value (plain tensors byte for byte);
* quantized weights decode from their source: every block scale is the source block's amax over
  6 * weight_scale_2 rounded to E4M3 (relative error at most half an E4M3 step), and every FP4 code
  is a nearest E2M1 value of ``w / (weight_scale * weight_scale_2)`` (ties and the clip at 6
  allowed), which a flipped bit in a packed weight or a scale breaks;
* no NaN or Inf in any floating-point tensor.

Reads one tensor at a time from each side, so memory stays at the largest tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from nvfp4_jax import numerics
from nvfp4_jax.checkpoint.reader import CheckpointReader
from nvfp4_jax.evaluate import NVFP4Checkpoint
from nvfp4_jax.verify import ERROR, Finding

_GRID = np.abs(numerics.E2M1_VALUES[:8].astype(np.float64))  # 0, .5, 1, 1.5, 2, 3, 4, 6
_E4M3_HALF_STEP = 2.0 ** -4  # relative, normal E4M3 numbers
_E4M3_MIN_NORMAL = 2.0 ** -6
_E4M3_SUBNORMAL_STEP = 2.0 ** -9
_SLACK = 1e-6  # float64 evaluation of decisions that are exact in float32 arithmetic


def _first_bad(mask: np.ndarray) -> str:
    idx = np.argwhere(mask)[0]
    return "[" + ", ".join(map(str, idx)) + "]"


def _non_finite(name: str, a: np.ndarray) -> Finding | None:
    if a.dtype.kind != "f" and a.dtype not in (np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)):
        return None
    bad = ~np.isfinite(a.astype(np.float32))
    if bad.any():
        return Finding(ERROR, name, f"{int(bad.sum())} NaN/Inf value(s), the first at {_first_bad(bad)}")
    return None


def _check_quantized(module: str, w: np.ndarray, t: numerics.NVFP4Tensor) -> list[Finding]:
    """The stored NVFP4 tensors of ``module`` against its source weight ``w`` (float64 [.., N, K])."""
    codes = np.asarray(numerics.unpack_fp4(t.weight)).astype(np.int64)
    scale = np.asarray(t.weight_scale).astype(np.float64)
    s2 = float(np.asarray(t.weight_scale_2, np.float32).reshape(-1)[0])
    if codes.shape != w.shape or scale.shape != w.shape[:-1] + (w.shape[-1] // numerics.BLOCK,):
        return [Finding(ERROR, module, f"stored shapes {list(codes.shape)}/{list(scale.shape)} do not fit the source "
                                       f"weight {list(w.shape)}")]
    found = []
    if not s2 > 0 or s2 * numerics.AMAX_DIVISOR < np.abs(w).max() * (1 - _SLACK):
        found.append(Finding(ERROR, f"{module}.weight_scale_2", f"{s2!r} is below the source weight's amax / 2688 "
                                                                  f"({np.abs(w).max() / numerics.AMAX_DIVISOR!r})"))
        return found
    blocks = w.reshape(w.shape[:-1] + (-1, numerics.BLOCK))
    block_amax = np.abs(blocks).max(-1)
    expect = block_amax / (6.0 * s2)
    normal = expect >= _E4M3_MIN_NORMAL
    scale_ok = np.where(normal, np.abs(scale - expect) <= expect * (_E4M3_HALF_STEP + _SLACK),
                        np.abs(scale - expect) <= _E4M3_SUBNORMAL_STEP / 2 + _E4M3_SUBNORMAL_STEP * _SLACK)
    scale_ok |= block_amax == 0
    if not scale_ok.all():
        found.append(Finding(ERROR, f"{module}.weight_scale", f"{int((~scale_ok).sum())} block scale(s) do not "
                                                              f"follow the source block amax, the first at "
                                                              f"{_first_bad(~scale_ok)}"))
    x = blocks / (scale[..., None] * s2)
    mag = np.minimum(np.abs(x), 6.0)
    dist = np.abs(mag[..., None] - _GRID)  # [..., 16, 8]
    stored = _GRID[codes.reshape(blocks.shape) & 7]
    nearest = np.abs(mag - stored) <= dist.min(-1) + _SLACK * np.maximum(1.0, mag)
    sign_ok = (stored == 0) | ((codes.reshape(blocks.shape) >= 8) == (x < 0))
    ok = (nearest & sign_ok).reshape(w.shape)
    if not ok.all():
        found.append(Finding(ERROR, f"{module}.weight", f"{int((~ok).sum())} FP4 value(s) are not the nearest E2M1 "
                                                        f"value of the source weight, the first at {_first_bad(~ok)}"))
    return found


def _dropped_in_report(out: Path) -> dict[str, str]:
    try:
        report = json.loads((out / "nvfp4_report.json").read_text())
    except (OSError, ValueError):
        return {}
    return dict(report.get("dropped_tensors") or {})


def _check_plain(name: str, src: CheckpointReader, got: np.ndarray) -> Finding | None:
    info = src.info(name)
    want = (np.asarray(src.read_raw(info.parts["weight"])) if info.encoding == "plain"
            else np.asarray(src.get(name)).astype(ml_dtypes.bfloat16))
    if want.dtype != got.dtype or want.shape != got.shape:
        return Finding(ERROR, name, f"{got.dtype} {list(got.shape)} in the output, {want.dtype} {list(want.shape)} "
                                    "expected from the source")
    differ = want.reshape(-1).view(np.uint8) != np.ascontiguousarray(got).reshape(-1).view(np.uint8)
    if differ.any():
        n = int(differ.reshape(want.shape + (-1,)).any(-1).sum()) if want.ndim else 1
        return Finding(ERROR, name, f"{n} value(s) differ from the source tensor")
    return None


def verify_against_source(out, src) -> list[Finding]:
    """Findings of the output ``out`` checked against its source ``src`` (empty: it matches)."""
    out, src_path = Path(out), Path(src)
    found: list[Finding] = []
    ckpt = NVFP4Checkpoint(out)
    reader = CheckpointReader(src_path)
    try:
        dropped = _dropped_in_report(out)
        src_names, out_names = set(reader.names()), set(ckpt.names())
        for n in sorted(src_names - out_names - set(dropped)):
            found.append(Finding(ERROR, n, f"source tensor missing from the output (not listed as dropped in "
                                           f"{out / 'nvfp4_report.json'})"))
        for n in sorted(out_names - src_names):
            found.append(Finding(ERROR, n, f"output tensor that the source {src_path} does not have"))
        quantized = set(ckpt.quantized)
        for n in sorted(src_names & out_names):
            mod = n[: -len(".weight")] if n.endswith(".weight") else None
            if mod in quantized:
                t, _ = ckpt.nvfp4(mod)
                for part, arr in (("weight_scale", np.asarray(t.weight_scale)),):
                    bad = _non_finite(f"{mod}.{part}", arr)
                    found += [bad] if bad else []
                found += _check_quantized(mod, np.asarray(reader.get(n)).astype(np.float64), t)
            else:
                got = np.asarray(ckpt.raw(n))
                bad = _non_finite(n, got) or _check_plain(n, reader, got)
                found += [bad] if bad else []
    finally:
        reader.close()
        ckpt.close()
    return found


__all__ = ["verify_against_source"]
