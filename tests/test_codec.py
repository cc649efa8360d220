"""The Ray transport's codec: every seam message survives the trip through the internal protos (and the
wire) unchanged, frame features packed as one tensor in their own dtype; bad tensors are refused."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import CacheConfig, CommentaryConfig, SessionConfig
from liveserve.engine.inputs import AwaitedReply
from liveserve.internal.v2 import decision_pb2 as dpb
from liveserve.internal.v2 import perception_pb2 as ppb
from liveserve.internal.v2 import reaction_pb2 as rpb
from liveserve.internal.v2 import session_pb2 as spb
from liveserve.internal.v2 import tensor_pb2
from liveserve.services.wire import codec, tensors
from liveserve.services.wire import contracts as c
from liveserve.services.deploy.autoscaling import BusyScaling

TRACE = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)


def wire(message, cls):
    """Through serialization, as Ray carries it."""
    return cls.FromString(message.SerializeToString())


def features(seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(10, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


def same(a, b) -> bool:
    """Dataclasses equal, tensors compared by value (dtype included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def test_an_open_keeps_every_session_setting():
    config = SessionConfig(threshold=0.4, max_new_tokens=7, temperature=0.5, top_p=0.9, seed=3, system_prompt="hi",
                           max_query_tokens=33, replies="none",
                           cache=CacheConfig(policy="sink_window", positions="original", window_frames=9,
                                             text_window_tokens=100, evict_frames=3))
    request = c.OpenSession("s", "g", config)
    assert codec.open_from_proto(wire(codec.open_to_proto(request), spb.OpenRequest)) == request
    placed = c.SessionPlaced("s", "replica-1", 4, c.Limits(256, 7, 2.0, 11))
    assert codec.placed_from_proto("s", wire(codec.placed_to_proto(placed), spb.OpenResponse)) == placed


# A value other than the default for every CommentaryConfig field.
CHANGED_COMMENTARY = {"chunk_s": 2.0, "fps": 4.0, "max_tokens_per_chunk": 9, "vision_window_chunks": 5,
                      "text_rounds": 3, "text_sink_tokens": 7, "text_window_tokens": 11, "positions": "original", "query": "who leads?",
                      "previous_text": "kick-off", "max_query_tokens": 40, "repetition_penalty": 1.05,
                      "resize": "square", "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}


def test_an_open_keeps_every_commentary_setting():
    assert set(CHANGED_COMMENTARY) == {f.name for f in dataclasses.fields(CommentaryConfig)}, \
        "a CommentaryConfig field without a value here: give it one, and carry it in codec.settings_to_proto"
    defaults = CommentaryConfig()
    assert [name for name, value in CHANGED_COMMENTARY.items() if getattr(defaults, name) == value] == []
    config = SessionConfig(mode="commentary", temperature=0.9, top_p=0.8, seed=5,
                           commentary=CommentaryConfig(**CHANGED_COMMENTARY))
    request = c.OpenSession("s", "g", config)
    assert codec.open_from_proto(wire(codec.open_to_proto(request), spb.OpenRequest)) == request


def test_settings_from_a_gateway_without_the_later_commentary_fields_get_the_defaults():
    changed = CommentaryConfig(**CHANGED_COMMENTARY)
    message = codec.settings_to_proto(SessionConfig(mode="commentary", commentary=changed))
    for name in codec._COMMENTARY_WIRE.values():
        if name not in codec._COMMENTARY_ALWAYS:
            message.ClearField(name)
    read = codec.settings_from_proto(wire(message, spb.SessionSettings)).commentary
    assert (read.chunk_s, read.fps, read.max_tokens_per_chunk, read.query) == (2.0, 4.0, 9, "who leads?")
    assert read == dataclasses.replace(CommentaryConfig(), chunk_s=2.0, fps=4.0, max_tokens_per_chunk=9,
                                       query="who leads?")


@pytest.mark.parametrize("awaited", [None, AwaitedReply(2.5, "what now?"), AwaitedReply(3.0, None)])
def test_a_moving_session_keeps_its_frames_and_the_reply_in_flight(awaited):
    frames = tuple(c.FrameFeatures("s", 0, i, i * 0.5, features(i)) for i in (4, 5, 6))
    request = c.OpenSession("s", "g", SessionConfig(), c.Restore(frames, awaited))
    assert same(codec.open_from_proto(wire(codec.open_to_proto(request), spb.OpenRequest)), request)
    placed = c.SessionPlaced("s", "replica-2", 5, c.Limits(256, 7, 2.0, 11), restored_turns=3)
    assert codec.placed_from_proto("s", wire(codec.placed_to_proto(placed), spb.OpenResponse)) == placed


def test_a_bad_session_setting_is_refused_by_the_replica_too():
    message = codec.settings_to_proto(SessionConfig())
    message.threshold = 2.0
    with pytest.raises(ValueError, match="threshold"):
        codec.settings_from_proto(message)


def test_a_tick_of_frames_and_its_features_round_trip():
    request = c.EncodeRequest((c.FrameImage("a", 0, 0.0, b"\xff\xd8jpeg", TRACE), c.FrameImage("b", 7, 3.5, b"png")))
    assert same(codec.encode_request_from_proto(wire(codec.encode_request_to_proto(request), ppb.EncodeRequest)),
                request)
    result = c.EncodeResult((features(0), None, features(1)), ("", "bad frame image at 1.000s: no", ""), 0.25)
    message = codec.encode_result_to_proto(result)
    assert message.features.dtype == "bfloat16" and list(message.features.shape) == [2, 10, 8]  # one tensor
    assert same(codec.encode_result_from_proto(wire(message, ppb.EncodeResponse)), result)


def test_decision_pushes_and_events_round_trip():
    push = c.DecisionPush("g", (c.FrameFeatures("a", 1, 0, 0.0, features(2), TRACE), c.QueryText("a", 1, 0.5, "what?"),
                                c.FrameFeatures("b", 2, 5, 1.0, features(3)), c.ReplyText("a", 1, "hello", (5, 6)),
                                c.CloseSession("b", 2, False)))
    assert same(codec.decision_push_from_proto(wire(codec.decision_push_to_proto(push), dpb.DecisionPush)), push)
    events = c.EventBatch((c.Decision("a", 0, 0.0, 0.25, True, c.Action.RESPOND, TRACE),
                           c.Decision("a", 1, 0.5, 0.9, False, c.Action.SUPPRESSED),
                           c.FramesDropped("b", (3, 4), (1.5, 2.0), "lagging"),
                           c.ReplyRequested("a", c.Trigger.QUERY, 0.5, "what?", 1, TRACE),
                           c.Refused("b", "query", -1, "query is empty"),
                           c.SessionClosed("b", 5, 2, 1, 3, 8, "cache full")))
    back = codec.decision_events_from_proto(wire(codec.decision_events_to_proto(events), dpb.DecisionEvents))
    assert back.events[0].p_silent == pytest.approx(0.25)
    assert same(back.events[2:], events.events[2:]) and back.events[1].action is c.Action.SUPPRESSED


def test_reaction_pushes_and_events_round_trip():
    frames = (c.FrameFeatures("a", 0, 3, 1.5, features(4)), c.FrameFeatures("a", 0, 4, 2.0, features(5)))
    push = c.ReactionPush("g", (c.SyncFrames("a", 3, frames), c.Respond("a", c.Trigger.PROACTIVE, 2.0, "", TRACE),
                                c.CloseSession("a", 1, False)))
    assert same(codec.reaction_push_from_proto(wire(codec.reaction_push_to_proto(push), rpb.ReactionPush)), push)
    events = c.EventBatch((c.ResponseStarted("a", 2.0, c.Trigger.PROACTIVE, ""), c.ResponseDelta("a", "hi", 2),
                           c.ResponseDone("a", "hi there", 3, "length", 0.01, 0.02, (1, 2, 3)),
                           c.ResponseFailed("b", "gone")))
    back = codec.reaction_events_from_proto(wire(codec.reaction_events_to_proto(events), rpb.ReactionEvents))
    assert same(back.events[:2], events.events[:2]) and same(back.events[3], events.events[3])
    done = back.events[2]
    assert done.token_ids == (1, 2, 3) and done.finish_reason == "length" and done.ttft_s == pytest.approx(0.01)


def test_tensors_keep_their_dtype_and_refuse_a_wrong_size():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        tensor = (torch.arange(12) % 7).reshape(3, 4).to(dtype)
        back = tensors.from_message(tensors.to_message(tensor))
        assert back.dtype == dtype and torch.equal(back, tensor)
    rows = tensors.unpack(tensors.pack([features(6), features(7)]), 2)
    assert torch.equal(rows[1], features(7))
    with pytest.raises(ValueError, match="needs 48 bytes, got 47"):
        tensors.from_message(tensor_pb2.Tensor(shape=[3, 4], dtype="float32", data=b"\0" * 47))
    with pytest.raises(ValueError, match="unknown tensor dtype 'int128'"):
        tensors.from_message(tensor_pb2.Tensor(shape=[1], dtype="int128", data=b"\0"))
    with pytest.raises(ValueError, match="expected 3 stacked rows"):
        tensors.unpack(tensors.pack([features(0), features(1)]), 3)


def test_frames_of_different_sizes_travel_in_one_tensor():
    """A commentary model's frames keep their sources' aspect ratios: one push holds several sizes."""
    frames = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((364, 644), (644, 364), (476, 476))]
    back = tensors.unpack(wire(tensors.pack(frames), tensor_pb2.Tensor), 3)
    assert [tuple(f.shape) for f in back] == [tuple(f.shape) for f in frames]
    assert all(torch.equal(a, b) for a, b in zip(back, frames))
    with pytest.raises(ValueError, match="do not describe 2 rows"):
        tensors.unpack(tensors.pack(frames), 2)


def test_perception_scales_on_how_busy_its_encoders_are():
    policy = BusyScaling(target_busy=0.5)
    assert policy.desired([0.0]) == 1
    assert policy.desired([0.9]) == 2
    assert policy.desired([0.9, 0.8, 0.7]) == 5
    assert policy.desired([0.1, 0.1]) == 1  # idle capacity can go
    with pytest.raises(ValueError, match="target_busy"):
        BusyScaling(target_busy=0.0)


def test_each_internal_message_mirrors_its_dataclass():
    """The codec converts by name: each oneof case is its contract class, named after it, with its fields."""
    mirrored = []
    for oneof, union in codec.ONEOFS.items():
        cases = {field.name: field.message_type for field in oneof.DESCRIPTOR.oneofs_by_name["kind"].fields}
        classes = typing.get_args(union)
        assert set(cases) == {codec.case_name(cls) for cls in classes}, oneof.DESCRIPTOR.name
        for cls in classes:
            message = cases[codec.case_name(cls)]
            assert message.name == cls.__name__
            if cls not in codec.BY_HAND:
                mirrored.append((cls, message))
    mirrored.append((c.FrameImage, ppb.FrameImage.DESCRIPTOR))
    for cls, message in mirrored:
        assert _wire_names(cls) == set(message.fields_by_name), message.name
    assert _wire_names(c.Limits) <= set(pb.Limits.DESCRIPTOR.fields_by_name)  # and the gateway's max_frame_bytes
    assert codec.case_name(c.ResponseStarted) == "response_started" and codec.case_name(c.Refused) == "refused"


def _wire_names(cls) -> set[str]:
    """The fields `cls` has on the wire: `trace` as its map, features outside the message."""
    return {codec.TRACE_FIELD if f.name == "trace" else f.name for f in dataclasses.fields(cls)} - {codec.PACKED}


def test_a_message_of_all_defaults_keeps_its_case():
    push = c.DecisionPush("g", (c.CloseSession("", 0, False),))
    assert codec.decision_push_from_proto(wire(codec.decision_push_to_proto(push), dpb.DecisionPush)) == push
    events = c.EventBatch((c.SessionClosed(""), c.ResponseFailed("", "")))
    assert codec.reaction_events_from_proto(wire(codec.reaction_events_to_proto(
        c.EventBatch(events.events[1:])), rpb.ReactionEvents)) == c.EventBatch(events.events[1:])
    assert codec.decision_events_from_proto(wire(codec.decision_events_to_proto(
        c.EventBatch(events.events[:1])), dpb.DecisionEvents)) == c.EventBatch(events.events[:1])
