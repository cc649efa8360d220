"""The `liveserve` command line, run in-process: output format, exit codes and one-line errors."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout

import pytest

from liveserve.cli import main
from liveserve.model.loading import load_model
from liveserve.video import SAMPLE_VIDEO

LINE = re.compile(r"\[ *\d+\.\d\ds\] (User: .+|Assistant:.*\([12] tokens, (eos|length), ttft \d+ ms\))")
SUMMARY = re.compile(r"liveserve: (\d+) frames, \d+ fired, \d+ responses in [\d.]+s; processed [\d.]+ FPS; "
                     r"max decision lag \d+ ms; peak KV cache [\d.]+ MiB; peak memory \d+ MiB")


def test_run_output_follows_a_stdout_redirected_after_import(tiny_dir):
    import liveserve.run  # noqa: F401  (imported before the redirect, as in any program embedding the CLI)

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        code = main(["run", "--model", str(tiny_dir), "--max-frames", "1", "--max-new-tokens", "1", "--query", "0:Hi"])
    assert code == 0 and out.getvalue().startswith("[   0.00s] User: Hi\n")


def test_run_prints_timestamped_narration_and_a_summary(tiny_dir, capsys):
    code = main(["run", str(SAMPLE_VIDEO), "--model", str(tiny_dir), "--max-frames", "4", "--max-new-tokens", "2",
                 "--query", "0:Describe the video."])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.split("\n")
    assert lines[0] == "[   0.00s] User: Describe the video."
    assert lines[1].startswith("[   0.00s] Assistant:")
    assert lines[-1] == "" and all(LINE.fullmatch(line) for line in lines[:-1]), out
    summary = SUMMARY.fullmatch(err.rstrip("\n").split("\n")[-1])
    assert summary and summary.group(1) == "4", err


def test_run_realtime_with_a_sink_window_cache(tiny_dir, capsys):
    code = main(["run", str(SAMPLE_VIDEO), "--model", str(tiny_dir), "--cache", "sink_window", "--window-frames", "2",
                 "--realtime", "--max-frames", "3", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith("[   0.00s] User: Please narrate the video in real time.\n")
    assert "cache sink_window" in err
    summary = SUMMARY.fullmatch(err.rstrip("\n").split("\n")[-1])
    assert summary and summary.group(1) == "3", err


def test_run_commentary_on_a_streamingvlm_layout_directory(qwen_dir, capsys):
    """A Qwen2.5-VL directory runs in its own mode: a turn per second of video, each said or silent."""
    code = main(["run", str(SAMPLE_VIDEO), "--model", str(qwen_dir), "--max-frames", "6",
                 "--max-tokens-per-chunk", "2"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "commentary every 1s" in err
    said = [line for line in out.split("\n") if line]
    assert all(re.fullmatch(r"\[ *\d\.00s\] Assistant:.*\(2 tokens, (eos|length), ttft \d+ ms\)", line)
               for line in said), out
    summary = SUMMARY.fullmatch(err.rstrip("\n").split("\n")[-1])
    assert summary and summary.group(1) == "6", err  # three chunks of two frames


def test_run_refuses_a_mode_the_model_does_not_have(tiny_dir, capsys):
    assert main(["run", "--model", str(tiny_dir), "--mode", "commentary", "--max-frames", "1"]) == 2
    assert "serves mode 'live', not 'commentary'" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["{missing}"], "{missing}: no such file"),
    (["{text}"], "{text}: not a readable video"),
    (["--query", "nonsense"], "--query must look like 'SECONDS:text'"),
    (["--model", "/nonexistent"], "model directory /nonexistent does not exist"),
    (["--max-frames", "0"], "--max-frames must be >= 1, got 0"),
])
def test_run_errors_are_one_line_with_exit_code_2(tiny_dir, tmp_path, capsys, args, message):
    text = tmp_path / "x.mp4"
    text.write_text("not a video\n")
    paths = {"missing": tmp_path / "missing.mp4", "text": text}
    argv = ["run", "--model", str(tiny_dir)] + [a.format(**paths) for a in args]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("liveserve: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert message.format(**paths) in err and "Traceback" not in err


def test_bad_fps_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--fps", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--fps: must be > 0, got 0" in err and "Traceback" not in err


def test_bench_engine_writes_per_policy_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "engine", "--model", str(tiny_dir), "--lengths", "10,30", "--window", "5",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["lengths"] == [10, 30] and report["window"] == 5
    assert set(report["policies"]) == {"full", "sink_window"}
    for result in report["policies"].values():
        assert result["frames"] == 30 and result["refused"] is None
        assert set(result["latency_ms_at_length"]) == {"10", "30"}
        assert isinstance(result["latency_ratio"], float) and result["latency_ratio"] > 0
        assert result["frames_per_s"] > 0
    assert f"wrote {out}" in capsys.readouterr().err


def test_bench_batch_takes_a_commentary_model(qwen_dir, tmp_path, capsys):
    """A chunk per round (2 frames, a turn and its reply) for batched and sequential sessions alike."""
    out = tmp_path / "b.json"
    assert main(["bench", "batch", "--model", str(qwen_dir), "--sessions", "2", "--rounds", "2", "--warmup", "1",
                 "--max-tokens-per-chunk", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["family"] == "qwen2_5_vl" and report["mode"] == "commentary"
    (result,) = report["results"]
    for contender in ("batched", "sequential"):
        assert result[contender]["frames"] == 2 * 2 * 2  # sessions x measured rounds x frames per chunk
    assert result["speedup"] > 0


@pytest.mark.parametrize("command", [["bench", "engine", "--json", "x.json"], ["eval"]])
def test_live_only_commands_refuse_a_commentary_model_in_one_line(qwen_dir, capsys, command):
    assert main(command[:2] + ["--model", str(qwen_dir)] + command[2:]) == 2
    err = capsys.readouterr().err
    assert "is a qwen2_5_vl model (commentary mode)" in err and err.count("\n") == 1, err


def test_tiny_writes_a_loadable_videollm_online_checkpoint(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "ckpt"), "--layout", "videollm-online"]) == 0
    printed = capsys.readouterr().out
    assert printed == f"{tmp_path / 'ckpt' / 'adapter'}\n"
    model = load_model(printed.strip(), device="cpu")
    assert model.vision is not None and model.layout.num_tokens == 10


def test_bench_count_lists_are_checked_with_the_flag_named(capsys):
    """Session counts and stream lengths that are not counts >= 1 are a one-line error naming the flag."""
    for argv, flag in ((["engine", "--lengths", "100,x"], "--lengths"), (["batch", "--sessions", "0,4"], "--sessions"),
                       (["capacity", "--sessions", "two"], "--sessions")):
        assert main(["bench", *argv, "--json", "unused.json"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"liveserve: error: {flag} must be a comma-separated list of counts >= 1") and \
            err.count("\n") == 1, err
