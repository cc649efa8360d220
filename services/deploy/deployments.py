"""The Ray Serve deployments: thin shells that load a replica's model, decode the internal protobuf
contracts (codec.py) and hand the dataclasses to the same service objects `serve --local` runs.

Gateway replicas serve the public gRPC API themselves (server.GatewayServer on `address`), so a
client's messages reach the Gateway without a relay through Serve's proxy; the Gateway reaches the
other pools through deployment handles, one call per tick and replica.
"""

from __future__ import annotations

import os

import redis
from ray import serve

from liveserve.engine.kv_pool import PoolFullError

from liveserve.internal.v2 import perception_pb2 as ppb
from liveserve.internal.v2 import session_pb2 as spb
from liveserve.services.wire import codec
from liveserve.services.decision.service import DecisionService
from liveserve.services.gateway.service import Gateway
from liveserve.services.gateway.model_pools import PoolSeams
from liveserve.services.perception.service import FrameEncoder, load_perception_model
from liveserve.services.reaction.service import ReactionService
from liveserve.services.state.redis_server import connect
from liveserve.services.state.registry import SessionRegistry
from liveserve.model.loading import require_live
from liveserve.services.replica.startup import load_replica_model, replica_id
from liveserve.services.deploy.request_log import quiet_refusals, refused
from liveserve.services.deploy.routing import SESSION_ROUTER
from liveserve.services.wire.seams import RayPerception, ray_decision, ray_reaction
from liveserve.services.gateway.server import GatewayServer
from liveserve.services.settings import ServiceSettings
from liveserve.services.observability.telemetry import use_ray_metrics
from liveserve.services.security.tls import server_credentials
from liveserve.services.gateway.web import web_app


def _settings(values: dict | None) -> ServiceSettings:
    use_ray_metrics()  # before any service creates its metrics
    quiet_refusals()
    return ServiceSettings.from_dict(values)


def _registry(settings: ServiceSettings) -> SessionRegistry:
    """The session registry at REDIS_URL (set for every replica by the launcher or the manifests)."""
    return SessionRegistry(connect()[0], ttl_s=settings.session_ttl_s, closed_ttl_s=settings.closed_ttl_s)


