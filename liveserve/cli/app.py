"""The `liveserve` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from liveserve import cli_loadtest, cli_serve
from liveserve.cli_source import add_reconnect_options, reconnect_policy
from liveserve.config import (ATTENTION_KERNELS, CACHE_POLICIES, DECODINGS, DEFAULT_THRESHOLD, SESSION_MODES,
                              CacheConfig, CommentaryConfig, SessionConfig)

if TYPE_CHECKING:  # torch/transformers take seconds to import; the CLI imports them only when needed
    from liveserve.model.live import LiveModel

_CACHE_DEFAULTS = CacheConfig()
_COMMENTARY_DEFAULTS = CommentaryConfig()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _default_model() -> str:
    """'default' (the bundled trained narrator) when it is built, else the random-weight 'tiny'."""
    from liveserve.model.registry import default_model_available

    return "default" if default_model_available() else "tiny"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _add_model_options(parser: argparse.ArgumentParser, default: str = "tiny") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default,
                       help="model directory (liveserve or VideoLLM-online layout), 'default' for the bundled "
                            "trained narrator or 'tiny' for a random-weight model (default: %(default)s)")
    group.add_argument("--base-model", help="local base LLM directory for a VideoLLM-online adapter")
    group.add_argument("--vision-model", help="local SigLIP/CLIP directory for a VideoLLM-online adapter")
    group.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liveserve", description="Serve online video LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="stream a video through the model and print its narration")
    run.add_argument("video", nargs="?", help="video file, live URL (rtsp://, rtmp://, srt://, http(s):// incl. "
                                              "HLS/DASH, udp://, tcp://) or V4L2 device such as /dev/video0 "
                                              "(default: the bundled sample)")
    _add_model_options(run, _default_model())
    run.add_argument("--fps", type=_positive_float, default=2.0, help="frames per second to sample (default: 2)")
    run.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                     help="streaming threshold: stay silent only when P(interval) >= this (default: 0.725)")
    run.add_argument("--cache", choices=CACHE_POLICIES, default="full", help="KV cache policy (default: full)")
    run.add_argument("--window-frames", type=int, default=_CACHE_DEFAULTS.window_frames,
                     help="sink_window: recent frames kept (default: 64)")
    run.add_argument("--text-window", type=int, default=_CACHE_DEFAULTS.text_window_tokens,
                     help="sink_window: recent text tokens kept (default: 512)")
    run.add_argument("--max-new-tokens", type=int, default=100, help="reply length cap (default: 100)")
    run.add_argument("--temperature", type=float,
                     help="0 = greedy (default: 0, or in commentary mode the --decoding preset's)")
    run.add_argument("--top-p", type=float, help="nucleus sampling (default: 1, or the --decoding preset's)")
    run.add_argument("--seed", type=int, default=0, help="the session's sampling seed (default: %(default)s)")
    run.add_argument("--max-frames", type=int, help="stop after this many frames")
    run.add_argument("--realtime", action="store_true",
                     help="feed a file's frames at wall-clock pace (a live source always runs at its own pace)")
    add_reconnect_options(run)
    run.add_argument("--query", action="append", default=[], metavar="T:TEXT",
                     help="user query at stream time T seconds (repeatable; default: "
                          "'0:Please narrate the video in real time.', or in commentary mode the first turn's "
                          "'Commentate on this match')")
    run.add_argument("--mode", choices=SESSION_MODES,
                     help="live: a decision per frame (LIVE models); commentary: a turn per chunk, StreamingVLM's "
                          "mode (Qwen2.5-VL models) (default: the model's own)")
    run.add_argument("--chunk-s", type=_positive_float, default=_COMMENTARY_DEFAULTS.chunk_s,
                     help="commentary: seconds of video per turn (default: %(default)s)")
    run.add_argument("--max-tokens-per-chunk", type=_positive_int, default=_COMMENTARY_DEFAULTS.max_tokens_per_chunk,
                     help="commentary: most tokens said per chunk (default: %(default)s)")
    run.add_argument("--decoding", choices=tuple(DECODINGS), default="greedy",
                     help="commentary: greedy, or reference (StreamingVLM's sampling: temperature 0.9, repetition "
                          "penalty 1.05); --temperature, --top-p and --repetition-penalty override it "
                          "(default: %(default)s)")
    run.add_argument("--repetition-penalty", type=_positive_float,
                     help="commentary: penalty on the tokens a reply has said (default: the --decoding preset's)")

    bench = sub.add_parser("bench", help="benchmarks (JSON out)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    engine = bench_sub.add_parser("engine", help="per-frame latency versus stream length, per cache policy")
    _add_model_options(engine)
    engine.add_argument("--lengths", default="100,1000,10000", help="stream lengths in frames (default: 100,1000,10000)")
    engine.add_argument("--policies", default=",".join(CACHE_POLICIES), help="cache policies to run")
    engine.add_argument("--window", type=int, default=50, help="frames averaged at each length (default: 50)")
    engine.add_argument("--json", dest="json_out", required=True, help="where to write the results")
    engine.add_argument("--threads", type=_positive_int, help="CPU threads for torch")

    batch = _add_sessions_bench(bench_sub, "batch", "many streams: batched engine versus sequential sessions",
                                "1,2,4,8,16,32,64")
    batch.add_argument("--input", choices=("pixels", "features"), default="pixels",
                       help="pixels: include batched frame encoding; features: decision steps only (default: pixels)")
    batch.add_argument("--max-tokens-per-chunk", type=_positive_int, default=_COMMENTARY_DEFAULTS.max_tokens_per_chunk,
                       help="commentary models: most tokens said per chunk (default: %(default)s)")
    batch.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    service = _add_sessions_bench(bench_sub, "service",
                                  "gRPC and Ray Serve service paths versus the in-process engine, same load", "1,8")
    service.add_argument("--ray", action="store_true",
                         help="also benchmark the disaggregated Ray Serve application (starts a local Ray)")
    service.add_argument("--repeats", type=int, default=3,
                         help="times each session count runs, the paths taking turns (default: 3)")
    service.add_argument("--threads", type=_positive_int, default=1,
                         help="torch CPU threads of the in-process engine and of the single-process server "
                              "(default: %(default)s)")

    _add_capacity_parser(bench_sub)

    tiny = sub.add_parser("tiny", help="write a tiny random-weight checkpoint")
    tiny.add_argument("out", help="output directory")
    tiny.add_argument("--family", choices=("live", "qwen2_5_vl", "qwen2_vl"), default="live",
                      help="live: a LIVE model (VideoLLM-online's layout; the options below); qwen2_5_vl: a "
                           "Qwen2.5-VL directory in StreamingVLM's release layout; qwen2_vl: a Qwen2-VL directory "
                           "in LiveCC's (both commentary mode) (default: %(default)s)")
    tiny.add_argument("--layout", choices=("liveserve", "videollm-online"), default="liveserve")
    tiny.add_argument("--llm", choices=("llama", "qwen2"), default="llama")
    tiny.add_argument("--vision", choices=("siglip", "clip"), default="siglip")
    tiny.add_argument("--tokenizer", choices=("minimal", "llama3", "qwen2"), default="minimal",
                      help="special tokens of the tokenizer: 'minimal' (bos and eos), 'llama3' (and its header "
                           "tokens and chat template) or 'qwen2' (no bos, ChatML) (default: %(default)s)")

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data", required=True)
    synth = data_sub.add_parser("synth", help="write a synthetic streaming-narration dataset")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--videos", type=_positive_int, default=100, help="number of videos (default: 100)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.add_argument("--fps", type=_positive_float, default=2.0, help="stream frame rate (default: 2)")
    synth.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("W", "H"),
                       help="frame size in pixels (default: 128 128)")

    _add_train_parser(sub)

    ev = sub.add_parser("eval", help="evaluate a model on a dataset (JSON out)")
    _add_model_options(ev, "default")
    ev.add_argument("--data", help="dataset directory (default: a held-out synthetic set, generated once)")
    ev.add_argument("--json", dest="json_out", help="also write the results here")
    ev.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                    help="streaming threshold of the free-running pass (default: 0.725)")
    ev.add_argument("--max-new-tokens", type=_positive_int, default=32, help="reply length cap (default: 32)")
    ev.add_argument("--no-stream", action="store_true", help="teacher-forced metrics only (skip the Session pass)")
    ev.add_argument("--threads", type=_positive_int, help="CPU threads for torch")

    cli_serve.add_parsers(sub, lambda p: _add_model_options(p, _default_model()), _positive_float)
    cli_loadtest.add_parser(sub)
    return parser


def _add_sessions_bench(bench_sub, name: str, help_text: str, sessions: str) -> argparse.ArgumentParser:
    """A benchmark over session counts in lockstep rounds (batch, service)."""
    parser = bench_sub.add_parser(name, help=help_text)
    _add_model_options(parser)
    parser.add_argument("--sessions", default=sessions, help=f"session counts (default: {sessions})")
    parser.add_argument("--rounds", type=int, default=20, help="measured frames per session (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured frames per session first (default: 3)")
    parser.add_argument("--json", dest="json_out", required=True, help="where to write the results")
    return parser


def _add_capacity_parser(bench_sub) -> None:
    from liveserve.bench.capacity import CapacitySettings
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
    levels.add_argument("--sweep-max", type=_positive_int, default=64,
                        help="sweep 1, 2, 4, ... up to N, stop at the first level that misses the SLO, then bisect "
                             "(default: %(default)s)")
    capacity.add_argument("--refine", type=int, default=1, help="bisection levels after a sweep's miss (default: 1)")
    capacity.add_argument("--fps", type=_positive_float, default=d.fps,
                          help="frames per second per stream (default: 2)")
    capacity.add_argument("--duration", type=_positive_float, default=d.duration_s,
                          help="seconds each level streams in real time (default: %(default)s)")
    capacity.add_argument("--warmup", type=float, default=d.warmup_s,
                          help="first seconds of a level not measured (default: %(default)s)")
    capacity.add_argument("--slo-ms", type=_positive_float, default=d.slo_ms,
                          help="p99 frame -> decision a level must meet (default: %(default)s)")
    capacity.add_argument("--input", choices=("pixels", "features"), default=d.input_kind,
                          help="pixels: frame encoding included; features: decision steps only (default: %(default)s)")
    capacity.add_argument("--reply-rate", type=float, default=d.reply_rate,
                          help="share of frames that fire, through a calibrated decision bias (default: %(default)s)")
    capacity.add_argument("--prefill-frames", type=int, default=d.prefill_frames,
                          help="frames fed to every session before a level is timed (default: %(default)s)")
    capacity.add_argument("--window-frames", type=_positive_int, default=d.window_frames,
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
    capacity.add_argument("--max-tokens-per-chunk", type=_positive_int, default=d.max_tokens_per_chunk,
                          help="commentary models: most tokens a turn says (default: %(default)s)")
    capacity.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    capacity.add_argument("--json", dest="json_out", required=True, help="where to write the results")


def _add_train_parser(sub) -> None:
    from liveserve.train.config import LORA_TARGETS, MODES, TrainConfig

    d = TrainConfig("", "")
    train = sub.add_parser("train", help="train a LIVE model on a dataset")
    train.add_argument("--data", required=True, help="dataset directory (dialogues.json + videos)")
    train.add_argument("--out", required=True, help="output directory (checkpoint, train_log.jsonl, model/)")
    train.add_argument("--model", default="tiny", help="base model: directory, 'tiny' or 'default' (default: tiny)")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help="optimizer steps")
    length.add_argument("--epochs", type=_positive_float, default=d.epochs, help="passes over the data (default: 1)")
    train.add_argument("--lr", type=_positive_float, default=d.lr, help=f"peak learning rate (default: {d.lr:g})")
    train.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="warmup share (default: 0.05)")
    train.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: 0)")
    train.add_argument("--grad-accum", type=_positive_int, default=d.grad_accum,
                       help=f"dialogues per optimizer step (default: {d.grad_accum})")
    train.add_argument("--stream-loss-weight", type=float, default=d.stream_loss_weight,
                       help="loss weight of the per-frame decisions (default: 1.0)")
    train.add_argument("--mode", choices=MODES, default=d.mode, help="lora or full fine-tuning (default: lora)")
    train.add_argument("--train-vision", action="store_true",
                       help="also train the vision tower in full (default: frozen, its features cached)")
    train.add_argument("--lora-r", type=_positive_int, default=d.lora_r, help=f"LoRA rank (default: {d.lora_r})")
    train.add_argument("--lora-alpha", type=_positive_int, default=d.lora_alpha,
                       help=f"LoRA alpha (default: {d.lora_alpha})")
    train.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout (default: 0.05)")
    train.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                       help="comma-separated module names (default: all projections and lm_head)")
    train.add_argument("--seed", type=int, default=d.seed, help="random seed (default: 0)")
    train.add_argument("--log-every", type=_positive_int, default=d.log_every, help="steps between log lines")
    train.add_argument("--save-every", type=int, default=d.save_every,
                       help="steps between resumable checkpoints (default: 0 = only at the end)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when present")
    train.add_argument("--threads", type=_positive_int, help="CPU threads for torch")


def load(args) -> LiveModel:
    from liveserve.model.loading import load_model
    from liveserve.model.registry import resolve_model

    return load_model(resolve_model(args.model), base_model=args.base_model, vision_model=args.vision_model,
                      device=args.device)


def load_live(args, what: str) -> LiveModel:
    """`load`, for the commands that take LIVE models only."""
    from liveserve.model.loading import require_live

    return require_live(load(args), what)


def _decoding(args, mode: str) -> dict:
    """`run`'s reply decoding: in commentary mode the --decoding preset, then each option given."""
    if mode != "commentary":
        return {"temperature": args.temperature or 0.0, "top_p": 1.0 if args.top_p is None else args.top_p}
    preset = DECODINGS[args.decoding]
    return {"temperature": preset.temperature if args.temperature is None else args.temperature,
            "top_p": preset.top_p if args.top_p is None else args.top_p,
            "repetition_penalty": preset.repetition_penalty if args.repetition_penalty is None else args.repetition_penalty}


