"""The `liveserve` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from liveserve.config import CACHE_POLICIES, DEFAULT_THRESHOLD, CacheConfig, SessionConfig

if TYPE_CHECKING:  # torch/transformers take seconds to import; the CLI imports them only when needed
    from liveserve.model.live import LiveModel

_CACHE_DEFAULTS = CacheConfig()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="tiny",
                       help="model directory (liveserve or VideoLLM-online layout), or 'tiny' for the bundled "
                            "random-weight model (default: tiny)")
    group.add_argument("--base-model", help="local base LLM directory for a VideoLLM-online adapter")
    group.add_argument("--vision-model", help="local SigLIP/CLIP directory for a VideoLLM-online adapter")
    group.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liveserve", description="Serve online video LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="stream a video through the model and print its narration")
    run.add_argument("video", nargs="?", help="video file (default: the bundled sample)")
    _add_model_options(run)
    run.add_argument("--fps", type=_positive_float, default=2.0, help="frames per second to sample (default: 2)")
    run.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                     help="streaming threshold: stay silent only when P(interval) >= this (default: 0.725)")
    run.add_argument("--cache", choices=CACHE_POLICIES, default="full", help="KV cache policy (default: full)")
    run.add_argument("--window-frames", type=int, default=_CACHE_DEFAULTS.window_frames,
                     help="sink_window: recent frames kept (default: 64)")
    run.add_argument("--text-window", type=int, default=_CACHE_DEFAULTS.text_window_tokens,
                     help="sink_window: recent text tokens kept (default: 512)")
    run.add_argument("--max-new-tokens", type=int, default=100, help="reply length cap (default: 100)")
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--max-frames", type=int, help="stop after this many frames")
    run.add_argument("--realtime", action="store_true", help="feed frames at wall-clock pace")
    run.add_argument("--query", action="append", default=[], metavar="T:TEXT",
                     help="user query at stream time T seconds (repeatable; default: "
                          "'0:Please narrate the video in real time.')")

    bench = sub.add_parser("bench", help="benchmarks (JSON out)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    engine = bench_sub.add_parser("engine", help="per-frame latency versus stream length, per cache policy")
    _add_model_options(engine)
    engine.add_argument("--lengths", default="100,1000,10000", help="stream lengths in frames (default: 100,1000,10000)")
    engine.add_argument("--policies", default=",".join(CACHE_POLICIES), help="cache policies to run")
    engine.add_argument("--window", type=int, default=50, help="frames averaged at each length (default: 50)")
    engine.add_argument("--json", dest="json_out", required=True, help="where to write the results")

    batch = bench_sub.add_parser("batch", help="many streams: batched engine versus sequential sessions")
    _add_model_options(batch)
    batch.add_argument("--sessions", default="1,2,4,8,16,32,64", help="session counts (default: 1,2,4,8,16,32,64)")
    batch.add_argument("--rounds", type=int, default=20, help="measured frames per session (default: 20)")
    batch.add_argument("--warmup", type=int, default=3, help="unmeasured frames per session first (default: 3)")
    batch.add_argument("--input", choices=("pixels", "features"), default="pixels",
                       help="pixels: include batched frame encoding; features: decision steps only (default: pixels)")
    batch.add_argument("--json", dest="json_out", required=True, help="where to write the results")

    tiny = sub.add_parser("tiny", help="write a tiny random-weight checkpoint")
    tiny.add_argument("out", help="output directory")
    tiny.add_argument("--layout", choices=("liveserve", "videollm-online"), default="liveserve")
    tiny.add_argument("--llm", choices=("llama", "qwen2"), default="llama")
    tiny.add_argument("--vision", choices=("siglip", "clip"), default="siglip")
    return parser


def load(args) -> LiveModel:
    from liveserve.model.loading import load_model
    from liveserve.model.tiny import tiny_checkpoint

    path = tiny_checkpoint() if args.model == "tiny" else Path(args.model)
    return load_model(path, base_model=args.base_model, vision_model=args.vision_model, device=args.device)


def cmd_run(args) -> int:
    from liveserve.run import DEFAULT_QUERY, parse_query, peak_memory_bytes, run_video
    from liveserve.video import SAMPLE_VIDEO, probe_video

    video = args.video or str(SAMPLE_VIDEO)
    queries = [parse_query(q) for q in args.query] or [DEFAULT_QUERY]
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    config = SessionConfig(threshold=args.threshold, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           cache=CacheConfig(policy=args.cache, window_frames=args.window_frames,
                                             text_window_tokens=args.text_window,
                                             evict_frames=min(_CACHE_DEFAULTS.evict_frames, max(args.window_frames, 1))))
    info = probe_video(video)  # fail on a bad video before spending seconds on the model
    model = load(args)
    print(f"liveserve: model {model.name} on {model.device} ({model.dtype}); video {video} "
          f"{info.width}x{info.height} {info.duration_s:.1f}s at {args.fps:g} fps, cache {args.cache}", file=sys.stderr)
    started = time.perf_counter()
    stats = run_video(model, video, fps=args.fps, config=config, queries=queries, realtime=args.realtime,
                      max_frames=args.max_frames)
    wall = time.perf_counter() - started
    fps = stats.frames / stats.busy_s if stats.busy_s else 0.0
    print(f"liveserve: {stats.frames} frames, {stats.fired} fired, {stats.responses} responses in {wall:.1f}s; "
          f"processed {fps:.1f} FPS; max decision lag {stats.max_lag_s * 1e3:.0f} ms; "
          f"peak KV cache {stats.peak_cache_bytes / 2**20:.1f} MiB; "
          f"peak memory {peak_memory_bytes(model.device) / 2**20:.0f} MiB", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    if args.bench == "batch":
        return cmd_bench_batch(args)
    from liveserve.bench.engine import run_engine_bench

    lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for policy in policies:
        if policy not in CACHE_POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; choose from {', '.join(CACHE_POLICIES)}")
    if not lengths or lengths[0] < 1 or args.window < 1:
        raise ValueError("--lengths must be positive frame counts and --window >= 1")
    run_engine_bench(load(args), lengths=lengths, policies=policies, window=args.window, out=args.json_out)
    return 0


def cmd_bench_batch(args) -> int:
    from liveserve.bench.batch import run_batch_bench

    try:
        sessions = sorted({int(x) for x in args.sessions.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--sessions must be a comma-separated list of counts, got {args.sessions!r}") from None
    if not sessions or sessions[0] < 1 or args.rounds < 1 or args.warmup < 0:
        raise ValueError("--sessions must be positive counts, --rounds >= 1 and --warmup >= 0")
    run_batch_bench(load(args), sessions=sessions, rounds=args.rounds, warmup=args.warmup, input_kind=args.input,
                    out=args.json_out)
    return 0


def cmd_tiny(args) -> int:
    from liveserve.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.out, layout=args.layout, llm=args.llm, vision=args.vision)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are always local
    from liveserve.logs import quiet_library_logs
    from liveserve.model.loading import CheckpointError
    from liveserve.video import VideoError

    quiet_library_logs()
    commands = {"run": cmd_run, "bench": cmd_bench, "tiny": cmd_tiny}
    try:
        return commands[args.command](args)
    except (CheckpointError, VideoError, ValueError, FileNotFoundError) as exc:
        print(f"liveserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("liveserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
