"""Make tests/golden/modelopt_weight_scales/: ModelOpt 0.47's weight scales for its three presets
NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG, NVFP4_FOUR_OVER_SIX_CFG and NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG.

Needs a CUDA GPU (ModelOpt's static NVFP4 kernels are Triton), torch, transformers, nvidia-modelopt
0.47.0. Two subjects:

* ``bag``: four nn.Linear layers of random bf16 weights (seeded numpy draws, saved as inputs), each
  calibrated with its own random inputs (unequal column scales, correlated columns);
* ``tiny_llama``: tests/golden/tiny_llama/source with tests/golden/tiny_llama/calib_tokens.json
  (its q/k/v and gate/up groups share one weight global amax).

For each preset and quantized linear it writes what ModelOpt's HF export writes (weight,
weight_scale, weight_scale_2, input_scale, computed by modelopt.torch.export.quant_utils as
export_hf_checkpoint does) and the quantizer's global_amax; for local-hessian also the per-block
Hessian each weight was searched with. Usage: ``python3 scripts/modelopt_weight_scales_golden.py
--out DIR`` (writes DIR/bag.npz, DIR/tiny_llama.npz, DIR/VERSIONS.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "golden" / "tiny_llama"
PRESETS = {
    "mse": "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG",
    "four-over-six": "NVFP4_FOUR_OVER_SIX_CFG",
    "local-hessian": "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG",
}
# (name, N, K, kind)
BAG = [("gauss", 128, 512, "gauss"), ("heavy_tail", 64, 512, "student"), ("mixed", 32, 256, "mixed"),
       ("wide", 64, 1024, "colscale")]


def bag_weight(rng, n, k, kind) -> np.ndarray:
    if kind == "gauss":
        w = rng.standard_normal((n, k)) * 0.02
    elif kind == "student":
        w = rng.standard_t(3, (n, k)) * 0.01
    elif kind == "colscale":
        w = rng.standard_normal((n, k)) * rng.uniform(0.002, 0.05, k)
    else:  # zero blocks, tiny blocks, one outlier, values on a grid (ties)
        w = rng.standard_normal((n, k)) * 0.02
        w[0, :32] = 0.0
        w[1, :16] *= 1e-6
        w[2, 5] = 0.9
        w[3] = np.round(w[3] / 0.004) * 0.004
    return w.astype(np.float32)


def bag_inputs(rng, k, tokens=256) -> np.ndarray:
    mix = np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k)
    return (rng.standard_normal((tokens, k)) @ mix * rng.uniform(0.1, 3.0, k)).astype(np.float32)


class Bag(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.lin = torch.nn.ModuleDict()
        for name, w in weights.items():
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = torch.from_numpy(w).to(torch.bfloat16)
            self.lin[name] = lin


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)


def export_linear(module):
    from modelopt.torch.export import quant_utils as qu

    w = module.weight
    ws2 = qu.get_weight_scaling_factor_2(module)
    ws = qu.get_weight_scaling_factor(module)
    packed = qu.to_quantized_weight(w, ws, qu.get_quantization_format(module), ws2, 16)
    return {"weight": packed.cpu().numpy().view(np.uint8),
            "weight_scale": ws.cpu().view(torch.uint8).numpy(),
            "weight_scale_2": ws2.float().cpu().numpy(),
            "input_scale": qu.get_activation_scaling_factor(module).float().cpu().numpy(),
            "global_amax": module.weight_quantizer.global_amax.float().cpu().numpy()}


def quantize(model, preset, forward_loop):
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, PRESETS[preset]))
    if preset == "local-hessian":
        cfg["algorithm"]["debug"] = True  # keep the Hessians (model._local_hessian_accumulators)
    return mtq.quantize(model, cfg, forward_loop)


def collect(model, preset, prefix_names, out):
    names = {}
    for name, m in model.named_modules():
        q = getattr(m, "weight_quantizer", None)
        if q is None or not getattr(q, "is_enabled", False) or getattr(q, "global_amax", None) is None:
            continue
        names[id(q)] = name
        for key, v in export_linear(m).items():
            out[f"{preset}/{name}/{key}"] = v
    if preset == "local-hessian":
        for qid, acc in model._local_hessian_accumulators.items():
            h = acc.normalized_hessian()
            if h is not None and qid in names:
                out[f"hessian/{names[qid]}"] = h.float().cpu().numpy()
    prefix_names.update(names.values())


def run_bag(out_dir: Path, log):
    rng = np.random.default_rng(20261202)
    weights = {name: bag_weight(rng, n, k, kind) for name, n, k, kind in BAG}
    inputs = {name: bag_inputs(rng, w.shape[1]) for name, w in weights.items()}
    out, seen = {}, set()
    for name, w in weights.items():
        out[f"input/lin.{name}"] = bf16_bits(torch.from_numpy(w))
    for preset in PRESETS:
        model = Bag(weights).cuda()

        def loop(m):
            for name, x in inputs.items():
                m.lin[name](torch.from_numpy(x).to(torch.bfloat16).cuda())

        model = quantize(model, preset, loop)
        collect(model, preset, seen, out)
        log(f"bag {preset}: {len(seen)} linears")
    np.savez_compressed(out_dir / "bag.npz", **out)


def run_tiny_llama(out_dir: Path, log):
    from transformers import AutoModelForCausalLM

    tokens = json.loads((TINY / "calib_tokens.json").read_text())
    tokens = tokens["input_ids"] if isinstance(tokens, dict) else tokens
    out, seen, export_check = {}, set(), {}
    for preset in PRESETS:
        model = AutoModelForCausalLM.from_pretrained(TINY / "source", dtype=torch.bfloat16).cuda().eval()

        def loop(m):
            with torch.no_grad():
                for seq in tokens:
                    m(torch.tensor([seq]).cuda())

        model = quantize(model, preset, loop)
        collect(model, preset, seen, out)
        export_check[preset] = check_hf_export(model, out, preset)
        log(f"tiny_llama {preset}: {len(seen)} linears, export_hf_checkpoint check: {export_check[preset]}")
    np.savez_compressed(out_dir / "tiny_llama.npz", **out)
    return export_check


def check_hf_export(model, out, preset):
    """export_hf_checkpoint's tensors against the ones collected (the same functions, so equal)."""
    try:
        from modelopt.torch.export import export_hf_checkpoint
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory() as d:
            export_hf_checkpoint(model, export_dir=d)
            tensors = {}
            for f in Path(d).glob("*.safetensors"):
                tensors.update(load_file(str(f)))
        bad = 0
        for key in [k for k in out if k.startswith(preset + "/")]:
            _, name, field = key.split("/")
            if field == "global_amax":
                continue
            t = tensors[f"{name}.{field}"]
            t = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
            bad += int(not np.array_equal(t.float().numpy() if t.dtype != torch.uint8 else t.numpy(), out[key]))
        return f"{bad} tensors differ"
    except Exception as e:  # the export is a cross-check only; the collected tensors are the golden
        return f"not run: {type(e).__name__}: {e}"[:300]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import modelopt
    import transformers
    import triton

    log = lambda m: print(m, flush=True)  # noqa: E731
    run_bag(out_dir, log)
    export_check = run_tiny_llama(out_dir, log)
    versions = {"modelopt": modelopt.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "triton": triton.__version__,
                "gpu": torch.cuda.get_device_name(0), "presets": PRESETS, "export_hf_checkpoint_check": export_check}
    (out_dir / "VERSIONS.json").write_text(json.dumps(versions, indent=1) + "\n")
    log(json.dumps(versions, indent=1))


if __name__ == "__main__":
    main()
