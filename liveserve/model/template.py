"""VideoLLM-online's live1+ stream template, as token pieces.

The conversation is one token sequence:

    <bos>{system}\\n\\n[<v>*10,<v>*10,...,<v>*10]\\nUser: {q}\\nAssistant: {a}<eos>\\n[<v>*10,...

(<bos> only where the tokenizer has one: Qwen2's has none.)

A frame is 10 <v> slots (replaced by vision embeddings) plus the interval token "," that joins it to
the next frame: 11 tokens. The decision is read at the frame's last <v>: "," keeps watching, "]\\n"
closes the stream and the assistant speaks. Pieces are tokenized separately, exactly as the reference
inference feeds them, because BPE merges at piece boundaries would otherwise differ.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SYSTEM_PROMPT = (
    "A multimodal AI assistant is helping users with some activities."
    " Below is their conversation, interleaved with the list of video frames received by the assistant."
)
V_PLACEHOLDER = "<v>"
INTERVAL_TEXT = ","
RESPOND_TEXT = "]\n"


class TemplateError(ValueError):
    """The tokenizer cannot express the stream template (e.g. "]\\n" is not one token)."""


@dataclass(frozen=True, slots=True)
class StreamTemplate:
    tokenizer: object
    bos_text: str
    eos_id: int
    interval_id: int
    respond_id: int
    v_id: int
    frame_num_tokens: int
    stream_open_ids: tuple[int, ...]  # "\n[" after a reply
    stream_reply_ids: tuple[int, ...]  # "]\nAssistant:" for a proactive reply

    @classmethod
    def from_tokenizer(cls, tokenizer, frame_num_tokens: int) -> StreamTemplate:
        """A tokenizer without a bos token (Qwen2's) starts the stream with the system prompt itself; its chat
        template, if any, is not used (the stream template is the one the model was trained on)."""
        if tokenizer.eos_token_id is None:
            raise TemplateError("tokenizer needs an eos token for the stream template (it ends every reply)")
        if V_PLACEHOLDER not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [V_PLACEHOLDER]})
        interval = _single_token(tokenizer, INTERVAL_TEXT, "interval")
        respond = _single_token(tokenizer, RESPOND_TEXT, "respond")
        return cls(
            tokenizer=tokenizer,
            bos_text=tokenizer.bos_token or "",
            eos_id=tokenizer.eos_token_id,
            interval_id=interval,
            respond_id=respond,
            v_id=tokenizer.convert_tokens_to_ids(V_PLACEHOLDER),
            frame_num_tokens=frame_num_tokens,
            stream_open_ids=tuple(_encode(tokenizer, "\n[")),
            stream_reply_ids=tuple(_encode(tokenizer, "]\nAssistant:")),
        )

    def encode(self, text: str) -> list[int]:
        return _encode(self.tokenizer, text)

    def start_ids(self, system_prompt: str) -> list[int]:
        """The first frame's prefix: system prompt, then the stream opens."""
        return self.encode(f"{self.bos_text}{system_prompt}\n\n[")

    def query_ids(self, query: str, *, stream_open: bool) -> list[int]:
        """A user turn (plus the generation prompt) inside an open stream or after a reply's eos."""
        prefix = "]\nUser: " if stream_open else "\nUser: "
        return self.encode(f"{prefix}{query}\nAssistant:")

    def first_query_ids(self, system_prompt: str, query: str) -> list[int]:
        """A query before any frame: system prompt, then the user turn."""
        return self.encode(f"{self.bos_text}{system_prompt}\n\nUser: {query}\nAssistant:")

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _single_token(tokenizer, text: str, role: str) -> int:
    ids = _encode(tokenizer, text)
    if len(ids) != 1:
        raise TemplateError(f"the {role} text {text!r} must be a single token, but the tokenizer splits it into {ids}")
    return ids[0]
