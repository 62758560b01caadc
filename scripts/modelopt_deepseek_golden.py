"""Make tests/golden/tiny_deepseek_v3/: ModelOpt's NVFP4 input_scale / weight_scale_2 for a tiny
DeepSeek-V3 calibrated in bf16 on CPU.

The subject is tests/model_fixtures.make_deepseek_v3 (seeded: 3 layers, layer 0 dense, layers 1-2
MoE with 8 routed experts and a shared expert, MLA with q_lora, yarn rope), saved by transformers.
It is not stored here: the test regenerates it from the fixture and checks its tensor digest
(model_fixtures.tensor_digest) against the one recorded, so a changed fixture fails loudly.

For each calibration case (seeded token sequences, stored in the golden) the script loads the
source in bf16 with transformers (default attention: sdpa; experts_implementation eager, the one
ModelOpt intercepts), runs ``mtq.quantize(model, NVFP4_DEFAULT_CFG, forward)`` (max calibration,
one forward per sequence, on CPU), exports with ``modelopt.torch.export.export_hf_checkpoint`` and
keeps, from the exported safetensors, every ``*.input_scale`` and ``*.weight_scale_2`` as float32
values (JSON floats that round-trip exactly), plus the routed experts each sequence reached (from a
hook on the router), so experts without tokens can be told apart.

Run it in a scratch venv with the pinned versions (CPU is enough; ModelOpt's max calibration is
plain torch there):

    python3.11 -m venv /tmp/mo-venv
    /tmp/mo-venv/bin/pip install torch==2.13.0 transformers==5.24.0 nvidia-modelopt==0.47.0 safetensors requests
    /tmp/mo-venv/bin/python scripts/modelopt_deepseek_golden.py --out tests/golden/tiny_deepseek_v3

Writes OUT/golden.json (versions, source digest, cases: tokens, scales, routed-expert coverage).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.model_fixtures import VOCAB, make_deepseek_v3, tensor_digest  # noqa: E402

# case name -> (number of sequences, tokens per sequence, token seed). "main" covers every routed
# expert; "few" (3 tokens, as in issue 10's report) leaves some experts without tokens.
CASES = {"main": (4, 16, 1234), "few": (1, 3, 99)}


def case_tokens(n_seq: int, seq_len: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, size=(n_seq, seq_len)).tolist()


def _record_routing(model, seen: dict):
    """Hook every MoE router; seen[layer] collects the expert ids it chose."""
    hooks = []
    for idx, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "e_score_correction_bias"):
            continue

        def hook(_mod, _inp, out, idx=idx):
            topk_indices = out[2] if isinstance(out, tuple) and len(out) == 3 else out[0]
            seen.setdefault(idx, set()).update(int(i) for i in topk_indices.reshape(-1).tolist())

        hooks.append(gate.register_forward_hook(hook))
    return hooks


def calibrate_and_export(source: Path, tokens: list[list[int]], export_dir: Path) -> dict:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    seen: dict[int, set] = {}
    hooks = _record_routing(model, seen)

    def forward(m):
        with torch.no_grad():
            for seq in tokens:
                m(torch.tensor([seq], dtype=torch.long))

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        export_hf_checkpoint(model, export_dir=export_dir)
    tensors = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    scales = {k: float(v.float().item()) for k, v in sorted(tensors.items())
              if k.endswith(".input_scale") or k.endswith(".weight_scale_2")}
    num_experts = int(model.config.n_routed_experts)
    coverage = {f"model.layers.{idx}.mlp.experts": sorted(set(range(num_experts)) - ids)
                for idx, ids in sorted(seen.items())}
    return {"scales": scales, "experts_without_tokens": coverage,
            "exported_tensor_names": sorted(tensors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "golden" / "tiny_deepseek_v3")
    args = ap.parse_args()
    import modelopt
    import transformers

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        source = make_deepseek_v3(Path(tmp) / "source")
        golden = {
            "versions": {"modelopt": modelopt.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "source": {"fixture": "tests.model_fixtures.make_deepseek_v3 (defaults)",
                       "tensor_digest": tensor_digest(source)},
            "recipe": "mtq.quantize(NVFP4_DEFAULT_CFG, max calibration), bf16, CPU, attn sdpa, "
                      "one forward per sequence; export_hf_checkpoint",
            "cases": {},
        }
        for name, (n_seq, seq_len, seed) in CASES.items():
            tokens = case_tokens(n_seq, seq_len, seed)
            result = calibrate_and_export(source, tokens, Path(tmp) / f"export_{name}")
            golden["cases"][name] = {"tokens": tokens, **result}
            n_in = sum(k.endswith(".input_scale") for k in result["scales"])
            print(f"{name}: {n_in} input_scale, experts without tokens {result['experts_without_tokens']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "golden.json").write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out / 'golden.json'}")


if __name__ == "__main__":
    main()
