"""Evaluate a LIVE model on a streaming-dialogue dataset.

Teacher-forced (VideoLLM-online's `stream_evaluate`; one forward per dialogue, per turn then per video
averaging, liveserve.train.metrics):
- lm_ppl: mean over turns of exp(mean NLL of the reply tokens);
- time_diff_s: mean |frames between the first firing and the reply frame| / fps; a turn that never fires
  is scored on future frames appended after its reply frame (min(next turn's frames, this turn's - 1));
- fluency: share of a turn's decisions and reply tokens that are right before the first error;
- lm_correctness: share of a reply's tokens before the first wrong argmax.

Free-running: each video is streamed through a `Session` at the dataset fps with the serving threshold,
user queries pushed with their frame (as `liveserve run` does); proactive responses are matched to the
annotated event times (`match_decisions`), pooled over videos: precision, recall, f1, within_1s (share of
events answered 0-1 s after they happen), and text_accuracy (matched responses that say exactly the event's
sentence). Of the matched responses, also: colour_accuracy and shape_accuracy (the sentence names the event's
colours, in order, and its shape) and, per event kind of the annotation (appears, moves, turns = colour change,
leaves), the matched count and text accuracy, so a weakness in one kind of sentence shows.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from liveserve.config import DEFAULT_THRESHOLD, SessionConfig
from liveserve.data.dialogue import Dialogue, TextTurn, load_dialogues
from liveserve.data.labels import PROACTIVE, Example
from liveserve.data.synthetic import DATASET_DIALOGUES, EVENT_KINDS, parse_narration, write_dataset
from liveserve.engine.events import ResponseDone
from liveserve.engine.live.session import Session
from liveserve.model.live import LiveModel
from liveserve.train.forward import hidden_states, input_embeddings, logits_at
from liveserve.train.metrics import (lm_correct_prefix, lm_correctness, lm_ppl, match_decisions, mean_over_videos,
                                     turn_fluency, turn_time_diff)
from liveserve.train.trainer import Sample, load_samples

EVAL_MAX_NEW_TOKENS = 32  # a narration sentence is ~10 tokens; bounds the cost of a babbling model
HELDOUT_SEED = 1000  # training sets use small seeds (the default model: 0); this one is never trained on
HELDOUT_VIDEOS = 50


@dataclass(frozen=True, slots=True)
class TurnScore:
    nlls: tuple[float, ...]  # per reply token
    correct_prefix: int
    num_stream: int
    diff: int | None  # frames; None for a turn without decisions
    fluency: float  # NaN for a turn without decisions or reply tokens


@dataclass(frozen=True, slots=True)
class StreamResult:
    response_times: tuple[float, ...]
    texts: tuple[str, ...]
    event_times: tuple[float, ...]
    event_texts: tuple[str, ...]


@torch.no_grad()
def score_dialogue(model: LiveModel, sample: Sample) -> list[TurnScore]:
    """Teacher-forced per-turn scores of one dialogue."""
    ex, features = sample.example, sample.features
    hidden = hidden_states(model, input_embeddings(model, ex.input_ids, ex.frame_positions, features))
    interval = model.template.interval_id
    scores = []
    for k, span in enumerate(ex.turns):
        decisions = torch.tensor(span.decision_positions, dtype=torch.long)
        lm = torch.tensor(span.lm_positions, dtype=torch.long)
        fires = (logits_at(model, hidden, decisions).argmax(-1) != interval).tolist() if len(decisions) else []
        nlls, prefix = (), 0
        if len(lm):
            logits = logits_at(model, hidden, lm)
            targets = ex.labels[lm]
            nlls = tuple(F.cross_entropy(logits, targets, reduction="none").tolist())
            prefix = lm_correct_prefix((logits.argmax(-1) == targets).tolist())
        diff = None
        if fires:
            future: list[bool] = []
            if span.trigger == PROACTIVE and not any(fires):
                following = ex.turns[k + 1].decision_frames if k + 1 < len(ex.turns) else ()
                count = min(len(following), len(fires) - 1, ex.num_frames - 1 - span.decision_frames[-1])
                future = _future_fires(model, ex, features, span.decision_positions[-1], span.decision_frames[-1],
                                       count)
            # Only a proactive turn can be late; a query or trailing turn that stays silent is on time.
            diff = turn_time_diff(fires, future, is_last_turn=span.trigger != PROACTIVE or not future)
        fluency = turn_fluency(len(fires), diff or 0, prefix, len(lm)) if len(fires) + len(lm) else math.nan
        scores.append(TurnScore(nlls, prefix, len(fires), diff, fluency))
    return scores


def _future_fires(model: LiveModel, ex: Example, features: torch.Tensor, last_position: int, last_frame: int,
                  count: int) -> list[bool]:
    """Decisions at `count` frames appended after `last_frame` as "," + <v>*n, the reply never happening."""
    if count <= 0:
        return []
    t = model.template
    n = t.frame_num_tokens
    ids = ex.input_ids[:last_position + 1].tolist()
    rows = ex.frame_positions[:last_frame + 1].tolist()
    for _ in range(count):
        ids.append(t.interval_id)
        rows.append(list(range(len(ids), len(ids) + n)))
        ids.extend([t.v_id] * n)
    hidden = hidden_states(model, input_embeddings(model, torch.tensor(ids), torch.tensor(rows),
                                                   features[:last_frame + 1 + count]))
    ends = torch.tensor([row[-1] for row in rows[last_frame + 1:]])
    return (logits_at(model, hidden, ends).argmax(-1) != t.interval_id).tolist()


@torch.no_grad()
def stream_dialogue(model: LiveModel, dialogue: Dialogue, features: torch.Tensor, *,
                    threshold: float = DEFAULT_THRESHOLD, max_new_tokens: int = EVAL_MAX_NEW_TOKENS) -> StreamResult:
    """Stream one video's frames (as features) and user queries through a Session; collect proactive replies."""
    session = Session(model, SessionConfig(threshold=threshold, max_new_tokens=max_new_tokens))
    queries = sorted((t.time, t.content) for t in dialogue.turns if isinstance(t, TextTurn) and t.role == "user")
    times, texts = [], []

    def drain() -> None:
        for event in session.process():
            if isinstance(event, ResponseDone) and event.trigger == "proactive":
                times.append(event.timestamp)
                texts.append(event.text.strip())

    try:
        for i in range(dialogue.num_frames):
            timestamp = i / dialogue.fps
            while queries and queries[0][0] <= timestamp:
                session.push_query(*queries.pop(0))
            session.push_frame(timestamp, features[i])
            drain()
        for query in queries:
            session.push_query(*query)
        drain()
    finally:
        session.close()
    return StreamResult(tuple(times), tuple(texts), tuple(e.time for e in dialogue.events),
                        tuple(e.text for e in dialogue.events))


