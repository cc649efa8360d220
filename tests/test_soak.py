"""A soak: N live streams for M minutes against one server with a real Redis, sessions coming and going,
queries now and then. Memory must stay flat (the process's RSS, the KV pool) and everything must be
released at the end. Outside CI: LIVESERVE_SOAK_MINUTES=10 LIVESERVE_SOAK_STREAMS=16 pytest -m slow -s
tests/test_soak.py; figures go to out/soak.json (docs/operations.md quotes them)."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import pytest
import redis

from engine_helpers import steered
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings
from stream_helpers import LiveCall, jpeg


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_memory_stays_flat_over_a_soak(tiny_model, redis_url):
    minutes = float(os.environ.get("LIVESERVE_SOAK_MINUTES", "1"))
    streams = int(os.environ.get("LIVESERVE_SOAK_STREAMS", "8"))
    fps, session_s = 2.0, 60.0  # each stream reconnects every minute: sessions come and go all along
    kwargs = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    url = f"redis://{kwargs['host']}:{kwargs['port']}/8"
    redis.Redis.from_url(url).flushdb()
    server = start_local(steered(tiny_model, interval_bias=8.0, eos_bias=7.8), "127.0.0.1:0",
                         ServiceSettings(max_new_tokens=8, window_frames=16, pool_mb=64, max_frame_bytes=64 << 10),
                         redis_url=url)
    images = [jpeg(i) for i in range(16)]
    end = time.monotonic() + minutes * 60
    counts = {"sessions": 0, "decisions": 0, "replies": 0, "errors": 0}
    lock = threading.Lock()

    def stream(k: int) -> None:
        rng = random.Random(k)
        time.sleep(k / streams / fps)  # staggered phases
        while time.monotonic() < end:
            call = LiveCall(server.address, pb.Open(fps=fps))
            started, i = time.monotonic(), 0
            while time.monotonic() < min(end, started + session_s):
                call.send(pb.ClientMessage(frame=pb.Frame(timestamp=i / fps, image=images[i % 16])))
                if rng.random() < 0.02:
                    call.send(pb.ClientMessage(query=pb.Query(timestamp=i / fps, text="what changed?")))
                i += 1
                time.sleep(max(0.0, started + i / fps - time.monotonic()))
            try:
                call.close()
            except Exception:
                with lock:
                    counts["errors"] += 1
            with lock:
                counts["sessions"] += 1
                counts["decisions"] += len(call.of_kind("decision"))
                counts["replies"] += len(call.of_kind("response_done"))

    threads = [threading.Thread(target=stream, args=(k,), daemon=True) for k in range(streams)]
    samples = []
    try:
        for thread in threads:
            thread.start()
        started = time.monotonic()
        while any(thread.is_alive() for thread in threads):
            samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(rss_mb(), 1),
                            "kv_reserved": round(server.engine.pool.reserved_fraction, 4),
                            "sessions": len(server.engine.sessions)})
            time.sleep(5)
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 20
        while (server.engine.sessions or server.reaction.engine.sessions) and time.monotonic() < deadline:
            time.sleep(0.1)
        after = {"decision_sessions": len(server.engine.sessions), "reaction_sessions": len(server.reaction.engine.sessions),
                 "kv_reserved": server.engine.pool.reserved_fraction}
    finally:
        server.stop(grace_s=1)
    warm = [s["rss_mb"] for s in samples if s["t_s"] >= min(60.0, minutes * 15)]  # after the first minute or quarter
    report = {"minutes": minutes, "streams": streams, "fps": fps, **counts, "after": after,
              "rss_mb_first": warm[0] if warm else None, "rss_mb_last": warm[-1] if warm else None,
              "rss_mb_max": max(warm) if warm else None, "samples": samples}
    Path("out").mkdir(exist_ok=True)
    Path("out/soak.json").write_text(json.dumps(report, indent=1))
    print(f"\nsoak: {json.dumps({k: v for k, v in report.items() if k != 'samples'})}")
    assert counts["errors"] == 0 and counts["decisions"] > 0
    assert after == {"decision_sessions": 0, "reaction_sessions": 0, "kv_reserved": 0.0}
    assert warm and max(warm) - warm[0] < max(32.0, 0.1 * warm[0]), "RSS kept growing"
