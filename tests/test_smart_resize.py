"""Commentary frames sized as StreamingVLM sizes them (Qwen-VL's smart rule: aspect ratio kept, sides
multiples of 28 within a pixel budget) or squared as an option: the token counts of a few aspect ratios
against the rule worked out by hand, and the engine's logits over a non-square stream against transformers'
Qwen2.5-VL and Qwen2-VL forwards, whose get_rope_index numbers the chunks' (t, h, w) grids."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from liveserve.config import CommentaryConfig, SessionConfig
from liveserve.engine.commentary.session import CommentarySession, commentary_cache_limit
from liveserve.engine.sessions import tokens_per_frame
from liveserve.frame_format import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS
from liveserve.model.loading import load_model
from liveserve.video import decode_image_bytes, fit_frame

# The released checkpoints' bounds (qwen-vl-utils' video bounds: 128..768 tokens of 28 x 28 px).
RELEASED = dict(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)
# (source height, width) -> (sized height, width), by the rule: sides rounded to multiples of 28, then
# scaled by one factor into [100,352, 602,112] pixels (down: floor; up: ceil).
SIZED = {(360, 640): (364, 644),       # 12.9 x 22.9 units round to 13 x 23: 299 tokens a chunk
         (640, 360): (644, 364),
         (480, 480): (476, 476),       # 17 x 17: 289, what squaring gave every frame
         (1080, 1920): (560, 1008),    # 39 x 69 units is over budget: / sqrt(2,073,600 / 602,112), floored: 20 x 36
         (100, 50): (448, 224)}        # 4 x 2 units is under: x sqrt(100,352 / 5,000) = x 4.48, ceiled: 16 x 8


def commentary(**overrides) -> SessionConfig:
    return SessionConfig(mode="commentary", commentary=CommentaryConfig(**{"max_tokens_per_chunk": 3, **overrides}))


def pixels(height: int, width: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g) for _ in range(n)]


def vision_tokens(session: CommentarySession) -> int:
    chunk = session.inputs.next_chunk()
    return session._turn_ids(chunk)[0].count(session.template.video_pad)


@pytest.mark.parametrize("source", list(SIZED), ids=[f"{h}x{w}" for h, w in SIZED])
def test_a_chunk_has_the_tokens_of_its_frames_sized_by_the_reference_rule(qwen, source):
    session = CommentarySession(qwen, commentary(**RELEASED))
    for i, frame in enumerate(pixels(*source, 2)):
        session.push_frame(i * 0.5, frame)
    height, width = SIZED[source]
    assert session.inputs.next_chunk().frames[0].pixels.shape == (3, height, width)
    assert vision_tokens(session) == (height // 28) * (width // 28)  # one temporal group of two frames
    # The cache is reserved for the largest chunk the bounds allow: 768 tokens.
    assert tokens_per_frame(qwen, session.config) == 768 // 2
    session.close()


def test_360x640_is_299_tokens_from_jpeg_bytes_too_and_289_squared(qwen):
    buffer = io.BytesIO()
    Image.new("RGB", (640, 360), (30, 120, 60)).save(buffer, format="JPEG")
    assert decode_image_bytes(buffer.getvalue(), qwen.frame_format(CommentaryConfig(**RELEASED))).shape == (3, 364, 644)
    smart = CommentarySession(qwen, commentary(**RELEASED))
    square = CommentarySession(qwen, commentary(resize="square"))
    for session in (smart, square):
        for i in range(2):
            session.push_frame(i * 0.5, buffer.getvalue())
    assert vision_tokens(smart) == 299
    assert vision_tokens(square) == (qwen.frame_size // 28) ** 2  # the tiny model's square input: 112 px
    assert commentary_cache_limit(qwen, square.config) < commentary_cache_limit(qwen, smart.config)


def test_the_model_bounds_hold_where_a_session_sets_none(qwen):
    # The tiny checkpoint's image processor allows at most 112 x 112 pixels: a 360 x 640 frame shrinks to it.
    session = CommentarySession(qwen, commentary())
    session.push_frame(0.0, pixels(360, 640, 1)[0])
    session.flush()
    # sqrt(230,400 / 12,544) = 4.29: 360 x 640 / 4.29 is 3 x 5.3 units, floored to 3 x 5 (15 tokens).
    assert session.inputs.next_chunk().frames[0].pixels.shape == (3, 84, 140)


def test_a_frame_of_another_size_joins_its_chunk_at_the_first_frames_size(qwen):
    session = CommentarySession(qwen, commentary(**RELEASED))
    session.push_frame(0.0, pixels(360, 640, 1)[0])
    session.push_frame(0.5, pixels(480, 480, 1)[0])
    assert [tuple(f.pixels.shape) for f in session.inputs.next_chunk().frames] == [(3, 364, 644)] * 2


# A non-square stream on the tiny models: 60 x 100 frames sized to 56 x 112 (2 x 4 merged patches).
SMALL = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 12)


def run_against(model, hf, frames_hw: list[tuple[int, int]], extra: dict) -> None:
    """The session's logits at every step equal transformers' forward over the same tokens and chunks."""
    session = CommentarySession(model, commentary(**SMALL))
    session.trace = []
    images = [frame for i, hw in enumerate(frames_hw) for frame in pixels(*hw, 1, seed=i)]
    for i, image in enumerate(images):
        session.push_frame(i * 0.5, image)
    list(session.process())
    steps = [step for step, _ in session.trace]
    ids = torch.tensor([i for step in steps for i in step.ids])[None]
    chunks = [step for step in steps if step.grid is not None]
    frame_format = model.frame_format(session.commentary)
    sized = [torch.stack([fit_frame(image, frame_format) for image in images[i:i + 2]])
             for i in range(0, len(images), 2)]
    thw = torch.tensor([[s.grid.t, 2 * s.grid.h, 2 * s.grid.w] for s in chunks])
    assert [tuple(row) for row in thw.tolist()] == [(1, 2 * h // 28, 2 * w // 28) for c in sized
                                                    for h, w in [c.shape[2:]]]
    assert len(chunks) == 3 and all(h != w for _, h, w in thw.tolist())
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values_videos=torch.cat([model.patchify(c) for c in sized]),
                    video_grid_thw=thw, mm_token_type_ids=(ids == model.template.video_pad).long() * 2,
                    **extra(len(chunks))).logits[0].float()
        rows, _ = hf.model.get_rope_index(ids, (ids == model.template.video_pad).long() * 2, video_grid_thw=thw,
                                          **extra(len(chunks)))
    ends = torch.tensor([step.num_tokens for step in steps]).cumsum(0) - 1
    torch.testing.assert_close(torch.stack([logits for _, logits in session.trace]), logits[ends],
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.cat([step.positions for step in steps], dim=-1), rows[:, 0])


def test_engine_logits_over_a_non_square_stream_equal_transformers_qwen2_5_vl(qwen, qwen_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir, attn_implementation="sdpa").eval()
    run_against(qwen, hf, [(60, 100)] * 6, lambda n: {"second_per_grid_ts": torch.tensor([1.0] * n)})


def test_engine_logits_over_a_non_square_stream_equal_transformers_qwen2_vl(tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from liveserve.model.tiny import write_tiny_qwen2_vl

    path = write_tiny_qwen2_vl(tmp_path / "livecc")
    livecc = load_model(path, device="cpu", dtype=torch.float32)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    run_against(livecc, hf, [(100, 60)] * 2 + [(60, 100)] * 4, lambda n: {})
