"""A commentary turn's reply as it is generated: what of it is shown, streamed as events.

StreamingVLM ends every reply with the no-comment marker " ..."; a reply of only the marker is silence.
While the reply grows, what may still become the marker (and a split UTF-8 character) is held back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from liveserve.engine.commentary.inputs import Chunk
from liveserve.engine.events import Event, ResponseDelta, ResponseStarted
from liveserve.model.qwen_vl import NO_COMMENT, ChatTemplate


@dataclass(slots=True)
class ChunkReply:
    chunk: Chunk
    start_s: float
    end_s: float
    tokens: list[int] = field(default_factory=list)
    shown: str = ""  # text streamed so far
    ttft: float = 0.0  # the chunk's last frame's arrival to its first reply token
    started: bool = False  # ResponseStarted sent

    def stream(self, template: ChatTemplate, final: bool) -> list[Event]:
        """The events for what became visible since the last call (`final`: the reply has ended)."""
        text = visible(template, self.tokens, final)
        events: list[Event] = []
        if len(text) > len(self.shown) and text.startswith(self.shown):
            if not self.started:
                self.started = True
                events.append(ResponseStarted(self.start_s, "commentary", None))
            events.append(ResponseDelta(self.start_s, text[len(self.shown):], (self.tokens[-1],)))
            self.shown = text
        return events

    def num_words(self, template: ChatTemplate) -> int:
        """How many of its tokens are words: without its <|im_end|> and, when it ends so, the marker."""
        tokens = self.tokens
        words = tokens[:-1] if tokens[-1] == template.eos_id else list(tokens)
        marker = list(template.no_comment)
        if marker and words[-len(marker):] == marker:
            words = words[: -len(marker)]
        return len(words)


def visible(template: ChatTemplate, tokens: list[int], final: bool) -> str:
    text = template.decode([i for i in tokens if i != template.eos_id])
    if final:
        return text[: -len(NO_COMMENT)].rstrip() if text.endswith(NO_COMMENT) else text.rstrip()
    # Hold back what may still become the marker, and a split UTF-8 character.
    for n in range(min(len(NO_COMMENT), len(text)), 0, -1):
        if NO_COMMENT.startswith(text[-n:]):
            return text[:-n]
    return text[:-1] if text.endswith("\ufffd") else text
