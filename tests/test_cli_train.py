"""`liveserve data synth`, `train` and `eval`: a tiny end-to-end run and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from liveserve.cli import main
from liveserve.model.loading import load_model


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-synth") / "data"
    assert main(["data", "synth", "--out", str(out), "--videos", "2", "--seed", "4"]) == 0
    return out


def test_synth_train_eval(synth, tiny_dir, tmp_path, capsys):
    assert (synth / "dialogues.json").is_file() and len(list((synth / "videos").glob("*.mp4"))) == 2
    capsys.readouterr()
    assert main(["train", "--data", str(synth), "--out", str(tmp_path / "run"), "--model", str(tiny_dir),
                 "--steps", "2", "--grad-accum", "1", "--log-every", "1"]) == 0
    out, err = capsys.readouterr()
    model_dir = out.strip()
    assert model_dir == str(tmp_path / "run" / "model") and "step 2/2" in err
    load_model(model_dir, device="cpu")
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", model_dir, "--data", str(synth), "--json", str(report),
                 "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed == json.loads(report.read_text())
    assert printed["videos"] == 2 and {"lm_ppl", "time_diff_s", "fluency", "precision", "recall", "within_1s",
                                       "colour_accuracy", "shape_accuracy", "by_kind"} <= set(printed)
    assert err.splitlines()[-1].startswith("liveserve eval: text accuracy ")  # the summary, after the progress


def test_train_vision_flag(synth, tiny_dir, tmp_path, capsys):
    assert main(["train", "--data", str(synth), "--out", str(tmp_path / "run"), "--model", str(tiny_dir),
                 "--mode", "full", "--train-vision", "--steps", "1", "--grad-accum", "1"]) == 0
    err = capsys.readouterr().err
    assert "frames 2/2" in err and "(full, vision tower too)" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "{missing}", "--out", "{tmp}/o"],
     "{missing}/dialogues.json: no such file (expected a dataset directory; see `liveserve data synth`)"),
    (["train", "--data", "{synth}", "--out", "{tmp}/o", "--warmup-ratio", "1.5"],
     r"warmup_ratio must be in [0, 1), got 1.5"),
    (["train", "--data", "{synth}", "--out", "{tmp}/o", "--model", "{missing}"],
     "model directory {missing} does not exist"),
    (["eval", "--data", "{missing}"], "dataset directory {missing} does not exist"),
    (["eval", "--data", "{synth}", "--threshold", "2"], "--threshold must be in [0, 1], got 2.0"),
])
def test_errors_are_one_line_with_exit_code_2(synth, tmp_path, capsys, argv, message):
    paths = {"missing": str(tmp_path / "nope"), "tmp": str(tmp_path), "synth": str(synth)}
    capsys.readouterr()
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err == f"liveserve: error: {message.format(**paths)}\n"


def test_default_model_missing_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from liveserve.model import registry

    monkeypatch.setattr(registry, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    assert main(["eval", "--model", "default", "--no-stream"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("liveserve: error: the default model is not built") and err.count("\n") == 1


def test_synth_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "synth", "--out", str(tmp_path / "d"), "--videos", "0"])
    assert info.value.code == 2 and "--videos: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--videos", "1", "--size", "30", "30"]) == 2
    assert "size must be even and at least 64x64" in capsys.readouterr().err
