"""Serve the LiveStream API from one process: the same Gateway as on Ray, with Perception, Decision and
Reaction as plain objects in this process (the in-process transport: no serialization, no hops).

The single-host deployment (development, edge boxes, tests); `liveserve serve --local` runs it until
SIGINT/SIGTERM, then stops taking new sessions, lets open calls finish for a grace period, and exits.
Threads: the gRPC server and Gateway on one event loop; Perception's encoder, the Decision engine and
the Reaction engine each on their own thread.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading

from liveserve.model.live import LiveModel
from liveserve.model.qwen_vl import FramePixels
from liveserve.services.decision.service import DecisionService
from liveserve.services.gateway.service import Gateway
from liveserve.services.gateway.model_pools import PoolSeams
from liveserve.services.perception.service import FrameEncoder
from liveserve.services.reaction.service import ReactionService
from liveserve.services.state.redis_server import connect
from liveserve.services.state.registry import SessionRegistry
from liveserve.services.wire.seams import LocalPerception, LocalSessions
from liveserve.services.gateway.server import GatewayServer
from liveserve.services.settings import ServiceSettings
from liveserve.services.security.tls import server_credentials

log = logging.getLogger(__name__)


class LocalServer:
    """A running single-process server (see `start_local`)."""

    def __init__(self, model: LiveModel, address: str, settings: ServiceSettings,
                 reaction_model: LiveModel | None = None, registry: SessionRegistry | None = None) -> None:
        if settings.models is not None:
            raise ValueError("`models` (several models in one deployment) needs `liveserve serve` on Ray; one "
                             "process serves one model")
        self.settings, self.registry = settings, registry
        credentials = server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        # A commentary model (Qwen2.5-VL) encodes its chunks in Decision and writes what it says there too:
        # Perception only decodes and resizes its frames, and it has no Reaction.
        self.family = model.family
        commentary = model.family != "live"
        if commentary and reaction_model is not None:
            raise ValueError(f"{model.name} is a commentary model: it writes what it says itself, so a reaction "
                             "model does not apply")
        frames = FramePixels(model.frame_size, model.name, model.family, model.frame_unit,
                             model.pixel_bounds) if commentary else model
        self.encoder = FrameEncoder(frames, settings.max_batch_size, settings.max_frame_pixels)
        self.decision = DecisionService(model, settings, replica="local", registry=registry)
        self.reaction = None if commentary else ReactionService(reaction_model or model, settings, replica="local")
        self.server = GatewayServer(self._gateway, address, max_frame_bytes=settings.max_frame_bytes,
                                    check_every_s=settings.heartbeat_s, name="grpc-server", credentials=credentials)

    def _gateway(self) -> Gateway:
        (model,) = self.settings.served_models()
        model = dataclasses.replace(model, family=self.family)  # the model loaded here, whatever its name says
        reaction = LocalSessions(self.reaction) if self.reaction is not None else None
        return Gateway([PoolSeams(model, LocalPerception(self.encoder), LocalSessions(self.decision), reaction)],
                       self.settings, gateway_id="local",
                       registry=self.registry)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def engine(self):
        """The Decision engine (its KV pool and sessions), for operators' figures and tests."""
        return self.decision.engine

    def start(self) -> LocalServer:
        try:
            self.server.start()
        except BaseException:
            self._stop_services()
            raise
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        self.server.stop(grace_s)
        self._stop_services()

    def _stop_services(self) -> None:
        self.decision.stop()
        if self.reaction is not None:
            self.reaction.stop()
        self.encoder.close()


def start_local(model: LiveModel, address: str = "127.0.0.1:0", settings: ServiceSettings | None = None, *,
                reaction_model: LiveModel | None = None, registry: SessionRegistry | None = None,
                redis_url: str | None = None) -> LocalServer:
    """Start the services and the gRPC server; returns once listening (`.address` has the bound port).
    With a `registry` (or a `redis_url` to make one), sessions are recorded in Redis (GetTranscript reads
    them back) and tenants' sessions are counted there (several servers then share a quota); without,
    nothing is recorded and tenants are counted in this process."""
    settings = settings or ServiceSettings()
    if registry is None and redis_url:
        registry = SessionRegistry(connect(redis_url)[0], ttl_s=settings.session_ttl_s,
                                   closed_ttl_s=settings.closed_ttl_s)
    return LocalServer(model, address, settings, reaction_model, registry).start()


def serve_forever(server: LocalServer, grace_s: float = 5.0) -> None:
    """Block until SIGINT or SIGTERM, then shut down gracefully."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    log.info("shutting down: no new sessions, %.0fs grace for open ones", grace_s)
    server.stop(grace_s)
