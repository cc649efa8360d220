"""Several models in one deployment: the `models` setting, its checks, and on real Ray Serve (the test
session's application serves "quiet", the default, "terse", with its own Decision and Reaction pools
and settings, sharing quiet's Perception pool, and "narrator", a commentary model): ListModels,
`liveserve models`, Open.model choosing the pools a session lives on, an unknown name refused with the
list, a commentary session, and the load tester mixing models."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import grpc
import pytest
import redis

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.services.state.registry import SessionRegistry
from liveserve.services.settings import ServiceSettings
from stream_helpers import LiveCall, jpeg, kinds, stream


def test_one_model_keeps_its_name_and_the_plain_deployment_names():
    (model,) = ServiceSettings(model="tiny").served_models()
    assert (model.name, model.family, model.is_default) == ("tiny", "live", True)
    assert (model.perception_pool, model.decision_pool, model.reaction_pool) == ("Perception", "Decision", "Reaction")


def test_each_model_gets_its_settings_and_pools_the_default_first():
    settings = ServiceSettings(max_new_tokens=32, default_model="big", models={
        "small": {"path": "tiny", "threshold": 0.6},
        "big": {"path": "default", "reaction_path": "tiny", "window_frames": 16},
        "twin": {"path": "tiny", "perception": "small", "max_new_tokens": 8}})
    small, big, twin = sorted(settings.served_models(), key=lambda m: ["small", "big", "twin"].index(m.name))
    assert [m.name for m in settings.served_models()] == ["big", "small", "twin"]
    assert (big.decision_pool, big.reaction_pool, big.perception_pool) == ("Decision", "Reaction", "Perception")
    assert (small.decision_pool, small.perception_pool) == ("Decision-small", "Perception-small")
    assert (twin.decision_pool, twin.perception_pool) == ("Decision-twin", "Perception-small")  # shared
    assert (big.settings.model, big.settings.reaction_model, big.settings.window_frames) == ("default", "tiny", 16)
    assert small.settings.threshold == 0.6 and small.settings.max_new_tokens == 32  # the deployment's, unless set
    assert twin.settings.max_new_tokens == 8 and twin.settings.models is None


@pytest.mark.parametrize("settings, message", [
    ({"models": {}}, "models must map model names"),
    ({"models": {"a b": {"path": "tiny"}}}, "model name 'a b'"),
    ({"models": {"a": {}}}, "models.a needs a path"),
    ({"models": {"a": {"path": "tiny", "address": "x:1"}}}, "models.a: unknown key(s) address"),
    ({"models": {"a": {"path": "tiny", "family": "gemma2"}}}, "family 'gemma2' is not served; known: live, qwen2_5_vl"),
    ({"models": {"a": {"path": "tiny", "family": "qwen2_5_vl"}}}, "family 'qwen2_5_vl', but tiny holds a 'live' model"),
    ({"models": {"a": {"path": "tiny"}, "b": {"path": "tiny-commentary", "perception": "a"}}},
     "models.b: perception names 'a', a model of another family"),
    ({"models": {"a": {"path": "tiny", "perception": "b"}}}, "perception must name a model of `models`"),
    ({"models": {"a": {"path": "tiny"}, "b": {"path": "tiny", "perception": "a"},
                 "c": {"path": "tiny", "perception": "b"}}}, "models.c: perception must name"),
    ({"models": {"a": {"path": "tiny", "window_frames": 1}}}, "models.a: threads, max_batch_size"),
    ({"models": {"a": {"path": "tiny"}}, "default_model": "b"}, "default_model 'b' is not one of models: a"),
    ({"models": {"a": {"path": "tiny"}}, "model": "tiny"}, "set either model"),
    ({"default_model": "other"}, "default_model 'other' is not served"),
])
def test_bad_models_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValueError) as err:
        ServiceSettings.from_dict(settings)
    assert message in str(err.value)


def test_a_commentary_model_deploys_without_a_reaction_pool(qwen_dir):
    """The bundled Serve config has options for "Reaction": a commentary default model has no such
    deployment, so the launcher leaves them out (Serve refuses options for a deployment it lacks)."""
    from liveserve.orchestration.launch import load_config

    (app,) = load_config(args={"model": str(qwen_dir)})["applications"]
    names = {entry["name"] for entry in app["deployments"]}
    assert "Reaction" not in names and {"Gateway", "Perception", "Decision"} <= names
    (app,) = load_config(args={"models": {"live": {"path": "tiny"}, "narrator": {"path": str(qwen_dir)}}})["applications"]
    assert "Reaction" in {entry["name"] for entry in app["deployments"]}  # the live default model's


def test_several_models_need_ray_not_one_process(tiny_model):
    from liveserve.services.deploy.local import start_local

    with pytest.raises(ValueError, match="needs `liveserve serve` on Ray"):
        start_local(tiny_model, settings=ServiceSettings(models={"a": {"path": "tiny"}}))


# ---- on Ray ------------------------------------------------------------------------------------------------


def list_models(address: str) -> list[pb.ModelInfo]:
    with grpc.insecure_channel(address) as channel:
        return list(pb_grpc.LiveStreamStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models)


def sessions_of(deployment: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name="liveserve").Sessions.remote().result(timeout_s=30)


def test_list_models_names_every_model_the_default_first(ray_app):
    models = list_models(ray_app.address)
    assert [(m.name, m.is_default, m.family, m.mode) for m in models] == [
        ("quiet", True, "live", "live"), ("terse", False, "live", "live"),
        ("narrator", False, "qwen2_5_vl", "commentary")]
    assert models[0].max_new_tokens == 8 and models[1].max_new_tokens == 4
    assert models[1].threshold == pytest.approx(0.5) and models[1].window_frames == 8


def test_liveserve_models_prints_them(ray_app, capsys):
    from liveserve.cli import main

    assert main(["models", "--address", ray_app.address]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "DEFAULT", "FAMILY", "MODE", "THRESHOLD", "MAX_NEW_TOKENS", "CACHE"]
    assert table[1].split()[:4] == ["quiet", "yes", "live", "live"]
    assert table[2].split()[:4] == ["terse", "live", "live", "0.5"]
    assert table[3].split()[:3] == ["narrator", "qwen2_5_vl", "commentary"]
    assert main(["models", "--address", ray_app.address, "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["quiet", "terse", "narrator"]


def test_open_model_places_the_session_on_that_models_pools(ray_app):
    registry = SessionRegistry(redis.Redis.from_url(ray_app.redis_url, decode_responses=True))
    calls = {name: LiveCall(ray_app.address, pb.Open(model=name, fps=2.0, threshold=1.0)) for name in ("terse", "")}
    try:
        opened = {name: call.wait_for(lambda call=call: call.of_kind("opened"))[0] for name, call in calls.items()}
        assert opened["terse"].limits.max_new_tokens == 4 and opened[""].limits.max_new_tokens == 8
        for i in range(3):
            for call in calls.values():
                call.send(pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.5, image=jpeg(i))))
        for call in calls.values():
            call.wait_for(lambda call=call: len(call.of_kind("decision")) == 3)
        terse = sessions_of("Decision-terse")
        assert opened["terse"].session_id in terse["sessions"] and opened[""].session_id not in terse["sessions"]
        assert registry.get(opened["terse"].session_id).owner == terse["replica"]
        assert registry.get(opened[""].session_id).owner != terse["replica"]
        replies = [call.close() for call in calls.values()]
    finally:
        for call in calls.values():
            if not call.done:
                call.close()
    for reply in replies:
        assert reply[-1].WhichOneof("kind") == "closed" and reply[-1].closed.frames_decided == 3
    # The gateway counts sessions by model (Ray exports metrics every few seconds).
    opened = re.compile(r'ray_liveserve_sessions_opened_total\{[^}]*model="terse"')
    deadline = time.monotonic() + 60
    while not opened.search(scrape(ray_app.metrics_url)):
        assert time.monotonic() < deadline, "no sessions_opened_total series for model terse"
        time.sleep(0.5)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_an_unknown_model_is_not_found_with_the_names_served(ray_app):
    with pytest.raises(grpc.RpcError) as err:
        stream(ray_app.address, [pb.ClientMessage(open=pb.Open(model="gpt-17"))])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'gpt-17'" in err.value.details() and "'quiet', 'terse', 'narrator'" in err.value.details()


def test_a_commentary_model_narrates_a_session_on_ray(ray_app):
    """The commentary model's frames go through its own Perception pool as pixels, its Decision replica
    encodes each chunk and writes what it says (no Reaction pool): the said text streams back over the
    Ray transport's codec, and the transcript records it."""
    replies = stream(ray_app.address, [pb.ClientMessage(open=pb.Open(
        model="narrator", fps=2.0, commentary=pb.CommentaryOptions(max_tokens_per_chunk=3)))]
        + [pb.ClientMessage(frame=pb.Frame(timestamp=i * 0.5, image=jpeg(i))) for i in range(4)]
        + [pb.ClientMessage(close=pb.Close())])
    assert kinds(replies)[0] == "opened" and kinds(replies)[-1] == "closed", kinds(replies)
    decisions = [r.decision for r in replies if r.WhichOneof("kind") == "decision"]
    assert [d.frame_index for d in decisions] == [0, 1, 2, 3]
    done = [r.response_done for r in replies if r.WhichOneof("kind") == "response_done"]
    # The tiny random model says something (never the no-comment marker) about both chunks.
    assert len(done) == 2 == replies[-1].closed.responses and all(d.fired for d in decisions)
    assert all(d.trigger == pb.TRIGGER_COMMENTARY and 0 < d.num_tokens <= 3 for d in done)
    said = "".join(r.response_delta.text for r in replies if r.WhichOneof("kind") == "response_delta")
    assert said == "".join(d.text for d in done)
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(ray_app.address) as channel:
        while True:  # Decision records each turn in the registry as it is said
            transcript = pb_grpc.LiveStreamStub(channel).GetTranscript(
                pb.GetTranscriptRequest(session_id=replies[0].opened.session_id), timeout=10)
            turns = [t.text for t in transcript.turns if t.role == pb.ROLE_ASSISTANT]
            if len(turns) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert turns == [d.text for d in done]


