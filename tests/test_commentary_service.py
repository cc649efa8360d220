"""Commentary over the public LiveStream API, served from one process (`serve --local`) over real gRPC on
127.0.0.1: a Qwen2.5-VL model's Decision writes what it says, chunk by chunk, with no Reaction pool."""

from __future__ import annotations

import grpc
import pytest

from stream_helpers import jpeg, kinds, stream
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings


@pytest.fixture(scope="module")
def server(qwen):
    settings = ServiceSettings(max_frame_bytes=64 << 10, pool_mb=64, max_lag_s=600.0, max_frame_pixels=1_000_000)
    local = start_local(qwen, "127.0.0.1:0", settings)
    yield local
    local.stop(grace_s=1)


def messages(frames: int, open_: pb.Open | None = None, query: tuple[int, str] | None = None):
    yield pb.ClientMessage(open=open_ or pb.Open(fps=2.0, commentary=pb.CommentaryOptions(max_tokens_per_chunk=3)))
    for i in range(frames):
        if query is not None and query[0] == i:
            yield pb.ClientMessage(query=pb.Query(timestamp=i * 0.5, text=query[1]))
        yield pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.5, image=jpeg(i)))
    yield pb.ClientMessage(close=pb.Close())


def test_a_commentary_session_end_to_end(server):
    replies = stream(server.address, messages(6, query=(2, "Who is winning?")))
    assert kinds(replies)[0] == "opened" and kinds(replies)[-1] == "closed"
    decisions = [r.decision for r in replies if r.WhichOneof("kind") == "decision"]
    assert [d.frame_index for d in decisions] == list(range(6))  # every frame, when its chunk was answered
    assert [d.timestamp for d in decisions] == [i * 0.5 for i in range(6)]
    done = [r.response_done for r in replies if r.WhichOneof("kind") == "response_done"]
    started = [r.response_started for r in replies if r.WhichOneof("kind") == "response_started"]
    assert len(started) == len(done) == sum(d.fired for d in decisions) // 2  # two frames a chunk
    assert all(s.trigger == pb.TRIGGER_COMMENTARY for s in started)
    assert all(d.trigger == pb.TRIGGER_COMMENTARY and d.num_tokens <= 3 for d in done)
    deltas = "".join(r.response_delta.text for r in replies if r.WhichOneof("kind") == "response_delta")
    assert deltas == "".join(d.text for d in done)
    assert replies[-1].closed.frames_decided == 6 and replies[-1].closed.responses == len(done)
    assert not server.engine.sessions


def test_close_answers_the_last_partly_filled_chunk(server):
    """Three frames at 2 a chunk: Close drains, so the third frame's chunk (padded) is answered too."""
    replies = stream(server.address, messages(3))
    decisions = [r.decision for r in replies if r.WhichOneof("kind") == "decision"]
    assert [d.frame_index for d in decisions] == [0, 1, 2]
    assert replies[-1].closed.frames_decided == 3


def test_list_models_names_the_family_and_its_mode(server):
    with grpc.insecure_channel(server.address) as channel:
        (model,) = pb_grpc.LiveStreamStub(channel).ListModels(pb.ListModelsRequest(), timeout=30).models
    assert model.family == "qwen2_5_vl" and model.mode == "commentary"


@pytest.mark.parametrize("open_, message", [
    (pb.Open(mode="live"), "mode 'live': this model runs 'commentary'"),
    (pb.Open(decisions_only=True), "decisions_only is for live mode"),
    (pb.Open(fps=3.0), "groups of 2"),
])
def test_an_open_the_model_cannot_run_is_refused(server, open_, message):
    with pytest.raises(grpc.RpcError) as err:
        stream(server.address, messages(1, open_))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_an_open_picks_the_commentary_decoding_over_the_deployments_default():
    from dataclasses import replace

    from liveserve.services.wire.messages import session_config

    def resolved(open_: pb.Open, **settings):
        defaults = replace(ServiceSettings(model="tiny-commentary", **settings).session_defaults(), mode="commentary")
        config = session_config(open_, defaults, ("commentary",))
        return config.temperature, config.top_p, config.commentary.repetition_penalty, config.seed

    assert resolved(pb.Open()) == (0.0, 1.0, 1.0, 0)  # greedy unless the deployment or the Open says otherwise
    assert resolved(pb.Open(), commentary_decoding="reference") == pytest.approx((0.9, 1.0, 1.05, 0))
    reference = pb.CommentaryOptions(decoding="reference")
    assert resolved(pb.Open(commentary=reference)) == pytest.approx((0.9, 1.0, 1.05, 0))
    chosen = pb.CommentaryOptions(decoding="reference", temperature=0.5, top_p=0.8, seed=7)
    assert resolved(pb.Open(commentary=chosen)) == pytest.approx((0.5, 0.8, 1.05, 7))
    greedy = pb.CommentaryOptions(decoding="greedy", repetition_penalty=1.2)
    assert resolved(pb.Open(commentary=greedy), commentary_decoding="reference") == pytest.approx((0.0, 1.0, 1.2, 0))
    with pytest.raises(ValueError, match="decoding 'nucleus'"):
        resolved(pb.Open(commentary=pb.CommentaryOptions(decoding="nucleus")))
    with pytest.raises(ValueError, match="commentary_decoding must be one of greedy, reference"):
        ServiceSettings(commentary_decoding="sampled")
    live = ServiceSettings(model="tiny", commentary_decoding="reference").session_defaults()
    assert live.temperature == 0.0  # a LIVE model's replies keep their own decoding


def test_a_session_opened_with_the_reference_decoding_samples_from_its_seed(server):
    def said(options: pb.CommentaryOptions) -> str:
        replies = stream(server.address, messages(6, pb.Open(fps=2.0, commentary=options)))
        return "".join(r.response_delta.text for r in replies if r.WhichOneof("kind") == "response_delta")

    sampled = pb.CommentaryOptions(max_tokens_per_chunk=3, decoding="reference", seed=5)
    assert said(sampled) == said(sampled) != said(pb.CommentaryOptions(max_tokens_per_chunk=3))


def test_an_open_picks_how_frames_are_sized_over_the_deployments_default():
    from dataclasses import replace

    from liveserve.services.wire.messages import session_config

    def resize(open_: pb.Open, **settings) -> str:
        defaults = replace(ServiceSettings(model="tiny-commentary", **settings).session_defaults(), mode="commentary")
        return session_config(open_, defaults, ("commentary",)).commentary.resize

    square = pb.Open(commentary=pb.CommentaryOptions(resize="square"))
    assert (resize(pb.Open()), resize(square)) == ("smart", "square")  # the reference's, unless the Open says
    assert resize(pb.Open(), commentary_resize="square") == "square"
    assert resize(pb.Open(commentary=pb.CommentaryOptions(resize="smart")), commentary_resize="square") == "smart"
    with pytest.raises(ValueError, match="resize must be one of smart, square"):
        resize(pb.Open(commentary=pb.CommentaryOptions(resize="crop")))
    with pytest.raises(ValueError, match="commentary_resize must be one of smart, square"):
        ServiceSettings(commentary_resize="crop")
