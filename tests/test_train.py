"""Training: feature caching, the loss going down, checkpoint + resume, and the saved model serving a Session."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from liveserve.config import SessionConfig
from liveserve.data.synthetic import write_dataset
from liveserve.engine.events import FrameDecision, ResponseDone
from liveserve.engine.live.session import Session
from liveserve.model.loading import load_model
from liveserve.train.config import TrainConfig
from liveserve.train.features import FEATURE_DIR, load_features, vision_fingerprint
from liveserve.train.trainer import CHECKPOINT, TRAIN_LOG, compute_loss, load_samples, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth"), num_videos=3, seed=5)


@pytest.fixture
def fresh(tiny_dir):
    """A model of its own per test: training changes it in place."""
    return lambda: load_model(tiny_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add spin-wait overhead
    yield
    torch.set_num_threads(threads)


def quiet(_message: str) -> None:
    pass


def test_features_are_cached_by_tower_fingerprint(tiny_model, dataset):
    from liveserve.data.dialogue import load_dialogues

    dialogues = load_dialogues(dataset / "dialogues.json")
    seen = []
    first = load_features(tiny_model, dataset, dialogues, lambda done, total, cached: seen.append(cached))
    again = load_features(tiny_model, dataset, dialogues, lambda done, total, cached: seen.append(cached))
    assert seen == [False] * 3 + [True] * 3 or seen == [True] * 6  # another test may have filled the cache
    files = sorted((dataset / FEATURE_DIR / vision_fingerprint(tiny_model)).rglob("*.safetensors"))
    assert len(files) == 3
    for d in dialogues:
        assert torch.equal(first[d.video], again[d.video])
        assert first[d.video].shape == (d.num_frames, 10, tiny_model.vision_hidden_size)
    stored = load_file(str(files[0]))["features"]
    assert stored.dtype == torch.float32


def mean_losses(model, samples) -> tuple[float, float]:
    with torch.no_grad():
        losses = [compute_loss(model, s) for s in samples]
    return sum(x.stream for x in losses) / len(losses), sum(x.lm for x in losses) / len(losses)


def test_short_training_lowers_stream_and_lm_losses(fresh, dataset, tmp_path):
    model = fresh()
    samples = load_samples(model, dataset)
    stream_before, lm_before = mean_losses(model, samples)
    config = TrainConfig(str(dataset), str(tmp_path / "run"), steps=8, grad_accum=1, lr=3e-3, lora_dropout=0.0,
                         log_every=4, seed=1)
    result = train(config, model, log=quiet)
    model.eval()
    stream_after, lm_after = mean_losses(model, samples)
    assert stream_after < stream_before - 0.5 and lm_after < lm_before - 0.5, \
        (stream_before, stream_after, lm_before, lm_after)
    log = [json.loads(line) for line in (tmp_path / "run" / TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8] and all(r["stream_loss"] > 0 and r["lm_loss"] > 0 for r in log)
    assert result.steps == 8 and (tmp_path / "run" / CHECKPOINT).is_file()


def test_resume_continues_from_the_saved_step(fresh, dataset, tmp_path):
    def config(out: str, resume: bool = False) -> TrainConfig:
        return TrainConfig(str(dataset), str(tmp_path / out), steps=4, grad_accum=2, lr=1e-3, save_every=2,
                           log_every=1, seed=3, resume=resume)

    straight = train(config("a"), fresh(), log=quiet)

    class Stop(Exception):
        pass

    def stop_at_step_3(message: str) -> None:
        if message.startswith("step 3/"):
            raise Stop  # after step 2's checkpoint, before step 3's

    with pytest.raises(Stop):
        train(config("b"), fresh(), log=stop_at_step_3)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["step"] == 2
    messages = []
    resumed = train(config("b", resume=True), fresh(), log=messages.append)
    assert any(m.startswith("resumed from") and "at step 2/4" in m for m in messages)
    assert resumed.steps == 4
    a, b = load_file(str(straight.model_dir / "connector.safetensors")), \
        load_file(str(resumed.model_dir / "connector.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / TRAIN_LOG).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the log is appended to, not restarted


def test_full_mode_saves_a_loadable_model_that_runs_a_session(fresh, dataset, tmp_path):
    model = fresh()
    result = train(TrainConfig(str(dataset), str(tmp_path / "full"), mode="full", steps=2, grad_accum=1, lr=1e-3),
                   model, log=quiet)
    loaded = load_model(result.model_dir, device="cpu", dtype=torch.float32)
    for name, tensor in model.lm.state_dict().items():
        torch.testing.assert_close(loaded.lm.state_dict()[name], tensor)
    session = Session(loaded, SessionConfig(max_new_tokens=3))
    session.push_query(0.0, "Please narrate the video in real time.")
    frames = torch.randint(0, 255, (3, 3, loaded.frame_size, loaded.frame_size), dtype=torch.uint8)
    for i, frame in enumerate(frames):
        session.push_frame(i * 0.5, frame)
    events = list(session.process())
    assert sum(isinstance(e, FrameDecision) for e in events) == 3
    assert any(isinstance(e, ResponseDone) and e.trigger == "query" for e in events)


def test_training_the_vision_tower_saves_it_and_reads_no_stale_features(fresh, dataset, tmp_path):
    model = fresh()
    untrained = vision_fingerprint(model)
    load_samples(model, dataset)  # the untrained tower's features are in the cache now
    result = train(TrainConfig(str(dataset), str(tmp_path / "tower"), mode="full", train_vision=True, steps=2,
                               grad_accum=1, lr=1e-3), model, log=quiet)
    model.eval()
    assert vision_fingerprint(model) != untrained  # trained in place
    loaded = load_model(result.model_dir, device="cpu", dtype=torch.float32)
    for k, v in model.vision.tower.state_dict().items():
        torch.testing.assert_close(loaded.vision.tower.state_dict()[k], v)
    # The trained model encoding frames on the fly (as training did) and the saved one reading the feature cache
    # (as evaluation does) compute the same loss: the cache holds the trained tower's features, not the old ones.
    with torch.no_grad():
        for on_the_fly, cached in zip(load_samples(model, dataset, frames=True), load_samples(loaded, dataset)):
            assert on_the_fly.features is None and cached.pixels is None
            torch.testing.assert_close(compute_loss(model, on_the_fly).total, compute_loss(loaded, cached).total,
                                       rtol=1e-5, atol=1e-5)


def test_frozen_tower_is_left_untouched(fresh, dataset, tmp_path):
    model = fresh()
    before = vision_fingerprint(model)
    result = train(TrainConfig(str(dataset), str(tmp_path / "frozen"), mode="full", steps=1, grad_accum=1, lr=1e-2),
                   model, log=quiet)
    assert vision_fingerprint(load_model(result.model_dir, device="cpu", dtype=torch.float32)) == before


def test_lora_model_is_saved_merged(fresh, dataset, tmp_path):
    model = fresh()
    result = train(TrainConfig(str(dataset), str(tmp_path / "lora"), steps=2, grad_accum=1, lr=1e-2,
                               lora_dropout=0.0), model, log=quiet)
    loaded = load_model(result.model_dir, device="cpu", dtype=torch.float32)
    assert not any("lora" in name for name in loaded.lm.state_dict())
    samples = load_samples(loaded, dataset)
    with torch.no_grad():  # the merged model computes what the adapter model computed
        for sample in samples[:1]:
            torch.testing.assert_close(compute_loss(loaded, sample).total, compute_loss(model, sample).total,
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="qlora"), "mode must be one of"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(warmup_ratio=1.0), r"warmup_ratio must be in \[0, 1\)"),
    (dict(lora_r=0), "LoRA needs lora_r >= 1"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig("d", "o", **kwargs)
