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
from liveserve.services.telemetry import GpuMetrics, PerceptionMetrics, sample_periodically
from liveserve.services.tracing import extract, tracer


@serve.deployment(name="Perception", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class Perception:
    def __init__(self, settings: dict | None = None) -> None:
        settings = ServiceSettings.from_dict(settings)
        self.model = load_replica_model(settings.model, vision=True, threads=settings.threads)
        if self.model.vision is None:
            raise ValueError(f"model {settings.model!r} has no vision tower to encode frames with")
        self._encode_batch.set_max_batch_size(settings.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        self.in_flight = 0
        self.metrics, self.gpu, self.tracer = PerceptionMetrics(), GpuMetrics(), tracer("perception")
        self._sampler: asyncio.Task | None = None

    async def Encode(self, request: ppb.EncodeRequest) -> ppb.EncodeResponse:
        """Raises SessionError (INVALID_ARGUMENT for the caller) for an image that cannot be decoded."""
        from liveserve.video import VideoError, decode_image_bytes

        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(sample_periodically(self.gpu.sample))
        started = time.perf_counter()
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        with self.tracer.start_as_current_span("perception.encode", context=extract(request.trace_context),
                                               attributes={"liveserve.session_id": request.session_id,
                                                           "liveserve.frame_timestamp": request.timestamp}):
            try:
                pixels = decode_image_bytes(request.image, self.model.frame_size)
                features = await self._encode_batch(pixels)
            except (ValueError, VideoError) as exc:
                raise SessionError(f"bad frame image at {request.timestamp:.3f}s: {exc}") from None
            finally:
                self.in_flight -= 1
                self.metrics.queue_depth.set(self.in_flight)
        return ppb.EncodeResponse(features=tensors.to_message(features), encode_s=time.perf_counter() - started)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        features = await asyncio.to_thread(self._encode, torch.stack(pixels))  # keep the loop taking requests
        self.metrics.batch_size.observe(len(pixels))
        self.metrics.frames_encoded.inc(len(pixels))
        return list(features.float().cpu())

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_frames(pixels.to(self.model.device))
