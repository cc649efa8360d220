"""Tests for liveserve.video: sampling, resize/pad geometry, errors, pacing and the bundled sample."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from liveserve.video import (
    SAMPLE_VIDEO,
    VideoError,
    VideoFrame,
    decode_image_bytes,
    iter_video_frames,
    paced,
    probe_video,
    resize_and_pad,
)

SRC_FPS, SRC_SECONDS, SRC_W, SRC_H = 10, 2, 64, 48


def grey(i: int) -> int:
    """Grey level of source frame i: 12 apart so codec error cannot confuse neighbours."""
    return 10 + 12 * i


def frame_id(pixels: torch.Tensor) -> int:
    """Recover the source frame index from the centre of a padded output frame."""
    c = pixels.shape[-1] // 2
    return round((pixels[:, c - 4 : c + 4, c - 4 : c + 4].float().mean().item() - 10) / 12)


@pytest.fixture(scope="module")
def grey_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s at 10 fps, 64x48, frame i is a solid grey of level grey(i)."""
    path = tmp_path_factory.mktemp("vid") / "grey.mp4"
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=SRC_FPS)
        stream.width, stream.height, stream.pix_fmt = SRC_W, SRC_H, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "1"}
        for i in range(SRC_FPS * SRC_SECONDS):
            img = np.full((SRC_H, SRC_W, 3), grey(i), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, SRC_FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


# --- sampling -------------------------------------------------------------------------------------


def test_probe(grey_video: Path) -> None:
    info = probe_video(grey_video)
    assert (info.width, info.height) == (SRC_W, SRC_H)
    assert info.native_fps == pytest.approx(SRC_FPS)
    assert info.duration_s == pytest.approx(SRC_SECONDS, abs=0.05)
    assert info.num_frames_at(2) == 4
    assert info.num_frames_at(4) == 8
    assert info.path == str(grey_video)


@pytest.mark.parametrize(
    "fps, expected_ids",
    [
        (2.0, [0, 5, 10, 15]),  # every 5th source frame
        (4.0, [0, 2, 5, 7, 10, 12, 15, 17]),  # latest frame with pts <= k/4
        (10.0, list(range(20))),  # native rate: every frame once
    ],
)
def test_sampled_frames(grey_video: Path, fps: float, expected_ids: list[int]) -> None:
    frames = list(iter_video_frames(grey_video, fps=fps, size=32))
    assert [f.index for f in frames] == list(range(len(expected_ids)))
    assert [f.timestamp for f in frames] == pytest.approx([k / fps for k in range(len(expected_ids))])
    assert [frame_id(f.pixels) for f in frames] == expected_ids
    assert len(frames) == probe_video(grey_video).num_frames_at(fps)


def test_upsampling_repeats_frames(grey_video: Path) -> None:
    frames = list(iter_video_frames(grey_video, fps=20, size=16))
    assert len(frames) == 40
    assert [frame_id(f.pixels) for f in frames] == [k // 2 for k in range(40)]


def test_output_shape_and_dtype(grey_video: Path) -> None:
    frame = next(iter_video_frames(grey_video, fps=2, size=40))
    assert isinstance(frame, VideoFrame)
    assert frame.pixels.shape == (3, 40, 40)
    assert frame.pixels.dtype == torch.uint8
    # 64x48 -> 40x30: 5-pixel black bars at top and bottom.
    assert frame.pixels[:, :5].eq(0).all() and frame.pixels[:, 35:].eq(0).all()
    assert frame.pixels[:, 5:35].gt(0).all()


def test_max_frames(grey_video: Path) -> None:
    frames = list(iter_video_frames(grey_video, fps=4, size=16, max_frames=3))
    assert [frame_id(f.pixels) for f in frames] == [0, 2, 5]
    assert list(iter_video_frames(grey_video, fps=4, size=16, max_frames=0)) == []


def test_start_s(grey_video: Path) -> None:
    frames = list(iter_video_frames(grey_video, fps=2, size=16, start_s=0.7))
    assert [f.timestamp for f in frames] == pytest.approx([0.7, 1.2, 1.7])
    assert [frame_id(f.pixels) for f in frames] == [7, 12, 17]
    assert list(iter_video_frames(grey_video, fps=2, size=16, start_s=5.0)) == []


def test_streams_lazily(grey_video: Path) -> None:
    it = iter_video_frames(grey_video, fps=2, size=16)
    assert frame_id(next(it).pixels) == 0
    it.close()  # closing early must not raise and must release the container


# --- errors ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match="nope.mp4"):
        probe_video(path)
    with pytest.raises(VideoError, match="nope.mp4"):
        iter_video_frames(path)


def test_text_file_renamed_mp4(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    for call in (probe_video, iter_video_frames):
        with pytest.raises(VideoError) as info:
            call(path)
        assert str(path) in str(info.value)
        assert "\n" not in str(info.value)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "audio_only.m4a"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=8000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(VideoError, match="no video stream"):
        probe_video(path)


@pytest.mark.parametrize("kwargs", [dict(fps=0), dict(fps=-1.0), dict(size=0), dict(max_frames=-1)])
def test_bad_arguments(grey_video: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        iter_video_frames(grey_video, **kwargs)


def test_bad_fps_checked_before_opening(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fps"):
        iter_video_frames(tmp_path / "missing.mp4", fps=0)


# --- resize / pad ---------------------------------------------------------------------------------


def test_pad_wide_image() -> None:
    img = torch.full((3, 50, 100), 255, dtype=torch.uint8)  # W=100, H=50
    out = resize_and_pad(img, 64)  # -> 64x32, y offset 16
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    assert out[:, :16].eq(0).all() and out[:, 48:].eq(0).all()
    assert out[:, 16:48].eq(255).all()


def test_pad_tall_image() -> None:
    img = np.full((90, 30, 3), 200, dtype=np.uint8)  # W=30, H=90
    out = resize_and_pad(img, 64)  # -> 22x64 (64*30/90=21.3 -> even 22), x offset 21
    assert out[:, :, :21].eq(0).all() and out[:, :, 43:].eq(0).all()
    assert out[:, :, 21:43].eq(200).all()


def test_even_rounding_like_ffmpeg() -> None:
    # 320x240 at 384: short side 288; 100x30 at 64: 19.2 -> 20 (even), offset 22.
    out = resize_and_pad(torch.full((3, 30, 100), 9, dtype=torch.uint8), 64)
    rows = out[0, :, 32].nonzero().flatten()
    assert (rows.min().item(), rows.max().item()) == (22, 41)
    out = resize_and_pad(torch.full((3, 240, 320), 9, dtype=torch.uint8), 384)
    rows = out[0, :, 192].nonzero().flatten()
    assert (rows.min().item(), rows.max().item()) == (48, 335)


def test_content_centred_and_oriented() -> None:
    # Left half red, right half blue must stay left/right after scaling.
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[:, :40, 0] = 255
    img[:, 40:, 2] = 255
    out = resize_and_pad(img, 32)  # -> 32x16 at y=8
    assert out[0, 16, 2] == 255 and out[2, 16, 2] == 0
    assert out[2, 16, 29] == 255 and out[0, 16, 29] == 0


def test_input_types_agree() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    a = resize_and_pad(arr, 24)
    b = resize_and_pad(torch.from_numpy(arr).permute(2, 0, 1), 24)
    c = resize_and_pad(Image.fromarray(arr), 24)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_square_same_size_is_identity() -> None:
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert torch.equal(resize_and_pad(img, 16), img)


def test_resize_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        resize_and_pad(np.zeros((4, 4), dtype=np.uint8), 8)
    with pytest.raises(ValueError):
        resize_and_pad(torch.zeros((3, 4, 4), dtype=torch.float32), 8)
    with pytest.raises(ValueError):
        resize_and_pad(torch.zeros((3, 4, 4), dtype=torch.uint8), 0)


# --- image bytes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_image_bytes(fmt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (60, 30), (0, 128, 255)).save(buf, format=fmt)
    out = decode_image_bytes(buf.getvalue(), 32)  # -> 32x16 at y=8
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert out[:, :8].eq(0).all() and out[:, 24:].eq(0).all()
    centre = out[:, 16, 16].tolist()
    assert all(abs(got - want) <= 3 for got, want in zip(centre, (0, 128, 255)))


def test_decode_image_bytes_rgba_png() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (10, 10), (10, 20, 30, 128)).save(buf, format="PNG")
    assert decode_image_bytes(buf.getvalue(), 10)[:, 5, 5].tolist() == [10, 20, 30]


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n garbage", b"not an image at all"])
def test_decode_image_bytes_corrupt(data: bytes) -> None:
    with pytest.raises(VideoError, match="cannot decode image"):
        decode_image_bytes(data, 32)


# --- pacing ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _frames(timestamps: list[float]) -> list[VideoFrame]:
    px = torch.zeros((3, 1, 1), dtype=torch.uint8)
    return [VideoFrame(i, t, px) for i, t in enumerate(timestamps)]


def test_paced_waits_for_timestamps() -> None:
    clock = FakeClock()
    released = []
    for frame in paced(_frames([3.0, 3.5, 4.0, 5.0]), clock=clock, sleep=clock.sleep):
        released.append(clock.now - 100.0)
        clock.now += 0.1  # consumer work between frames counts towards the wait
    assert released == pytest.approx([0.0, 0.5, 1.0, 2.0])
    assert clock.sleeps == pytest.approx([0.4, 0.4, 0.9])


def test_paced_speed_and_no_sleep_when_late() -> None:
    clock = FakeClock()
    released = []
    for frame in paced(_frames([0.0, 1.0, 2.0]), speed=2.0, clock=clock, sleep=clock.sleep):
        released.append(clock.now - 100.0)
        if frame.index == 0:
            clock.now += 3.0  # slow consumer: later frames are already due
    assert released == pytest.approx([0.0, 3.0, 3.0])
    assert clock.sleeps == []


def test_paced_rejects_bad_speed() -> None:
    with pytest.raises(ValueError, match="speed"):
        list(paced(_frames([0.0]), speed=0))


# --- bundled sample -------------------------------------------------------------------------------


def test_bundled_sample() -> None:
    """The sample is clip 2 of synthetic seed 7, at the stream rate: frame k of the file is stream frame k."""
    assert SAMPLE_VIDEO.is_file()
    assert SAMPLE_VIDEO.stat().st_size < 500_000
    info = probe_video(SAMPLE_VIDEO)
    assert (info.width, info.height) == (128, 128)
    assert info.duration_s == pytest.approx(14.0, abs=0.5)
    frames = list(iter_video_frames(SAMPLE_VIDEO, fps=2, size=64))
    assert len(frames) == info.num_frames_at(2) == 28
    assert frames[0].pixels.shape == (3, 64, 64)
    assert frames[0].pixels.float().mean() > 20  # a plain background, no letterbox bars
    # Something actually happens: frames differ over time.
    assert not torch.equal(frames[0].pixels, frames[6].pixels)