def test_the_load_tester_mixes_models_and_reports_each(ray_app):
    from liveserve.loadtest.config import LoadConfig
    from liveserve.loadtest.runner import run

    report = run(LoadConfig(address=ray_app.address, sessions=4, duration_s=2.0, fps=2.0, frame_size=64,
                            models=("quiet", "terse"), slo_ms=60_000))
    (level,) = report.levels
    assert set(level.by_model) == {"quiet", "terse"}
    for figures in level.by_model.values():
        assert figures["sessions"] == 2 and figures["sessions_sustained"] == 2 and figures["frames_decided"] > 0
    from liveserve.loadtest.report import render_html, summary_text

    text = summary_text(report)
    assert "4 sessions, model quiet: 2 sessions (2 sustained)" in text and "model terse" in text
    page = render_html(report, [])
    assert page.index("<th class=l>model</th>") < page.index("<td class=l>terse</td>")


def test_features_from_another_vision_tower_are_refused_with_the_reason(tiny_model):
    """A model whose `perception` names a model with another tower gets features of the wrong shape: each
    frame is refused saying so (the gateway turns it into a BAD_FRAME warning), the session goes on."""
    import asyncio

    import torch

    from liveserve.services.wire import contracts as c
    from liveserve.services.decision.service import DecisionService

    settings = ServiceSettings(model="tiny", pool_mb=8)
    service = DecisionService(tiny_model, settings, "replica-1")

    async def push_and_read() -> list:
        placed = await service.open(c.OpenSession("s1", "g1", settings.session_defaults()))
        wrong = torch.zeros(tiny_model.layout.num_tokens, tiny_model.vision_hidden_size + 8)
        right = torch.zeros(tiny_model.layout.num_tokens, tiny_model.vision_hidden_size)
        await service.push(c.DecisionPush("g1", (c.FrameFeatures("s1", placed.epoch, 0, 0.0, wrong),
                                                 c.FrameFeatures("s1", placed.epoch, 1, 0.5, right))))
        events = []
        async for batch in service.events("g1"):
            events += batch.events
            if any(isinstance(event, c.Decision) for event in events):
                return events

    try:
        events = asyncio.run(asyncio.wait_for(push_and_read(), 30))
    finally:
        service.stop()
    refused = [event for event in events if isinstance(event, c.Refused)]
    assert len(refused) == 1 and refused[0].frame_id == 0 and "runs another vision tower" in refused[0].message
    assert [event.frame_id for event in events if isinstance(event, c.Decision)] == [1]


