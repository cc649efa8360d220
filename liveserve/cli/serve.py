"""The serving commands of the `liveserve` CLI: serve, client, transcript, demo."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from liveserve.cli.connection import add_connection_options, channel_credentials
from liveserve.cli.source import add_reconnect_options, reconnect_policy

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_METRICS_HOST = "127.0.0.1"


def add_parsers(sub, add_model_options, positive_float) -> None:
    serve = sub.add_parser("serve", help="serve the LiveStream gRPC API: the Ray Serve application (Gateway, "
                                         "Perception, Decision, Reaction), or one process with --local")
    add_model_options(serve)
    serve.add_argument("--address", default=DEFAULT_ADDRESS,
                       help=f"host:port the gRPC API listens on (default: {DEFAULT_ADDRESS}; 0.0.0.0:PORT for every "
                            "interface); on Ray every Gateway replica on this host serves it there")
    serve.add_argument("--pool-mb", type=int, help="KV pool size in MiB per Decision replica (default: 90%% of the "
                                                   "GPU memory left after the weights, 1 GiB on CPU)")
    serve.add_argument("--max-frame-kb", type=int, help="largest accepted frame (default: 4096 KiB)")
    serve.add_argument("--max-lag-s", type=float, help="a session drops queued frames further behind its stream than "
                                                       "this, and reports them (default: 2)")
    serve.add_argument("--tick-ms", type=float, help="a gateway collects frames this long before one Perception call "
                                                     "(default: 5)")
    serve.add_argument("--threads", type=int, help="torch CPU threads per replica (default: 1); with --local, for "
                                                    "the whole process (default: torch's, the host's cores)")
    serve.add_argument("--hop-ms", type=float, help="a busy hop between services sends at most once per this; an idle "
                                                    "one at once (default: 10)")
    _add_ray_options(serve)
    web = serve.add_argument_group("browser front")
    web.add_argument("--http-port", type=int, metavar="PORT",
                     help="serve the browser page at / and the session protocol as a WebSocket at /v1/stream on "
                          "this port: with --local (default: off), and on Ray as the Serve HTTP proxy's port "
                          "(default: a free one)")
    web.add_argument("--http-host", default=DEFAULT_METRICS_HOST,
                     help=f"with --local: the interface the browser front listens on (default: "
                          f"{DEFAULT_METRICS_HOST}, this host only)")
    tls = serve.add_argument_group("transport security")
    tls.add_argument("--tls-cert", help="serve the gRPC API over TLS with this PEM certificate (chain), with --tls-key "
                                        "(setting tls_cert_file)")
    tls.add_argument("--tls-key", help="the certificate's PEM private key (setting tls_key_file)")
    tls.add_argument("--tls-client-ca", help="require client certificates signed by this PEM CA: mutual TLS "
                                             "(setting tls_client_ca_file)")

    client = sub.add_parser("client", help="stream a video over the LiveStream API and print what the model says")
    client.add_argument("video", nargs="?", help="video file, live URL (rtsp://, rtmp://, srt://, http(s):// incl. "
                                                 "HLS/DASH, udp://, tcp://) or V4L2 device such as /dev/video0 "
                                                 "(default: the bundled sample)")
    client.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server host:port (default: {DEFAULT_ADDRESS})")
    _add_stream_options(client, positive_float)
    client.add_argument("--model", dest="served_model", default="", metavar="NAME",
                        help="the served model the session runs (`liveserve models` lists them; default: the "
                             "deployment's default)")
    add_reconnect_options(client)
    resume = client.add_argument_group("the connection to the server")
    resume.add_argument("--resume-attempts", type=int, default=8, metavar="N",
                        help="when the connection breaks (UNAVAILABLE: the network, or the Gateway stopping), "
                             "reconnect and resume the session up to N times in a row before giving up; frames "
                             "not yet decided are sent again (default: 8; 0: never)")
    resume.add_argument("--resume-max-s", type=positive_float, default=2.0, metavar="S",
                        help="longest wait between those attempts: waits double from 0.05 s up to this (default: 2)")
    add_connection_options(client)

    transcript = sub.add_parser("transcript", help="print a session's queries and replies (GetTranscript) as JSON "
                                                   "or WebVTT subtitles")
    transcript.add_argument("session", help="the session id (SessionOpened.session_id, printed by `client`)")
    transcript.add_argument("--address", default=DEFAULT_ADDRESS,
                            help=f"server host:port (default: {DEFAULT_ADDRESS})")
    transcript.add_argument("--format", choices=("json", "vtt"), default="json", help="output format (default: json)")
    transcript.add_argument("--cue-s", type=positive_float, default=5.0, metavar="S",
                            help="WebVTT: a cue lasts until the next one of its speaker, at most S seconds "
                                 "(default: 5)")
    add_connection_options(transcript)

    models = sub.add_parser("models", help="list the models a deployment serves (ListModels); Open.model and "
                                           "`client --model` pick one")
    models.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server host:port (default: {DEFAULT_ADDRESS})")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_options(models)

    demo = sub.add_parser("demo", help="serve the application on a local Ray, stream the bundled sample through it, "
                                       "shut down")
    add_model_options(demo)
    _add_stream_options(demo, positive_float)
    _add_ray_options(demo)


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("deployment")
    group.add_argument("--local", action="store_true",
                       help="one process instead of Ray: the same Gateway, with Perception, Decision and Reaction "
                            "in this process")
    group.add_argument("--config", help="Ray Serve config (default: the bundled orchestration/serve_config.yaml); "
                                        "with --local, its application args are the settings (flags override)")
    group.add_argument("--reaction-model", help="checkpoint that writes the replies (default: the --model one)")
    for name in ("gateway", "decision", "perception", "reaction"):
        group.add_argument(f"--{name}-replicas", type=int, metavar="N",
                           help=f"fixed number of {name.capitalize()} replicas (default: the config's)")
    group.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    group.add_argument("--metrics-port", type=int, default=8080,
                       help="Prometheus endpoint for every service's metrics: a local Ray's, or with --local this "
                            "process's (default: 8080; 0 turns it off with --local)")
    group.add_argument("--metrics-host", default=DEFAULT_METRICS_HOST,
                       help=f"with --local: the interface the metrics endpoint listens on (default: "
                            f"{DEFAULT_METRICS_HOST}, this host only; 0.0.0.0 for a scraper elsewhere). On Ray the "
                            "endpoint is Ray's own exporter, which listens on every interface of a networked node")



def _add_stream_options(parser: argparse.ArgumentParser, positive_float) -> None:
    parser.add_argument("--fps", type=positive_float, default=2.0, help="frames per second to send (default: 2)")
    parser.add_argument("--threshold", type=float, help="the session's streaming threshold (default: server's)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true",
                      help="send frames at wall-clock pace, like a camera (the default)")
    pace.add_argument("--fast", action="store_true",
                      help="send a file's frames as fast as possible instead of at wall-clock pace (the server keeps "
                           "sessions real-time, so frames more than its max lag behind are dropped and reported); "
                           "a live source always sends at its own pace")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames")
    parser.add_argument("--query", action="append", default=[], metavar="T:TEXT",
                        help="user query at stream time T seconds (repeatable; default: "
                             "'0:Please narrate the video in real time.')")


def _queries(args) -> list[tuple[float, str]]:
    from liveserve.run import DEFAULT_QUERY, parse_query

    return [parse_query(q) for q in args.query] or [DEFAULT_QUERY]


def _stream(args, address: str) -> int:
    from liveserve.live_source import is_live_source
    from liveserve.services.client.stream import stream_video
    from liveserve.video import SAMPLE_VIDEO

    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    video = getattr(args, "video", None) or str(SAMPLE_VIDEO)
    if args.fast and is_live_source(video):
        raise ValueError(f"--fast reads a file as fast as possible; {video} is a live source, read at its own pace")
    started = time.perf_counter()
    connection = {}  # `client` has connection flags; `demo` talks plaintext to the server it started itself
    if hasattr(args, "api_key"):
        connection = {"credentials": channel_credentials(args), "api_key": args.api_key,
                      "reconnect": reconnect_policy(args), "model": args.served_model, "resume": _resume_policy(args)}
    result = stream_video(address, video, fps=args.fps, realtime=not args.fast, queries=_queries(args),
                          threshold=args.threshold, max_frames=args.max_frames, **connection)
    print(f"liveserve: session {result.session_id}: {result.decisions} frames decided, {result.fired} fired, "
          f"{len(result.responses)} responses in {time.perf_counter() - started:.1f}s; "
          f"max decision lag {result.max_lag_s * 1e3:.0f} ms"
          + (f"; source: {result.source_reconnects} reconnects, {result.source_dropped} frames dropped"
             if result.live else "")
          + (f"; server connection: {len(result.reconnects)} resume(s), the longest "
             f"{max(r.took_s for r in result.reconnects):.2f}s" if result.reconnects else ""), file=sys.stderr)
    return 0


def _resume_policy(args):
    from liveserve.services.client import ResumePolicy

    if args.resume_attempts < 0:
        raise ValueError(f"--resume-attempts must be >= 0, got {args.resume_attempts}")
    return ResumePolicy(attempts=args.resume_attempts, max_delay_s=max(args.resume_max_s, 0.05))


def cmd_client(args) -> int:
    return _stream(args, args.address)


def cmd_models(args) -> int:
    import json

    from google.protobuf.json_format import MessageToDict

    from liveserve.services.client.stream import list_models

    models = list_models(args.address, credentials=channel_credentials(args), api_key=args.api_key)
    if args.json:
        print(json.dumps([MessageToDict(model, always_print_fields_with_no_presence=True,
                                        preserving_proto_field_name=True) for model in models], indent=2))
        return 0
    rows = [("NAME", "DEFAULT", "FAMILY", "MODE", "THRESHOLD", "MAX_NEW_TOKENS", "CACHE")]
    rows += [(m.name, "yes" if m.is_default else "", m.family, m.mode or "live", f"{m.threshold:.3g}",
              str(m.max_new_tokens), f"{m.cache_policy} {m.window_frames} frames") for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_transcript(args) -> int:
    import json

    from liveserve.services.client.stream import fetch_transcript
    from liveserve.services.state.transcript import to_webvtt, transcript_to_dict

    transcript = fetch_transcript(args.address, args.session, credentials=channel_credentials(args),
                                  api_key=args.api_key)
    if args.format == "vtt":
        sys.stdout.write(to_webvtt(transcript, args.cue_s))
    else:
        print(json.dumps(transcript_to_dict(transcript), indent=2, ensure_ascii=False))
    return 0


def cmd_serve(args, load) -> int:
    logging.basicConfig(level=logging.INFO, format="liveserve: %(message)s")
    if args.local:
        return _serve_local(args, load)
    _port(args.address)
    if args.metrics_host != DEFAULT_METRICS_HOST:
        raise ValueError("--metrics-host applies to --local: on Ray the metrics endpoint is Ray's own exporter, "
                         "which chooses its interfaces itself (every interface of a networked node)")
    _check_tls(_settings(args))
    app = _start_app(args)
    print(f"liveserve: serving liveserve.api.v1.LiveStream on {app.address}{_tls_note(args)} (Ray Serve application "
          f"'liveserve'; Redis {app.redis_url}; metrics {app.metrics_url or 'on each Ray node'}; browser page "
          f"{app.http_url}); Ctrl-C to stop", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    print("liveserve: shutting down", file=sys.stderr, flush=True)
    _stop(app)
    return 0


def cmd_demo(args, load) -> int:
    if args.local:
        return _demo_local(args, load)
    from liveserve.orchestration.launch import free_port

    args.metrics_port = free_port()  # a demo must not collide with a server already on 8080
    args.address = f"127.0.0.1:{free_port()}"
    app = _start_app(args)
    print(f"liveserve: demo application on {app.address}; streaming the bundled sample through it",
          file=sys.stderr, flush=True)
    try:
        return _stream(args, app.address)
    finally:
        _stop(app)
        print("liveserve: demo application stopped", file=sys.stderr)


def _stop(app) -> None:
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's own teardown lines repeat ours
    app.stop()


def _settings(args) -> dict:
    """The application settings the command line overrides (ServiceSettings fields)."""
    settings = {"model": _model_ref(args.model)}
    if args.reaction_model:
        settings["reaction_model"] = _model_ref(args.reaction_model)
    if getattr(args, "pool_mb", None) is not None:
        settings["pool_mb"] = args.pool_mb
    if getattr(args, "max_frame_kb", None) is not None:
        settings["max_frame_bytes"] = args.max_frame_kb << 10
    for name in ("max_lag_s", "tick_ms", "hop_ms", "threads"):
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    tls_flags = {"tls_cert": "tls_cert_file", "tls_key": "tls_key_file", "tls_client_ca": "tls_client_ca_file"}
    for flag, name in tls_flags.items():
        if getattr(args, flag, None):  # absolute: Ray replicas run in other directories
            settings[name] = str(Path(getattr(args, flag)).expanduser().resolve())
    return settings


def _check_tls(settings: dict) -> None:
    """Read the TLS files now, so a bad one fails before a model loads or Ray starts."""
    from liveserve.services.security.tls import server_credentials

    server_credentials(settings.get("tls_cert_file", ""), settings.get("tls_key_file", ""),
                       settings.get("tls_client_ca_file", ""))


def _start_app(args):
    from liveserve.orchestration.launch import host_replica_cap, load_config, start

    replicas = {name.capitalize(): count for name in ("gateway", "decision", "perception", "reaction")
                if (count := getattr(args, f"{name}_replicas")) is not None}
    for name, count in replicas.items():
        if count < 1:
            raise ValueError(f"--{name.lower()}-replicas must be >= 1, got {count}")
    joining = args.ray_address or os.environ.get("RAY_ADDRESS")
    config = load_config(args.config, address=args.address, args=_settings(args), replicas=replicas,
                         max_replicas=None if joining else host_replica_cap())
    return start(config, ray_address=args.ray_address, metrics_port=args.metrics_port,
                 http_port=getattr(args, "http_port", None),
                 progress=lambda message: print(f"liveserve: {message}", file=sys.stderr, flush=True))


def _tls_note(args) -> str:
    if getattr(args, "tls_client_ca", None):
        return " over mutual TLS"
    return " over TLS" if getattr(args, "tls_cert", None) else ""


def _model_ref(model: str) -> str:
    """Replicas run in other processes (and directories): a checkpoint path must be absolute."""
    from liveserve.model.registry import MODEL_NAMES

    return model if model in MODEL_NAMES else str(Path(model).expanduser().resolve())


def _port(address: str) -> int:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address must be host:port with a port in 1..65535, got {address!r}")
    return int(port)


def _local_settings(args, address: str):
    from liveserve.services.settings import ServiceSettings

    if getattr(args, "max_frame_kb", None) is not None and args.max_frame_kb < 1:
        raise ValueError(f"--max-frame-kb must be >= 1, got {args.max_frame_kb}")
    configured = {}
    if getattr(args, "config", None):  # the same settings as on Ray: API keys, tenants' quotas, limits
        from liveserve.orchestration.launch import application_args

        configured = application_args(args.config)
    settings = {**configured, **_settings(args), "address": address}
    try:
        return ServiceSettings.from_dict(settings)
    except ValueError as exc:
        raise ValueError(str(exc).replace("pool_mb", "--pool-mb")) from None


def _reaction_model(args, load):
    """The checkpoint that writes replies, when it is not the decision model."""
    if not args.reaction_model:
        return None
    return load(argparse.Namespace(**{**vars(args), "model": args.reaction_model}))


def _serve_local(args, load) -> int:
    import torch

    from liveserve.services.deploy.local import serve_forever, start_local
    from liveserve.services.gateway.local_http import WebServer
    from liveserve.services.observability.telemetry import serve_metrics

    settings = _local_settings(args, args.address)
    if args.http_port is not None and not 0 <= args.http_port < 65536:
        raise ValueError(f"--http-port must be in 0..65535, got {args.http_port}")
    if args.http_port and settings.tls_cert_file:
        raise ValueError("--http-port relays to the gRPC API in plaintext on this host: it does not combine with "
                         "--tls-cert")
    _check_tls(settings.to_dict())
    if args.threads:  # one process: the pools share torch's threads, all of the host's cores by default
        torch.set_num_threads(args.threads)
    metrics = web_note = ""
    if args.metrics_port:  # before the model loads: a port in use fails at once, not after the load
        host = args.metrics_host
        metrics = f"; metrics http://{host}:{serve_metrics(f'{host}:{args.metrics_port}')}/metrics"
    model = load(args)
    registry, redis_note = _local_registry(settings)
    server = start_local(model, args.address, settings, reaction_model=_reaction_model(args, load), registry=registry)
    web = None
    try:
        if args.http_port:
            web = WebServer(server.address, args.http_host, args.http_port, settings.max_frame_bytes).start()
            web_note = f"; browser page {web.url}"
    except BaseException:
        server.stop(grace_s=0)
        raise
    engine = server.engine
    print(f"liveserve: serving liveserve.api.v1.LiveStream on {server.address}{_tls_note(args)} (model {model.name} "
          f"on {model.device}; KV pool {engine.pool.nbytes / 2**20:.0f} MiB per engine, {engine.kernel.name} attention; "
          f"{redis_note}{metrics}{web_note}); Ctrl-C to stop", file=sys.stderr, flush=True)
    serve_forever(server)  # open WebSocket sessions end with their gRPC calls, then the page goes
    if web is not None:
        web.stop()
    return 0


def _local_registry(settings):
    """Where one process records its sessions (for transcripts): REDIS_URL when set (it must answer),
    else an embedded Redis when a redis-server is at hand, else nowhere."""
    from liveserve.services.state.redis_server import EmbeddedRedis, RedisUnavailable, connect
    from liveserve.services.state.registry import SessionRegistry

    url = os.environ.get("REDIS_URL")
    if not url:
        try:
            url = EmbeddedRedis().start().keep_alive().url
        except RedisUnavailable as exc:
            return None, f"no Redis ({exc}): sessions are not recorded, no transcripts"
    client, _ = connect(url)
    registry = SessionRegistry(client, ttl_s=settings.session_ttl_s, closed_ttl_s=settings.closed_ttl_s)
    return registry, f"sessions recorded in Redis {url}"


def _demo_local(args, load) -> int:
    from liveserve.services.deploy.local import start_local

    model = load(args)
    settings = _local_settings(args, "127.0.0.1:0")
    if getattr(args, "pool_mb", None) is None:
        settings = dataclasses.replace(settings, pool_mb=256)  # two engines' pools: plenty for one stream
    server = start_local(model, settings.address, settings, reaction_model=_reaction_model(args, load))
    print(f"liveserve: demo server on {server.address} (model {model.name} on {model.device}); "
          "streaming the bundled sample through it", file=sys.stderr, flush=True)
    try:
        return _stream(args, server.address)
    finally:
        server.stop(grace_s=2)
        print("liveserve: demo server stopped", file=sys.stderr)
