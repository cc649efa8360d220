"""Perception: the stateless, batched frame-encoder pool (vision tower + pooling -> frame features).

Frames from every session are encoded together (Serve dynamic batching: up to `max_batch_size`
frames, waiting at most `batch_wait_ms` for company). The output is the vision features the Decision
and Reaction models' own connectors read, so a larger Reaction model can share this pool.
"""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from liveserve.engine.inputs import SessionError
from liveserve.internal.v1 import perception_pb2 as ppb
from liveserve.services import tensors
from liveserve.services.replica import load_replica_model
from liveserve.services.settings import ServiceSettings


@serve.deployment(name="Perception", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class Perception:
    def __init__(self, settings: dict | None = None) -> None:
        settings = ServiceSettings.from_dict(settings)
        self.model = load_replica_model(settings.model, vision=True, threads=settings.threads)
        if self.model.vision is None:
            raise ValueError(f"model {settings.model!r} has no vision tower to encode frames with")
        self._encode_batch.set_max_batch_size(settings.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        self.batches = self.frames = 0

    async def Encode(self, request: ppb.EncodeRequest) -> ppb.EncodeResponse:
        """Raises SessionError (INVALID_ARGUMENT for the caller) for an image that cannot be decoded."""
        from liveserve.video import VideoError, decode_image_bytes

        started = time.perf_counter()
        try:
            pixels = decode_image_bytes(request.image, self.model.frame_size)
        except (ValueError, VideoError) as exc:
            raise SessionError(f"bad frame image at {request.timestamp:.3f}s: {exc}") from None
        features = await self._encode_batch(pixels)
        return ppb.EncodeResponse(features=tensors.to_message(features), encode_s=time.perf_counter() - started)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        features = await asyncio.to_thread(self._encode, torch.stack(pixels))  # keep the loop taking requests
        self.batches, self.frames = self.batches + 1, self.frames + len(pixels)
        return list(features.float().cpu())

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_frames(pixels.to(self.model.device))