def test_a_resumed_session_keeps_its_model(ray_app):
    """A broken connection's session resumes on its own model's pools; naming another model is refused,
    and the token stays good for the right Open."""
    import queue

    channel = grpc.insecure_channel(ray_app.address)
    outbox: queue.Queue = queue.Queue()
    call = pb_grpc.LiveStreamStub(channel).Stream(iter(outbox.get, None), timeout=60)
    outbox.put(pb.ClientMessage(open=pb.Open(model="terse", fps=2.0, threshold=0.0)))
    replies = iter(call)
    opened = next(replies).opened
    outbox.put(pb.ClientMessage(frame=pb.Frame(timestamp=0.0, image=jpeg(0))))
    assert next(reply for reply in replies if reply.WhichOneof("kind") == "decision").decision.frame_index == 0
    call.cancel()  # the connection breaks: the session is parked for resuming
    outbox.put(None)
    channel.close()

    resume = dict(resume_session_id=opened.session_id, resume_token=opened.resume_token, fps=2.0, threshold=0.0)
    deadline = time.monotonic() + 20
    while True:  # parking happens just after the cut: NOT_FOUND until it is done
        with pytest.raises(grpc.RpcError) as err:
            stream(ray_app.address, [pb.ClientMessage(open=pb.Open(model="quiet", **resume))])
        if err.value.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "runs model 'terse'" in err.value.details()

    again = LiveCall(ray_app.address, pb.Open(**resume))  # no model named: the session's own
    try:
        reopened = again.wait_for(lambda: again.of_kind("opened"))[0]
        assert reopened.session_id == opened.session_id and reopened.limits.max_new_tokens == 4
        assert opened.session_id in sessions_of("Decision-terse")["sessions"]
        again.send(pb.ClientMessage(frame=pb.Frame(timestamp=0.5, image=jpeg(1))))
        again.wait_for(lambda: again.of_kind("decision"))
    finally:
        again.close()


def test_engine_settings_reach_the_decision_and_reaction_engines(tiny_model):
    """`attention` and `cuda_graphs` configure both engines of a deployment; a kernel name it does not know
    is refused with the settings, and a kernel or graphs that cannot run on the replica fail its start."""
    from liveserve.services.reaction.service import ReactionService

    settings = ServiceSettings.from_dict({"attention": "flex", "pool_mb": 64})
    assert settings.engine_config().attention == "flex" and settings.engine_config().cuda_graphs is False
    reaction = ReactionService(tiny_model, settings, replica="test")
    assert reaction.engine.kernel.name == "flex"
    reaction.engine.shutdown()
    with pytest.raises(ValueError, match="attention must be one of"):
        ServiceSettings.from_dict({"attention": "fastest"})
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        ReactionService(tiny_model, ServiceSettings.from_dict({"cuda_graphs": True, "pool_mb": 64}), replica="test")
