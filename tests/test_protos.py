"""The committed gRPC stubs are what protos/ generates, and the public contract has the promised shape."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_are_current(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    generated = gen.generate(tmp_path)
    assert generated
    for path in generated:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `python scripts/gen_protos.py`"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `python scripts/gen_protos.py`"


def test_public_stream_is_bidirectional_and_versioned():
    from liveserve.api.v1 import live_stream_pb2 as pb

    method = pb.DESCRIPTOR.services_by_name["LiveStream"].methods_by_name["Stream"]
    assert method.client_streaming and method.server_streaming
    assert pb.DESCRIPTOR.package == "liveserve.api.v1"
    message = pb.ClientMessage(frame=pb.Frame(timestamp=1.5, image=b"\xff\xd8"))
    assert pb.ClientMessage.FromString(message.SerializeToString()).WhichOneof("kind") == "frame"
    opened = pb.ServerMessage(opened=pb.SessionOpened(session_id="s", limits=pb.Limits(max_frame_bytes=4 << 20)))
    assert opened.opened.limits.max_frame_bytes == 4 << 20
    assert not pb.Open().HasField("threshold")  # optional: unset means the server default


def test_generated_package_imports_cleanly():
    from liveserve.api.v1 import live_stream_pb2_grpc

    assert hasattr(live_stream_pb2_grpc, "LiveStreamServicer")
    assert hasattr(live_stream_pb2_grpc, "add_LiveStreamServicer_to_server")