def cmd_run(args) -> int:
    from liveserve.live_source import check_live_source, is_live_source
    from liveserve.run import DEFAULT_QUERY, parse_query, peak_memory_bytes, run_video
    from liveserve.video import SAMPLE_VIDEO, probe_video

    video = args.video or str(SAMPLE_VIDEO)
    queries = [parse_query(q) for q in args.query]
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    commentary = CommentaryConfig(chunk_s=args.chunk_s, fps=args.fps, max_tokens_per_chunk=args.max_tokens_per_chunk)
    config = SessionConfig(threshold=args.threshold, max_new_tokens=args.max_new_tokens, seed=args.seed,
                           **_decoding(args, "live"),
                           cache=CacheConfig(policy=args.cache, window_frames=args.window_frames,
                                             text_window_tokens=args.text_window,
                                             evict_frames=min(_CACHE_DEFAULTS.evict_frames, max(args.window_frames, 1))),
                           mode=args.mode or "live", commentary=commentary)
    # Fail on a bad file, scheme or device before spending seconds on the model. A live source is opened after
    # the model is loaded: opened before, it would start with a backlog it can never catch up on.
    live = is_live_source(video)
    if live:
        check_live_source(video)
        described = "live"
    else:
        info = probe_video(video)
        described = f"{info.width}x{info.height} {info.duration_s:.1f}s"
    reconnect = reconnect_policy(args)
    model = load(args)
    from liveserve.engine.sessions import check_mode, default_mode

    mode = args.mode or default_mode(model)
    decoding = _decoding(args, mode)
    penalty = decoding.pop("repetition_penalty", config.commentary.repetition_penalty)
    config = replace(config, mode=mode, commentary=replace(config.commentary, repetition_penalty=penalty), **decoding)
    check_mode(model, config)
    if config.mode == "live":
        queries = queries or [DEFAULT_QUERY]
        policy = f"cache {args.cache}"
    else:
        policy = f"commentary every {args.chunk_s:g}s"
    print(f"liveserve: model {model.name} on {model.device} ({model.dtype}); video {video} "
          f"{described} at {args.fps:g} fps, {policy}", file=sys.stderr)
    started = time.perf_counter()
    stats = run_video(model, video, fps=args.fps, config=config, queries=queries, realtime=args.realtime,
                      max_frames=args.max_frames, reconnect=reconnect)
    wall = time.perf_counter() - started
    fps = stats.frames / stats.busy_s if stats.busy_s else 0.0
    print(f"liveserve: {stats.frames} frames, {stats.fired} fired, {stats.responses} responses in {wall:.1f}s; "
          f"processed {fps:.1f} FPS; max decision lag {stats.max_lag_s * 1e3:.0f} ms; "
          f"peak KV cache {stats.peak_cache_bytes / 2**20:.1f} MiB; "
          f"peak memory {peak_memory_bytes(model.device) / 2**20:.0f} MiB"
          + (f"; source: {stats.source_reconnects} reconnects, {stats.source_dropped} frames dropped" if live else ""),
          file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    if args.bench in ("engine", "batch") and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.bench in ("batch", "service"):
        return cmd_bench_sessions(args)
    if args.bench == "capacity":
        return cmd_bench_capacity(args)
    from liveserve.bench.engine import run_engine_bench

    lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for policy in policies:
        if policy not in CACHE_POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; choose from {', '.join(CACHE_POLICIES)}")
    if not lengths or lengths[0] < 1 or args.window < 1:
        raise ValueError("--lengths must be positive frame counts and --window >= 1")
    run_engine_bench(load_live(args, "bench engine"), lengths=lengths, policies=policies, window=args.window, out=args.json_out)
    return 0


def cmd_bench_sessions(args) -> int:
    try:
        sessions = sorted({int(x) for x in args.sessions.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--sessions must be a comma-separated list of counts, got {args.sessions!r}") from None
    if not sessions or sessions[0] < 1 or args.rounds < 1 or args.warmup < 0:
        raise ValueError("--sessions must be positive counts, --rounds >= 1 and --warmup >= 0")
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
    from liveserve.bench.capacity import CapacitySettings, run_capacity_bench, sweep_levels

    if args.sessions:
        try:
            levels = sorted({int(x) for x in args.sessions.split(",") if x.strip()})
        except ValueError:
            raise ValueError(f"--sessions must be a comma-separated list of counts, got {args.sessions!r}") from None
        if not levels or levels[0] < 1:
            raise ValueError("--sessions must be positive counts")
    else:
        levels = sweep_levels(args.sweep_max)
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


def cmd_tiny(args) -> int:
    from liveserve.model.tiny import write_tiny_checkpoint, write_tiny_qwen2_5_vl, write_tiny_qwen2_vl

    if args.family != "live":
        given = [flag for flag, value, default in (("--layout", args.layout, "liveserve"), ("--llm", args.llm, "llama"),
                                                   ("--vision", args.vision, "siglip"),
                                                   ("--tokenizer", args.tokenizer, "minimal")) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --family live only")
        print({"qwen2_5_vl": write_tiny_qwen2_5_vl, "qwen2_vl": write_tiny_qwen2_vl}[args.family](args.out))
        return 0
    path = write_tiny_checkpoint(args.out, layout=args.layout, llm=args.llm, vision=args.vision,
                                 tokenizer=args.tokenizer)
    print(path)
    return 0


def cmd_data(args) -> int:
    from liveserve.data.synthetic import DATASET_DIALOGUES, write_dataset

    def report(done: int, total: int, video) -> None:
        if done == total or done % 50 == 0:
            print(f"liveserve: {done}/{total} videos", file=sys.stderr, flush=True)

    out = write_dataset(args.out, args.videos, args.seed, args.fps, tuple(args.size), progress=report)
    print(out / DATASET_DIALOGUES)
    return 0


def cmd_train(args) -> int:
    from liveserve.data.synthetic import DATASET_DIALOGUES
    from liveserve.model.loading import load_model
    from liveserve.model.registry import resolve_model
    from liveserve.train.config import TrainConfig
    from liveserve.train.trainer import train

    dialogues = Path(args.data) / DATASET_DIALOGUES
    if not dialogues.is_file():
        raise FileNotFoundError(f"{dialogues}: no such file (expected a dataset directory; see `liveserve data synth`)")
    config = TrainConfig(
        data=args.data, out=args.out, model=args.model, steps=args.steps, epochs=args.epochs, lr=args.lr,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, grad_accum=args.grad_accum,
        stream_loss_weight=args.stream_loss_weight, mode=args.mode, train_vision=args.train_vision,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        seed=args.seed, log_every=args.log_every, save_every=args.save_every, resume=args.resume, threads=args.threads)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(resolve_model(args.model), device=device, dtype=torch.float32)  # fp32 master weights
    result = train(config, model)
    print(result.model_dir)
    return 0


def cmd_eval(args) -> int:
    import json

    from liveserve.train.evaluate import evaluate, heldout_dataset, summary_line

    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    data = Path(args.data) if args.data else None
    if data is not None and not data.is_dir():
        raise FileNotFoundError(f"dataset directory {data} does not exist")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_live(args, "eval")

    def log(msg: str) -> None:
        print(f"liveserve eval: {msg}", file=sys.stderr, flush=True)

    data = data or heldout_dataset(log=log)
    results = evaluate(model, data, threshold=args.threshold, stream=not args.no_stream,
                       max_new_tokens=args.max_new_tokens, log=log)
    text = json.dumps(results, indent=2)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    print(text)
    log(summary_line(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are always local
    from liveserve.logs import quiet_library_logs
    from liveserve.model.checkpoint import CheckpointError
    from liveserve.orchestration.launch import LaunchError
    from liveserve.services.client.stream import ClientError
    from liveserve.services.state.redis_server import RedisUnavailable
    from liveserve.video import VideoError

    quiet_library_logs()
    commands = {"run": cmd_run, "bench": cmd_bench, "tiny": cmd_tiny, "data": cmd_data, "train": cmd_train,
                "eval": cmd_eval, "serve": lambda a: cli_serve.cmd_serve(a, load), "client": cli_serve.cmd_client,
                "transcript": cli_serve.cmd_transcript, "models": cli_serve.cmd_models,
                "demo": lambda a: cli_serve.cmd_demo(a, load), "loadtest": cli_loadtest.cmd_loadtest}
    try:
        return commands[args.command](args)
    except (CheckpointError, VideoError, ValueError, FileNotFoundError, ClientError, LaunchError,
            RedisUnavailable) as exc:
        print(f"liveserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("liveserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
