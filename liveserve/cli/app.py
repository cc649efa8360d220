"""The `liveserve` command line: the parser, `main`, and the commands that run the model in this process
(run, tiny, data, train, eval); the others live beside it (bench.py, serve.py, loadtest.py)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from liveserve.cli import bench, loadtest, serve
from liveserve.cli.options import add_model_options, default_model, load, load_live, positive_float, positive_int
from liveserve.cli.source import add_reconnect_options, reconnect_policy
from liveserve.config import (CACHE_POLICIES, DECODINGS, DEFAULT_THRESHOLD, SESSION_MODES, CacheConfig,
                              CommentaryConfig, SessionConfig)
from liveserve.frame_format import RESIZE_MODES

_CACHE_DEFAULTS = CacheConfig()
_COMMENTARY_DEFAULTS = CommentaryConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liveserve", description="Serve online video LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="stream a video through the model and print its narration")
    run.add_argument("video", nargs="?", help="video file, live URL (rtsp://, rtmp://, srt://, http(s):// incl. "
                                              "HLS/DASH, udp://, tcp://) or V4L2 device such as /dev/video0 "
                                              "(default: the bundled sample)")
    add_model_options(run, default_model())
    run.add_argument("--fps", type=positive_float, default=2.0, help="frames per second to sample (default: 2)")
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
    run.add_argument("--chunk-s", type=positive_float, default=_COMMENTARY_DEFAULTS.chunk_s,
                     help="commentary: seconds of video per turn (default: %(default)s)")
    run.add_argument("--max-tokens-per-chunk", type=positive_int, default=_COMMENTARY_DEFAULTS.max_tokens_per_chunk,
                     help="commentary: most tokens said per chunk (default: %(default)s)")
    run.add_argument("--decoding", choices=tuple(DECODINGS), default="greedy",
                     help="commentary: greedy, or reference (StreamingVLM's sampling: temperature 0.9, repetition "
                          "penalty 1.05); --temperature, --top-p and --repetition-penalty override it "
                          "(default: %(default)s)")
    run.add_argument("--resize", choices=RESIZE_MODES, default=_COMMENTARY_DEFAULTS.resize,
                     help="commentary: smart keeps the aspect ratio as the reference does (sides multiples of 28 "
                          "within the model's pixel budget), square squares frames (default: %(default)s)")
    run.add_argument("--repetition-penalty", type=positive_float,
                     help="commentary: penalty on the tokens a reply has said (default: the --decoding preset's)")


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
    synth.add_argument("--videos", type=positive_int, default=100, help="number of videos (default: 100)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.add_argument("--fps", type=positive_float, default=2.0, help="stream frame rate (default: 2)")
    synth.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("W", "H"),
                       help="frame size in pixels (default: 128 128)")

    _add_train_parser(sub)

    ev = sub.add_parser("eval", help="evaluate a model on a dataset (JSON out)")
    add_model_options(ev, "default")
    ev.add_argument("--data", help="dataset directory (default: a held-out synthetic set, generated once)")
    ev.add_argument("--json", dest="json_out", help="also write the results here")
    ev.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                    help="streaming threshold of the free-running pass (default: 0.725)")
    ev.add_argument("--max-new-tokens", type=positive_int, default=32, help="reply length cap (default: 32)")
    ev.add_argument("--no-stream", action="store_true", help="teacher-forced metrics only (skip the Session pass)")
    ev.add_argument("--threads", type=positive_int, help="CPU threads for torch")

    bench.add_parser(sub)
    serve.add_parsers(sub, lambda p: add_model_options(p, default_model()), positive_float)
    loadtest.add_parser(sub)
    return parser


def _add_train_parser(sub) -> None:
    from liveserve.train.config import LORA_TARGETS, MODES, TrainConfig

    d = TrainConfig("", "")
    train = sub.add_parser("train", help="train a LIVE model on a dataset")
    train.add_argument("--data", required=True, help="dataset directory (dialogues.json + videos)")
    train.add_argument("--out", required=True, help="output directory (checkpoint, train_log.jsonl, model/)")
    train.add_argument("--model", default="tiny", help="base model: directory, 'tiny' or 'default' (default: tiny)")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="optimizer steps")
    length.add_argument("--epochs", type=positive_float, default=d.epochs, help="passes over the data (default: 1)")
    train.add_argument("--lr", type=positive_float, default=d.lr, help=f"peak learning rate (default: {d.lr:g})")
    train.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="warmup share (default: 0.05)")
    train.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: 0)")
    train.add_argument("--grad-accum", type=positive_int, default=d.grad_accum,
                       help=f"dialogues per optimizer step (default: {d.grad_accum})")
    train.add_argument("--stream-loss-weight", type=float, default=d.stream_loss_weight,
                       help="loss weight of the per-frame decisions (default: 1.0)")
    train.add_argument("--mode", choices=MODES, default=d.mode, help="lora or full fine-tuning (default: lora)")
    train.add_argument("--train-vision", action="store_true",
                       help="also train the vision tower in full (default: frozen, its features cached)")
    train.add_argument("--lora-r", type=positive_int, default=d.lora_r, help=f"LoRA rank (default: {d.lora_r})")
    train.add_argument("--lora-alpha", type=positive_int, default=d.lora_alpha,
                       help=f"LoRA alpha (default: {d.lora_alpha})")
    train.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout (default: 0.05)")
    train.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                       help="comma-separated module names (default: all projections and lm_head)")
    train.add_argument("--seed", type=int, default=d.seed, help="random seed (default: 0)")
    train.add_argument("--log-every", type=positive_int, default=d.log_every, help="steps between log lines")
    train.add_argument("--save-every", type=int, default=d.save_every,
                       help="steps between resumable checkpoints (default: 0 = only at the end)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when present")
    train.add_argument("--threads", type=positive_int, help="CPU threads for torch")


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
    commentary = CommentaryConfig(chunk_s=args.chunk_s, fps=args.fps, max_tokens_per_chunk=args.max_tokens_per_chunk,
                                  resize=args.resize)
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
    commands = {"run": cmd_run, "bench": bench.cmd_bench, "tiny": cmd_tiny, "data": cmd_data, "train": cmd_train,
                "eval": cmd_eval, "serve": lambda a: serve.cmd_serve(a, load), "client": serve.cmd_client,
                "transcript": serve.cmd_transcript, "models": serve.cmd_models,
                "demo": lambda a: serve.cmd_demo(a, load), "loadtest": loadtest.cmd_loadtest}
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
