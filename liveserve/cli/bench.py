"""`liveserve bench ...`: the benchmarks' command lines (each writes JSON; liveserve/bench/ measures)."""

from __future__ import annotations

import argparse
import sys

from liveserve.cli.options import add_model_options, load, load_live, positive_float, positive_int
from liveserve.config import ATTENTION_KERNELS, CACHE_POLICIES, CommentaryConfig

_COMMENTARY_DEFAULTS = CommentaryConfig()


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (JSON out)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    engine = bench_sub.add_parser("engine", help="per-frame latency versus stream length, per cache policy")
    add_model_options(engine)
    engine.add_argument("--lengths", default="100,1000,10000", help="stream lengths in frames (default: 100,1000,10000)")
    engine.add_argument("--policies", default=",".join(CACHE_POLICIES), help="cache policies to run")
    engine.add_argument("--window", type=int, default=50, help="frames averaged at each length (default: 50)")
    engine.add_argument("--json", dest="json_out", required=True, help="where to write the results")
    engine.add_argument("--threads", type=positive_int, help="CPU threads for torch")

    batch = _sessions_parser(bench_sub, "batch", "many streams: batched engine versus sequential sessions",
                                "1,2,4,8,16,32,64")
    batch.add_argument("--input", choices=("pixels", "features"), default="pixels",
                       help="pixels: include batched frame encoding; features: decision steps only (default: pixels)")
    batch.add_argument("--max-tokens-per-chunk", type=positive_int, default=_COMMENTARY_DEFAULTS.max_tokens_per_chunk,
                       help="commentary models: most tokens said per chunk (default: %(default)s)")
    batch.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    service = _sessions_parser(bench_sub, "service",
                                  "gRPC and Ray Serve service paths versus the in-process engine, same load", "1,8")
    service.add_argument("--ray", action="store_true",
                         help="also benchmark the disaggregated Ray Serve application (starts a local Ray)")
    service.add_argument("--repeats", type=int, default=3,
                         help="times each session count runs, the paths taking turns (default: 3)")
    service.add_argument("--threads", type=positive_int, default=1,
                         help="torch CPU threads of the in-process engine and of the single-process server "
                              "(default: %(default)s)")

    _capacity_parser(bench_sub)


def _sessions_parser(bench_sub, name: str, help_text: str, sessions: str) -> argparse.ArgumentParser:
    """A benchmark over session counts in lockstep rounds (batch, service)."""
    parser = bench_sub.add_parser(name, help=help_text)
    add_model_options(parser)
    parser.add_argument("--sessions", default=sessions, help=f"session counts (default: {sessions})")
    parser.add_argument("--rounds", type=int, default=20, help="measured frames per session (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured frames per session first (default: 3)")
    parser.add_argument("--json", dest="json_out", required=True, help="where to write the results")
    return parser


def _capacity_parser(bench_sub) -> None:
    from liveserve.bench.capacity_settings import CapacitySettings
    from liveserve.model.presets import PRESETS

    d = CapacitySettings()
    capacity = bench_sub.add_parser("capacity", help="how many real-time streams one replica decides within an SLO")
    model = capacity.add_argument_group("model")
    model.add_argument("--preset", choices=tuple(PRESETS), default="tiny",
                       help="random-weight model of a named size, built in memory (default: %(default)s)")
    model.add_argument("--model", help="a checkpoint instead: directory, 'tiny' or 'default'")
    model.add_argument("--base-model", help="local base LLM directory for a VideoLLM-online adapter")
    model.add_argument("--vision-model", help="local SigLIP/CLIP directory for a VideoLLM-online adapter")
    model.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    levels = capacity.add_mutually_exclusive_group()
    levels.add_argument("--sessions", help="stream counts to run, e.g. 1,8,64")
    levels.add_argument("--sweep-max", type=positive_int, default=64,
                        help="sweep 1, 2, 4, ... up to N, stop at the first level that misses the SLO, then bisect "
                             "(default: %(default)s)")
    capacity.add_argument("--refine", type=int, default=1, help="bisection levels after a sweep's miss (default: 1)")
    capacity.add_argument("--fps", type=positive_float, default=d.fps,
                          help="frames per second per stream (default: 2)")
    capacity.add_argument("--duration", type=positive_float, default=d.duration_s,
                          help="seconds each level streams in real time (default: %(default)s)")
    capacity.add_argument("--warmup", type=float, default=d.warmup_s,
                          help="first seconds of a level not measured (default: %(default)s)")
    capacity.add_argument("--slo-ms", type=positive_float, default=d.slo_ms,
                          help="p99 frame -> decision a level must meet (default: %(default)s)")
    capacity.add_argument("--input", choices=("pixels", "features"), default=d.input_kind,
                          help="pixels: frame encoding included; features: decision steps only (default: %(default)s)")
    capacity.add_argument("--reply-rate", type=float, default=d.reply_rate,
                          help="share of frames that fire, through a calibrated decision bias (default: %(default)s)")
    capacity.add_argument("--prefill-frames", type=int, default=d.prefill_frames,
                          help="frames fed to every session before a level is timed (default: %(default)s)")
    capacity.add_argument("--window-frames", type=positive_int, default=d.window_frames,
                          help="sink_window frames kept per session (default: %(default)s)")
    capacity.add_argument("--single-frames", type=int, default=d.single_stream_frames,
                          help="frames of the single-stream engine/reference comparison (default: %(default)s)")
    capacity.add_argument("--memory-fraction", type=float,
                          help="CUDA: share of the memory left after the weights the KV pool takes (default: 0.9)")
    capacity.add_argument("--attention", choices=ATTENTION_KERNELS, default="auto",
                          help="the engine's attention kernel: auto (flashinfer, else flash-attn, where they run, "
                               "else sdpa), sdpa, flash, flex or flashinfer (default: auto)")
    capacity.add_argument("--forward", choices=("direct", "hf"), default="direct",
                          help="how engine steps run a plain Llama LM: direct (the engine's own layer loop) or hf "
                               "(the Hugging Face forward), for comparison (default: direct)")
    capacity.add_argument("--cuda-graphs", action="store_true",
                          help="engine steps replay CUDA graphs of the direct forward (CUDA only)")
    capacity.add_argument("--max-tokens-per-chunk", type=positive_int, default=d.max_tokens_per_chunk,
                          help="commentary models: most tokens a turn says (default: %(default)s)")
    capacity.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    capacity.add_argument("--json", dest="json_out", required=True, help="where to write the results")