def summarize_stream(results: list[StreamResult], tolerance_s: float = 1.0) -> dict:
    """Pooled decision scores over videos (counts summed, then divided)."""
    matched = responses = events = timely = 0
    lags, sentences = [], []
    for r in results:
        s = match_decisions(r.response_times, r.event_times, tolerance_s)
        matched, responses, events = matched + s.matched, responses + s.num_responses, events + s.num_events
        timely += sum(1 for rt, et in s.pairs if 0.0 <= rt - et <= 1.0 + 1e-9)
        said = dict(zip(r.response_times, r.texts))
        meant = dict(zip(r.event_times, r.event_texts))
        sentences += [(said[rt], meant[et].strip()) for rt, et in s.pairs]
        lags += [rt - et for rt, et in s.pairs]
    precision = matched / responses if responses else 1.0
    recall = matched / events if events else 1.0
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "within_1s": timely / events if events else 1.0,
            "text_accuracy": _share(said == meant for said, meant in sentences),
            **narration_scores(sentences),
            "mean_lag_s": sum(lags) / len(lags) if lags else math.nan, "responses": responses, "events": events,
            "matched": matched}


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0  # nothing matched: nothing said right


def narration_scores(sentences: list[tuple[str, str]]) -> dict:
    """What the matched (said, meant) sentences get right: the colours (all of them, in order: a colour change
    names the old and the new one) and the shape, and exact sentences per event kind of the meant sentence."""
    parsed = [(parse_narration(said), parse_narration(meant), said == meant) for said, meant in sentences]
    by_kind = {}
    for kind in EVENT_KINDS:
        exact = [ok for _, m, ok in parsed if m.kind == kind]
        by_kind[kind] = {"matched": len(exact), "text_accuracy": _share(exact)}
    return {"colour_accuracy": _share(s.colours == m.colours for s, m, _ in parsed),
            "shape_accuracy": _share(s.shape == m.shape for s, m, _ in parsed), "by_kind": by_kind}


