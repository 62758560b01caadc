"""``nvfp4-jax``: convert | verify | eval | bench | example."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load_calibration(args, src: Path) -> list[list[int]] | None:
    if args.calib_tokens:
        try:
            d = json.loads(Path(args.calib_tokens).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.calib_tokens}: not valid JSON ({e.msg} at line {e.lineno})") from None
        ids = d.get("input_ids") if isinstance(d, dict) else None
        if not isinstance(ids, list) or not all(isinstance(s, list) for s in ids):
            raise ValueError(f"{args.calib_tokens}: expected a JSON object whose 'input_ids' is a "
                             "list of token-id lists")
        return ids
    if args.calib:
        from tokenizers import Tokenizer

        tok_path = src / "tokenizer.json"
        if not tok_path.exists():
            raise ValueError(f"--calib needs the source's tokenizer.json, not found in {src}; "
                             "pass --calib-tokens instead")
        tok = Tokenizer.from_file(str(tok_path))
        path = Path(args.calib)
        seq_len = args.seq_len or 512
        if path.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise ValueError(f"{path}:{i}: a .jsonl record needs a 'text' string field")
                    texts.append(rec["text"])
            return [tok.encode(t).ids[:seq_len] for t in texts]
        ids = tok.encode(path.read_text()).ids
        return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    return None


def _print_report(report: dict) -> None:
    rows = [
        ("model", f"{report['family']} ({report['model_type']}), {report['layers']} layers, preset {report['preset']}"),
        ("linears quantized", f"{report['linears_quantized']} of {report['linears_total']} "
                              f"({report['linears_excluded']} excluded)"),
        ("calibration", json.dumps(report["calibration"])),
        ("K % 16 != 0 (bf16)", ", ".join(report["excluded_k_not_multiple_of_16"]) or "none"),
        ("zero weight amax", ", ".join(report["zero_weight_amax_modules"]) or "none"),
    ]
    for layer, cov in report.get("moe_coverage", {}).items():
        rows.append((f"{layer} experts w/o tokens",
                     f"{cov['experts_without_tokens']} of {cov['num_experts']}  histogram {cov['histogram']}"))
    rows += [("time (s)", ", ".join(f"{k} {v}" for k, v in report["time_s"].items())),
             ("peak RSS", f"{report['peak_rss_mb']:.0f} MB"),
             ("output", report["output"])]
    width = max(len(r[0]) for r in rows)
    print("\nnvfp4-jax conversion report")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def cmd_convert(args) -> int:
    from nvfp4_jax.pipeline import ConvertOptions, convert

    src = Path(args.src)
    opts = ConvertOptions(
        calib_tokens=_load_calibration(args, src), num_samples=args.num_samples, seq_len=args.seq_len,
        batch_size=args.batch_size, preset=args.preset, moe_policy=args.moe_policy,
        input_scale_constant=args.input_scale_constant, fmt=args.format, shard_size=args.shard_size,
        resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if args.coordinator or args.num_processes > 1:
        from nvfp4_jax.distributed import convert_distributed

        report = convert_distributed(src, Path(args.out), opts, coordinator=args.coordinator,
                                     num_processes=args.num_processes, process_id=args.process_id,
                                     timeout_s=args.timeout)
    else:
        report = convert(src, Path(args.out), opts)
    if report:
        _print_report(report)
    return 0


def cmd_verify(args) -> int:
    from nvfp4_jax.verify import run_verify

    return run_verify(args.ckpt, as_json=args.json)


def cmd_example(args) -> int:
    import tempfile

    from nvfp4_jax import examples
    from nvfp4_jax.pipeline import ConvertOptions, convert
    from nvfp4_jax.verify import run_verify

    out = Path(args.out or f"out/{args.name}-nvfp4")
    src = Path(args.source) if args.source else Path(tempfile.mkdtemp(prefix="nvfp4-src-")) / args.name
    if args.name == "kimi-k2-shaped":
        examples.build_kimi_k2_shaped(src, layers=args.layers, experts=args.experts, seed=args.seed)
    else:
        examples.EXAMPLES[args.name](src, seed=args.seed)
    print(f"built {args.name} (seed {args.seed}) at {src}", file=sys.stderr)
    tokens = examples.calibration_samples(src / "tokenizer.json", num_samples=args.num_samples,
                                          seq_len=args.seq_len)
    report = convert(src, out, ConvertOptions(calib_tokens=tokens, overwrite=True, fmt=args.format,
                                              batch_size=args.batch_size))
    _print_report(report)
    print(f"\nverifying {out}")
    return run_verify(out)


def cmd_bench(args) -> int:
    from nvfp4_jax import bench

    if args.what == "quantize" and args.weight_scales:
        bench.bench_weight_scales(args.weight_scales, repeats=args.repeats, shapes=args.shape)
    elif args.what == "quantize":
        bench.bench_quantize(repeats=args.repeats, torch_ref=not args.no_torch, shapes=args.shape)
    else:
        bench.bench_convert(layers=args.layers, experts=args.experts, workdir=args.workdir)
    return 0


def cmd_eval(args) -> int:
    from nvfp4_jax.evaluate import run_eval

    return run_eval(Path(args.src), Path(args.ckpt), out=args.out, num_samples=args.num_samples,
                    seq_len=args.seq_len, text=args.text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nvfp4-jax", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="convert an HF checkpoint to ModelOpt NVFP4")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--calib", help="calibration text (.txt, or .jsonl with a 'text' field per line)")
    c.add_argument("--calib-tokens", help='JSON {"input_ids": [[...], ...]}, one sample per list')
    c.add_argument("--num-samples", type=int)
    c.add_argument("--seq-len", type=int)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--preset", choices=["all", "mlp_only", "experts_only"],
                   help="which linears to quantize (default: mlp_only for DeepSeek-V3/Kimi, all otherwise)")
    c.add_argument("--moe-policy", choices=["layer-max", "per-expert"], default="layer-max")
    c.add_argument("--input-scale-constant", type=float,
                   help="calibration-free: every input_scale = this value (NVIDIA ships 1.0)")
    c.add_argument("--format", choices=["modelopt", "compressed-tensors"], default="modelopt")
    c.add_argument("--shard-size", type=float, default=5e9, help="max bytes per shard (default 5e9)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT.partial")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-host, jax.distributed)")
    c.add_argument("--num-processes", type=int, default=1)
    c.add_argument("--process-id", type=int, default=0)
    c.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for other processes")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="check a checkpoint against what vLLM and SGLang require")
    v.add_argument("ckpt")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("eval", help="quality of an NVFP4 checkpoint against its source")
    e.add_argument("src")
    e.add_argument("ckpt")
    e.add_argument("--out", help="directory for report JSON and plot (default CKPT/eval)")
    e.add_argument("--text", help="held-out text file (default: built-in text)")
    e.add_argument("--num-samples", type=int, default=8)
    e.add_argument("--seq-len", type=int, default=64)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="benchmarks (see BENCHMARKS.md)")
    b.add_argument("what", choices=["quantize", "convert"])
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--no-torch", action="store_true", help="skip the torch_bridge baseline")
    b.add_argument("--shape", action="append", help="NxK, repeatable (default: Kimi-K2 shapes)")
    b.add_argument("--weight-scales", choices=["mse", "four-over-six", "local-hessian"], default=None,
                   help="time this weight-scale mode against max on the same tensors (ExN xK shapes too)")
    b.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    b.add_argument("--experts", type=int, default=8)
    b.add_argument("--workdir", default=None)
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser("example", help="build a built-in example model, convert and verify it")
    x.add_argument("name", choices=["kimi-k2-tiny", "llama-tiny", "kimi-k2-shaped"])
    x.add_argument("out", nargs="?")
    x.add_argument("--source", help="where to build the source checkpoint (default: a temp dir)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--num-samples", type=int, default=16)
    x.add_argument("--seq-len", type=int, default=64)
    x.add_argument("--batch-size", type=int, default=8)
    x.add_argument("--format", choices=["modelopt", "compressed-tensors"], default="modelopt")
    x.add_argument("--layers", type=int, default=2, help="kimi-k2-shaped only")
    x.add_argument("--experts", type=int, default=8, help="kimi-k2-shaped only")
    x.set_defaults(func=cmd_example)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        if "NVFP4_DEBUG" in __import__("os").environ:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
