"""The serving commands of the `liveserve` CLI: serve, client, demo."""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEFAULT_ADDRESS = "127.0.0.1:50051"


def add_parsers(sub, add_model_options, positive_float) -> None:
    serve = sub.add_parser("serve", help="serve the LiveStream gRPC API (single process: gateway + batched engine)")
    add_model_options(serve)
    serve.add_argument("--address", default=DEFAULT_ADDRESS, help=f"host:port to listen on (default: {DEFAULT_ADDRESS})")
    serve.add_argument("--pool-mb", type=int, help="KV pool size in MiB (default: 25%% of free GPU memory, 1 GiB on CPU)")
    serve.add_argument("--max-frame-kb", type=int, default=4096, help="largest accepted frame (default: 4096 KiB)")

    client = sub.add_parser("client", help="stream a video over the LiveStream API and print what the model says")
    client.add_argument("video", nargs="?", help="video file (default: the bundled sample)")
    client.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server host:port (default: {DEFAULT_ADDRESS})")
    _add_stream_options(client, positive_float)

    demo = sub.add_parser("demo", help="start a local server, stream the bundled sample through it, shut down")
    add_model_options(demo)
    _add_stream_options(demo, positive_float)


def _add_stream_options(parser: argparse.ArgumentParser, positive_float) -> None:
    parser.add_argument("--fps", type=positive_float, default=2.0, help="frames per second to send (default: 2)")
    parser.add_argument("--threshold", type=float, help="the session's streaming threshold (default: server's)")
    parser.add_argument("--fast", action="store_true",
                        help="send frames as fast as possible instead of at wall-clock pace (the server keeps "
                             "sessions real-time, so frames more than its max lag behind are dropped and reported)")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames")
    parser.add_argument("--query", action="append", default=[], metavar="T:TEXT",
                        help="user query at stream time T seconds (repeatable; default: "
                             "'0:Please narrate the video in real time.')")


def _queries(args) -> list[tuple[float, str]]:
    from liveserve.run import DEFAULT_QUERY, parse_query

    return [parse_query(q) for q in args.query] or [DEFAULT_QUERY]


def _stream(args, address: str) -> int:
    from liveserve.services.client import stream_video
    from liveserve.video import SAMPLE_VIDEO

    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    video = getattr(args, "video", None) or str(SAMPLE_VIDEO)
    started = time.perf_counter()
    result = stream_video(address, video, fps=args.fps, realtime=not args.fast, queries=_queries(args),
                          threshold=args.threshold, max_frames=args.max_frames)
    print(f"liveserve: session {result.session_id}: {result.decisions} frames decided, {result.fired} fired, "
          f"{len(result.responses)} responses in {time.perf_counter() - started:.1f}s; "
          f"max decision lag {result.max_lag_s * 1e3:.0f} ms", file=sys.stderr)
    return 0


def cmd_client(args) -> int:
    return _stream(args, args.address)


def cmd_serve(args, load) -> int:
    from liveserve.config import EngineConfig, PoolConfig
    from liveserve.services.local import serve_forever, start_local
    from liveserve.services.stream_service import StreamLimits

    if args.pool_mb is not None and args.pool_mb < 1:
        raise ValueError(f"--pool-mb must be >= 1, got {args.pool_mb}")
    if args.max_frame_kb < 1:
        raise ValueError(f"--max-frame-kb must be >= 1, got {args.max_frame_kb}")
    logging.basicConfig(level=logging.INFO, format="liveserve: %(message)s")
    model = load(args)
    pool = PoolConfig(budget_bytes=args.pool_mb << 20 if args.pool_mb else None)
    server = start_local(model, args.address, engine_config=EngineConfig(pool=pool),
                         limits=StreamLimits(max_frame_bytes=args.max_frame_kb << 10))
    engine = server.worker.engine
    print(f"liveserve: serving liveserve.api.v1.LiveStream on {server.address} (model {model.name} on "
          f"{model.device}; KV pool {engine.pool.nbytes / 2**20:.0f} MiB, {engine.kernel} attention); "
          "Ctrl-C to stop", file=sys.stderr, flush=True)
    serve_forever(server)
    return 0


def cmd_demo(args, load) -> int:
    from liveserve.config import EngineConfig, PoolConfig
    from liveserve.services.local import start_local

    model = load(args)
    server = start_local(model, "127.0.0.1:0", engine_config=EngineConfig(pool=PoolConfig(budget_bytes=256 << 20)))
    print(f"liveserve: demo server on {server.address} (model {model.name} on {model.device}); "
          "streaming the bundled sample through it", file=sys.stderr, flush=True)
    try:
        return _stream(args, server.address)
    finally:
        server.stop(grace_s=2)
        print("liveserve: demo server stopped", file=sys.stderr)