def summary_line(results: dict) -> str:
    """`evaluate`'s headline figures on one line: the free-running ones first when it streamed."""
    teacher = (f"LM-PPL {results['lm_ppl']:.2f}, TimeDiff {results['time_diff_s']:.3f} s, "
               f"fluency {results['fluency']:.3f}, LM-correctness {results['lm_correctness']:.3f}")
    if "text_accuracy" not in results:
        return teacher
    kinds = ", ".join(f"{kind} {v['text_accuracy']:.3f}" for kind, v in results["by_kind"].items())
    return (f"text accuracy {results['text_accuracy']:.3f} ({kinds}), colour {results['colour_accuracy']:.3f}, "
            f"shape {results['shape_accuracy']:.3f}; precision {results['precision']:.3f}, "
            f"recall {results['recall']:.3f}, within_1s {results['within_1s']:.3f}; {teacher}")


def evaluate(model: LiveModel, data_dir, *, threshold: float = DEFAULT_THRESHOLD, stream: bool = True,
             max_new_tokens: int = EVAL_MAX_NEW_TOKENS, samples: list[Sample] | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """All metrics over the dataset in `data_dir` (see the module docstring); a JSON-ready dict."""
    model.eval()
    started = time.perf_counter()
    samples = samples if samples is not None else load_samples(model, data_dir, progress=log)
    dialogues = {d.video: d for d in load_dialogues(Path(data_dir) / DATASET_DIALOGUES)}
    ppl, diffs, fluency, correctness, streamed = [], [], [], [], []
    for i, sample in enumerate(samples):
        dialogue = dialogues[sample.video]
        turns = score_dialogue(model, sample)
        ppl.append([lm_ppl([t.nlls]) for t in turns if t.nlls])
        diffs.append([abs(t.diff) / dialogue.fps for t in turns if t.diff is not None])
        fluency.append([t.fluency for t in turns])
        correctness.append([lm_correctness(t.correct_prefix, len(t.nlls)) for t in turns if t.nlls])
        if stream:
            streamed.append(stream_dialogue(model, dialogue, sample.features, threshold=threshold,
                                            max_new_tokens=max_new_tokens))
        if log is not None:
            log(f"evaluated {i + 1}/{len(samples)}")
    out = {"model": model.name, "data": str(data_dir), "videos": len(samples),
           "lm_ppl": mean_over_videos(ppl), "time_diff_s": mean_over_videos(diffs),
           "fluency": mean_over_videos(fluency), "lm_correctness": mean_over_videos(correctness)}
    if stream:
        out["threshold"] = threshold
        out.update(summarize_stream(streamed))
    out["wall_s"] = round(time.perf_counter() - started, 2)
    return out


def heldout_dataset(root: str | Path | None = None, *, seed: int = HELDOUT_SEED, videos: int = HELDOUT_VIDEOS,
                    log: Callable[[str], None] | None = None) -> Path:
    """The held-out synthetic evaluation set, generated once into the liveserve cache and reused."""
    base = Path(root or os.environ.get("LIVESERVE_CACHE", Path.home() / ".cache" / "liveserve"))
    target = base / f"eval-synth-s{seed}-n{videos}"
    if not (target / DATASET_DIALOGUES).is_file():
        if log is not None:
            log(f"writing the held-out set ({videos} synthetic videos, seed {seed}) to {target}")
        tmp = base / f".{target.name}.{os.getpid()}"
        write_dataset(tmp, videos, seed)
        if target.exists():  # a partial leftover without dialogues.json
            shutil.rmtree(target)
        tmp.replace(target)
    return target
