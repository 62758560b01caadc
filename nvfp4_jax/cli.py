"""``nvfp4-jax``: convert | verify | eval | bench | example."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nvfp4_jax import __version__
from nvfp4_jax.errors import NVFP4Error, UsageError


def _load_calibration(args, src: Path) -> list[list[int]] | None:
    from nvfp4_jax.calib_data import CalibrationRequest, load_calibration

    return load_calibration(src, CalibrationRequest(
        text_file=args.calib, token_file=args.calib_tokens, input_scale_constant=args.input_scale_constant,
        num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size))


def _weight_scales_line(ws: dict) -> str:
    line = f"{ws['mode']}, weight relative squared error {ws['relative_squared_error']:.4g}"
    if "mse_fallback_linears" in ws:
        line += f", {ws['mse_fallback_linears']} linear(s) without input statistics searched as mse"
    return line


def _print_report(report: dict) -> None:
    rows = [
        ("model", f"{report['family']} ({report['model_type']}), {report['layers']} layers, preset {report['preset']}"),
        ("linears quantized", f"{report['linears_quantized']} of {report['linears_total']} "
                              f"({report['linears_excluded']} excluded)"),
        ("calibration", json.dumps(report["calibration"])),
        ("weight scales", _weight_scales_line(report["weight_scales"])),
        ("K % 16 != 0 (bf16)", ", ".join(report["excluded_k_not_multiple_of_16"]) or "none"),
        ("zero weight amax", ", ".join(report["zero_weight_amax_modules"]) or "none"),
    ]
    for layer, cov in report.get("moe_coverage", {}).items():
        rows.append((f"{layer} experts w/o tokens",
                     f"{cov['experts_without_tokens']} of {cov['num_experts']}  histogram {cov['histogram']}"))
    if report.get("compile_cache"):
        cc = report["compile_cache"]
        rows.append(("compile cache", f"{cc['hits']} hits, {cc['misses']} misses in {cc['dir']}"))
    rows += [("time (s)", ", ".join(f"{k} {v}" for k, v in report["time_s"].items())),
             ("peak RSS", f"{report['peak_rss_mb']:.0f} MB"),
             ("output", report["output"])]
    width = max(len(r[0]) for r in rows)
    print("\nnvfp4-jax conversion report")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def cmd_convert(args) -> int:
    from nvfp4_jax import compile_cache
    from nvfp4_jax.pipeline import ConvertOptions, convert

    compile_cache.enable(args.compile_cache or compile_cache.default_dir())  # before the first compilation
    src = Path(args.src)
    opts = ConvertOptions(
        calib_tokens=_load_calibration(args, src), num_samples=args.num_samples, seq_len=args.seq_len,
        batch_size=args.batch_size, preset=args.preset, moe_policy=args.moe_policy,
        input_scale_constant=args.input_scale_constant, fmt=args.format, shard_size=args.shard_size,
        resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, weight_scales=args.weight_scales,
        overlap=not args.no_overlap,
        expert_parallel=args.expert_parallel,
        inputs=tuple(Path(p) for p in (args.calib, args.calib_tokens) if p))
    if args.coordinator or args.num_processes > 1:
        from nvfp4_jax.distributed import Processes, convert_distributed

        report = convert_distributed(src, Path(args.out), opts,
                                     Processes(args.coordinator, args.num_processes, args.process_id, args.timeout))
    else:
        report = convert(src, Path(args.out), opts)
    if report:
        _print_report(report)
    return 0


def cmd_verify(args) -> int:
    from nvfp4_jax.verify import run_verify

    return run_verify(args.ckpt, as_json=args.json, check_values=not args.no_values, source=args.source)


def cmd_example(args) -> int:
    import tempfile

    from nvfp4_jax import examples
    from nvfp4_jax.pipeline import ConvertOptions, convert
    from nvfp4_jax.verify import run_verify

    out = Path(args.out or f"out/{args.name}-nvfp4")
    src = Path(args.source) if args.source else Path(tempfile.mkdtemp(prefix="nvfp4-src-")) / args.name
    if src.exists() and (not src.is_dir() or any(src.iterdir())):
        raise UsageError(f"--source {src} already exists; example builds a new checkpoint there and never "
                         "overwrites one it did not create: choose a new path")
    if args.name == "kimi-k2-shaped":
        examples.build_kimi_k2_shaped(src, layers=args.layers, experts=args.experts, seed=args.seed)
    else:
        examples.EXAMPLES[args.name](src, seed=args.seed)
    print(f"built {args.name} (seed {args.seed}) at {src}", file=sys.stderr)
    tokens = examples.example_calibration(args.name, src, args.num_samples, args.seq_len)
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
        bench.bench_convert(layers=args.layers, experts=args.experts, calib=(args.calib_samples, args.calib_seq_len),
                            workdir=args.workdir, keep=args.keep, compile_cache=args.compile_cache)
    return 0


def cmd_eval(args) -> int:
    from nvfp4_jax.evaluate import run_eval

    return run_eval(Path(args.src), Path(args.ckpt), out=args.out, num_samples=args.num_samples,
                    seq_len=args.seq_len, text=args.text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: argparse's ``(default: X)``, ``off`` for a flag,
    or the help's own wording where the default is a rule rather than a value."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text:
            return text
        if action.nargs == 0 and action.default is False:  # store_true flags
            return f"{text} (default: off)"
        return super()._get_help_string(action)


def _subcommand(sub, name: str, summary: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nvfp4-jax", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = _subcommand(sub, "convert", "convert an HF checkpoint to ModelOpt NVFP4")
    c.add_argument("src", help="source checkpoint directory (config.json, *.safetensors)")
    c.add_argument("out", help="output directory (built in OUT.partial, renamed when complete)")
    c.add_argument("--calib", help="calibration text: .txt, or .jsonl with a 'text' field per line, "
                                   "tokenized with SRC/tokenizer.json (default: none)")
    c.add_argument("--calib-tokens", help='calibration token ids, JSON {"input_ids": [[...], ...]}, '
                                          "one sample per list (default: none)")
    c.add_argument("--num-samples", type=int,
                   help="use only the first N calibration samples (default: all)")
    c.add_argument("--seq-len", type=int,
                   help="tokens per calibration sample: the window length for a --calib .txt, the "
                        "truncation otherwise (default: 512 for --calib, no truncation for --calib-tokens)")
    c.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass")
    c.add_argument("--preset", choices=["all", "mlp_only", "experts_only"],
                   help="which linears to quantize (default: mlp_only for DeepSeek-V3/Kimi, all otherwise)")
    c.add_argument("--moe-policy", choices=["layer-max", "per-expert"], default="layer-max",
                   help="input amax of routed experts: the layer's max for every expert, or each "
                        "expert's own (the layer's max for experts without tokens)")
    c.add_argument("--weight-scales", choices=["max", "mse", "four-over-six", "local-hessian"], default="max",
                   help="block scales of the weights: max, or searched per block (mse: E4M3 sweep; "
                        "four-over-six; local-hessian: error weighted by the inputs' second moments, "
                        "needs calibration), docs/SPEC.md section 10")
    c.add_argument("--expert-parallel", choices=["auto", "processes", "off"], default="auto",
                   help="auto: with several local devices, the routed experts of each MoE layer are split "
                        "over them for the calibration forward and quantization (each device holds E/D "
                        "experts plus the shared part; same output bytes); processes: over the devices of "
                        "every process of a multi-process run, each process reading only its experts "
                        "(experimental: not with JAX's persistent compilation cache); off: every device "
                        "holds the whole layer (default: auto)")
    c.add_argument("--input-scale-constant", type=float,
                   help="calibration-free: every input_scale = this value, NVIDIA ships 1.0 "
                        "(default: none, calibrate)")
    c.add_argument("--format", choices=["modelopt", "compressed-tensors"], default="modelopt",
                   help="output checkpoint format")
    c.add_argument("--shard-size", type=float, default=5e9, help="max bytes per shard (default: 5e9)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT.partial")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    c.add_argument("--quiet", action="store_true", help="no progress display")
    c.add_argument("--no-overlap", action="store_true",
                   help="run read, calibrate/quantize and write one after the other instead of reading the next "
                        "layer and writing the previous one meanwhile (at most 3 layers on the host)")
    c.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="JAX persistent compilation cache, reused by later runs; 'off' for none (default: "
                        "$NVFP4_JAX_COMPILE_CACHE, else $XDG_CACHE_HOME/nvfp4-jax/jax-compile, XDG_CACHE_HOME "
                        "defaulting to ~/.cache)")
    c.add_argument("--coordinator", help="HOST:PORT of process 0 of a multi-process run, "
                                         "jax.distributed (default: none, one process)")
    c.add_argument("--num-processes", type=int, default=1, help="processes in the run")
    c.add_argument("--process-id", type=int, default=0, help="index of this process, 0..N-1")
    c.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for other processes")
    c.set_defaults(func=cmd_convert)

    v = _subcommand(sub, "verify", "check a checkpoint against what vLLM and SGLang require")
    v.add_argument("ckpt", help="converted checkpoint directory")
    v.add_argument("--json", action="store_true", help="print the findings as JSON")
    v.add_argument("--source", help="also check the output against this source checkpoint: every tensor present, "
                                    "unquantized ones equal, quantized ones decoding from it (reads both in full)")
    v.add_argument("--no-values", action="store_true",
                   help="headers and tensor scales only: skip the block-scale scan, the NaN/Inf scan and checksums")
    v.set_defaults(func=cmd_verify)

    e = _subcommand(sub, "eval", "quality of an NVFP4 checkpoint against its source")
    e.add_argument("src", help="source (unquantized) checkpoint directory")
    e.add_argument("ckpt", help="its NVFP4 checkpoint directory")
    e.add_argument("--out", help="directory for report JSON and plot (default: CKPT/eval)")
    e.add_argument("--text", help="held-out text file (default: a built-in text)")
    e.add_argument("--num-samples", type=int, default=8, help="held-out samples")
    e.add_argument("--seq-len", type=int, default=64, help="tokens per held-out sample")
    e.set_defaults(func=cmd_eval)

    b = _subcommand(sub, "bench", "benchmarks (see BENCHMARKS.md)")
    b.add_argument("what", choices=["quantize", "convert"],
                   help="quantize: one weight at a time; convert: whole kimi-k2-shaped checkpoints")
    b.add_argument("--repeats", type=int, default=3, help="quantize: timed runs per shape (best kept)")
    b.add_argument("--no-torch", action="store_true", help="quantize: skip the torch_bridge baseline")
    b.add_argument("--shape", action="append", help="quantize: NxK, repeatable (default: Kimi-K2 shapes)")
    b.add_argument("--weight-scales", choices=["mse", "four-over-six", "local-hessian"], default=None,
                   help="quantize: time this weight-scale mode against max on the same tensors")
    b.add_argument("--layers", type=int, nargs="+", default=[1, 2],
                   help="convert: decoder layers of each checkpoint (layer 0 dense, the rest MoE); "
                        "several give the marginal cost of a MoE layer")
    b.add_argument("--experts", type=int, default=384, help="convert: routed experts per MoE layer")
    b.add_argument("--calib-samples", type=int, default=8, help="convert: calibration samples")
    b.add_argument("--calib-seq-len", type=int, default=64, help="convert: tokens per calibration sample")
    b.add_argument("--workdir", default=None,
                   help="convert: where sources and outputs go (default: a new temp dir)")
    b.add_argument("--compile-cache", metavar="DIR", default="off",
                   help="convert: JAX persistent compilation cache of the conversions; with a DIR an untimed "
                        "conversion of the largest checkpoint fills it first, so every timed run is warm "
                        "(default: off, every run compiles from scratch, i.e. cold)")
    b.add_argument("--keep", action="store_true",
                   help="convert: keep sources and outputs in the workdir (a kept source is reused)")
    b.set_defaults(func=cmd_bench)

    x = _subcommand(sub, "example", "build a built-in example model, convert and verify it")
    x.add_argument("name", choices=["kimi-k2-tiny", "kimi-k2.5-tiny", "llama-tiny", "kimi-k2-shaped"], help="example model")
    x.add_argument("out", nargs="?", help="output directory (default: out/NAME-nvfp4)")
    x.add_argument("--source", help="where to build the source checkpoint (default: a temp dir)")
    x.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    x.add_argument("--num-samples", type=int, help="calibration samples (default: the example's own, kimi-k2-tiny 1)")
    x.add_argument("--seq-len", type=int, help="tokens per calibration sample (default: the example's own, kimi-k2-tiny 8)")
    x.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass")
    x.add_argument("--format", choices=["modelopt", "compressed-tensors"], default="modelopt",
                   help="output checkpoint format")
    x.add_argument("--layers", type=int, default=2, help="kimi-k2-shaped only: decoder layers (layer 0 dense)")
    x.add_argument("--experts", type=int, default=8, help="kimi-k2-shaped only: routed experts per layer")
    x.set_defaults(func=cmd_example)
    return p


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (some list several problems, one per line)."""
    return "; ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def main(argv=None) -> int:
    """Run one subcommand. An :class:`NVFP4Error` (a reported problem with the input or the run)
    or an ``OSError`` (a file problem) becomes one ``error:`` line and exit code 2; anything else
    is a bug and keeps its traceback (as do these two with NVFP4_DEBUG set)."""
    from nvfp4_jax.interrupts import Interrupted, signals_raise

    args = build_parser().parse_args(argv)
    # JAX's GPU allocator takes 75% of the memory by default; a conversion is the GPU's only job
    # and a Kimi MoE layer, the next one read ahead and its expert stacks need about 105 GB of an
    # H200's 141 (read when the backend starts, so a user's own setting wins)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    try:
        with signals_raise():
            return args.func(args)
    except Interrupted as e:
        sys.stderr.flush()
        print(f"\n{e}: the finished layers are kept in the output's .partial directory; rerun the same "
              "command with --resume to continue", file=sys.stderr)
        return e.exit_code
    except (NVFP4Error, OSError) as e:
        if "NVFP4_DEBUG" in os.environ:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