def _registry_reader(settings: ServiceSettings) -> SessionRegistry | None:
    """The registry for GetTranscript, connecting at its first read: a Gateway starts, and streams, while
    Redis is away (GetTranscript then answers UNAVAILABLE). None without REDIS_URL."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return None
    return SessionRegistry(redis.Redis.from_url(url, decode_responses=True), ttl_s=settings.session_ttl_s,
                           closed_ttl_s=settings.closed_ttl_s)


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0})
@serve.ingress()  # the browser front on Serve's HTTP proxy: __serve_build_asgi_app__
class GatewayDeployment:
    def __init__(self, pools: dict, settings: dict | None = None) -> None:
        """`pools`: {model name: {"perception", "decision", "reaction": its deployments' handles}} (app.py)."""
        settings = _settings(settings)
        served = settings.served_models()
        self.grace_s = settings.drain_timeout_s
        # The same files on every gateway host (e.g. a mounted Secret); a bad one fails the replica at once.
        credentials = server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        # Read by GetTranscript (Decision writes it); tenants' sessions are counted there over every gateway.
        registry = _registry_reader(settings)

        def build() -> Gateway:
            perception = {}  # one seam per Perception pool: models that share the pool share its batches
            models = []
            for model in served:
                handles = pools[model.name]
                seam = perception.setdefault(model.perception_pool, RayPerception(handles["perception"]))
                reaction = handles["reaction"]  # None: a commentary model, which writes its replies in Decision
                models.append(PoolSeams(model, seam, ray_decision(handles["decision"]),
                                        ray_reaction(reaction) if reaction is not None else None))
            return Gateway(models, settings, gateway_id=replica_id(), registry=registry)

        self.server = GatewayServer(build, settings.address, max_frame_bytes=settings.max_frame_bytes,
                                    check_every_s=settings.heartbeat_s, credentials=credentials).start()
        self._tls = credentials is not None

    def __serve_build_asgi_app__(self):
        """The page and /v1/stream (web.py), relaying to this replica's own gRPC port on loopback."""
        refusal = "the browser front relays to the gRPC API in plaintext; this deployment serves it over TLS only"
        return web_app(self.server.address, refusal=refusal if self._tls else "")

    async def Address(self) -> str:
        """Where this replica serves the public API (tools and tests)."""
        return self.server.address

    def check_health(self) -> None:
        if not self.server.serving:
            raise RuntimeError("the gateway's gRPC server is not running")

    def record_autoscaling_stats(self) -> dict:
        """What the Gateway pool scales on (services/deploy/autoscaling.py): the streams it holds."""
        gateway = self.server.gateway
        return {"sessions": float(len(gateway.sessions)) if gateway is not None else 0.0}

    def __del__(self) -> None:  # Serve stops the replica: its streams drain, then end UNAVAILABLE
        server = getattr(self, "server", None)
        if server is not None:
            server.stop(grace_s=self.grace_s)


@serve.deployment(name="Perception", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
class PerceptionDeployment:
    def __init__(self, settings: dict | None = None) -> None:
        settings = _settings(settings)
        self.encoder = FrameEncoder(load_perception_model(settings.model, threads=settings.threads),
                                    settings.max_batch_size, settings.max_frame_pixels)

    async def Ping(self) -> None:
        pass

    async def Encode(self, request: ppb.EncodeRequest) -> ppb.EncodeResponse:
        result = await self.encoder.encode(codec.encode_request_from_proto(request))
        return codec.encode_result_to_proto(result)

    def record_autoscaling_stats(self) -> dict:
        """What the Perception pool scales on (services/deploy/autoscaling.py): how busy the encoder was."""
        return {"busy_fraction": self.encoder.busy_fraction()}


class _SessionPool:
    """Decision and Reaction: a service holding sessions, reached with Open, Push and an Events stream per
    gateway; `push_from_proto` and `events_to_proto` are that service's codec."""

    service: DecisionService | ReactionService
    push_from_proto = events_to_proto = None

    async def Ping(self) -> None:
        await self.service.ping()

    async def Open(self, request: spb.OpenRequest, avoid: str = "") -> spb.OpenResponse:  # avoid: for the router
        try:
            placed = await self.service.open(codec.open_from_proto(request))
        except (PoolFullError, ValueError) as exc:  # no room, or settings that do not fit: the client is told
            refused(exc)
            raise
        return codec.placed_to_proto(placed)

    async def Push(self, request, route_to: str = "") -> spb.PushAck:
        await self.service.push(type(self).push_from_proto(request))
        return spb.PushAck()

    async def Events(self, request: spb.EventsRequest, route_to: str = ""):
        async for batch in self.service.events(request.gateway_id):
            yield type(self).events_to_proto(batch)

    def record_autoscaling_stats(self) -> dict:
        """What the pool scales on (services/deploy/autoscaling.py): sessions held, KV pool reserved."""
        load = self.service.load()
        return {"sessions": float(load["sessions"]), "kv_used_fraction": load["kv_used_fraction"]}

    def record_routing_stats(self) -> dict:
        """What the router places new sessions by: the free share of the KV pool, and sessions held."""
        load = self.service.load()
        return {"sessions": load["sessions"], "free_fraction": load["free_fraction"],
                "max_sessions": load.get("max_sessions", 0)}

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.stop()


@serve.deployment(name="Decision", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096,
                  request_router_config=SESSION_ROUTER)
class DecisionDeployment(_SessionPool):
    push_from_proto, events_to_proto = codec.decision_push_from_proto, codec.decision_events_to_proto

    def __init__(self, settings: dict | None = None) -> None:
        settings = _settings(settings)
        model = load_replica_model(settings.model, vision=False, threads=settings.threads)
        self.service = DecisionService(model, settings, replica_id(), _registry(settings))

    async def Sessions(self, route_to: str = "") -> dict:
        """This replica's id and its sessions, with how far each got (operators' tools, and tests)."""
        return {"replica": self.service.replica, "sessions": self.service.report()}


@serve.deployment(name="Reaction", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096,
                  request_router_config=SESSION_ROUTER)
class ReactionDeployment(_SessionPool):
    push_from_proto, events_to_proto = codec.reaction_push_from_proto, codec.reaction_events_to_proto

    def __init__(self, settings: dict | None = None) -> None:
        settings = _settings(settings)
        model = load_replica_model(settings.reaction_model or settings.model, vision=False, threads=settings.threads)
        self.service = ReactionService(require_live(model, "a Reaction pool"), settings, replica_id())