def cmd_bench(args) -> int:
    if args.bench in ("engine", "batch") and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.bench in ("batch", "service"):
        return cmd_bench_sessions(args)
    if args.bench == "capacity":
        return cmd_bench_capacity(args)
    from liveserve.bench.engine import run_engine_bench

    lengths = _counts(args.lengths, "--lengths")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for policy in policies:
        if policy not in CACHE_POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; choose from {', '.join(CACHE_POLICIES)}")
    if args.window < 1:
        raise ValueError(f"--window must be >= 1, got {args.window}")
    run_engine_bench(load_live(args, "bench engine"), lengths=lengths, policies=policies, window=args.window, out=args.json_out)
    return 0


def cmd_bench_sessions(args) -> int:
    sessions = _counts(args.sessions, "--sessions")
    if args.rounds < 1 or args.warmup < 0:
        raise ValueError("--rounds must be >= 1 and --warmup >= 0")
    if args.bench == "service":
        from liveserve.bench.service import BenchStalled, run_service_bench

        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        try:
            run_service_bench(load_live(args, "bench service"), model_ref=args.model, sessions=sessions,
                              rounds=args.rounds, warmup=args.warmup, out=args.json_out, ray=args.ray,
                              repeats=args.repeats, threads=args.threads)
        except BenchStalled as exc:
            print(f"liveserve bench service: {exc}", file=sys.stderr)
            return 1
        return 0
    from liveserve.bench.batch import run_batch_bench

    run_batch_bench(load(args), sessions=sessions, rounds=args.rounds, warmup=args.warmup, input_kind=args.input,
                    out=args.json_out, max_tokens_per_chunk=args.max_tokens_per_chunk)
    return 0


def cmd_bench_capacity(args) -> int:
    from liveserve.bench.capacity import run_capacity_bench, sweep_levels
    from liveserve.bench.capacity_settings import CapacitySettings

    levels = _counts(args.sessions, "--sessions") if args.sessions else sweep_levels(args.sweep_max)
    if args.memory_fraction is not None and not 0 < args.memory_fraction <= 1:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    settings = CapacitySettings(fps=args.fps, duration_s=args.duration, warmup_s=args.warmup, slo_ms=args.slo_ms,
                                input_kind=args.input, reply_rate=args.reply_rate, prefill_frames=args.prefill_frames,
                                window_frames=args.window_frames, single_stream_frames=args.single_frames,
                                max_tokens_per_chunk=args.max_tokens_per_chunk, cuda_graphs=args.cuda_graphs)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model:
        model, preset = load(args), None
    else:
        from liveserve.model.loading import default_device
        from liveserve.model.presets import build_preset_model

        model, preset = build_preset_model(args.preset, device=args.device or default_device()), args.preset
    if hasattr(model, "direct_forward"):
        model.direct_forward = args.forward == "direct"
    run_capacity_bench(model, levels=levels, settings=settings, out=args.json_out, preset=preset,
                       sweep=not args.sessions, refine=args.refine, memory_fraction=args.memory_fraction,
                       attention=args.attention)
    return 0


def _counts(text: str, flag: str) -> list[int]:
    """A comma-separated list of counts >= 1 (session counts, stream lengths), sorted, each once."""
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise ValueError(f"{flag} must be a comma-separated list of counts >= 1, got {text!r}")
    return counts
