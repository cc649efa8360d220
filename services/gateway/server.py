"""The Gateway's gRPC server (LiveStream, grpc.health.v1, reflection) on its own event-loop thread.

Both serving modes run it: `serve --local` with the services in the same process, `serve` inside each
Gateway replica on Ray (several replicas on one host share the port: gRPC sets SO_REUSEPORT, so the
kernel spreads connections over them, and a stream stays on the replica that accepted it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from functools import partial
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.gateway.calls import Unparsed, parse_message
from liveserve.services.gateway.service import Gateway

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LiveStream"].full_name


class GatewayServer:
    def __init__(self, build: Callable[[], Gateway], address: str, *, max_frame_bytes: int,
                 check_every_s: float = 2.0, name: str = "gateway",
                 credentials: grpc.ServerCredentials | None = None) -> None:
        """`build` makes the Gateway on the server's loop (its services' loop-bound parts live there too);
        every `check_every_s` it asks the pools whether they answer, and health says so. With `credentials`
        (tls.server_credentials) the port speaks TLS only, health and reflection included."""
        self._build, self._requested, self._max_frame_bytes = build, address, max_frame_bytes
        self._credentials = credentials
        self._check_every_s = check_every_s
        self.gateway: Gateway | None = None
        self.address = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop_requested: asyncio.Event | None = None
        self._grace_s = 5.0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name=name, daemon=True)

    def start(self, timeout_s: float = 120.0) -> GatewayServer:
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"the gRPC server did not start within {timeout_s:g}s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def serving(self) -> bool:
        return self._thread.is_alive() and self._started.is_set() and self._error is None

    async def _main(self) -> None:
        self.loop, self._stop_requested = asyncio.get_running_loop(), asyncio.Event()
        try:
            self.gateway = self._build()
            server, health_servicer, port = await self._serve()
            self.address = f"{self._requested.rsplit(':', 1)[0]}:{port}"
        except BaseException as exc:  # handed to the caller of start()
            self._error = exc
            return
        finally:
            self._started.set()
        watch = asyncio.get_running_loop().create_task(self._watch_health(health_servicer))
        await self._stop_requested.wait()
        watch.cancel()
        await health_servicer.enter_graceful_shutdown()  # NOT_SERVING: balancers stop sending new calls
        await self.gateway.drain(self._grace_s)  # open sessions: what was sent is decided, then UNAVAILABLE
        await server.stop(1.0)
        self.gateway.close()

    async def _serve(self) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
        message_limit = self._max_frame_bytes + (64 << 10)  # a frame plus its envelope; larger: RESOURCE_EXHAUSTED
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", message_limit),
                                          ("grpc.max_send_message_length", 4 << 20)])
        _add_live_stream(self.gateway, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        if self._credentials is None:
            port = server.add_insecure_port(self._requested)
        else:
            port = server.add_secure_port(self._requested, self._credentials)
        if port == 0:
            raise OSError(f"cannot listen on {self._requested}")
        await server.start()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        return server, health_servicer, port

    async def _watch_health(self, health_servicer: health.aio.HealthServicer) -> None:
        """SERVING while every pool answers, NOT_SERVING (and new sessions refused) while one does not."""
        serving = True
        while True:
            await asyncio.sleep(self._check_every_s)
            ok = not await self.gateway.check()
            if ok != serving:
                serving = ok
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                await health_servicer.set(SERVICE_NAME, status)
                await health_servicer.set("", status)

    def stop(self, grace_s: float = 5.0) -> None:
        """No new calls; open ones get `grace_s` to finish, then the loop exits."""
        if self.loop is not None and self._thread.is_alive() and self._stop_requested is not None:
            self._grace_s = grace_s
            self.loop.call_soon_threadsafe(self._stop_requested.set)
            self._thread.join(grace_s + 10)


def _add_live_stream(gateway: Gateway, server: grpc.aio.Server) -> None:
    open_limit = gateway.settings.max_open_bytes

    def parse_stream(data: bytes):
        """Messages over `max_open_bytes` stay unparsed until the Gateway knows they are not the Open."""
        return Unparsed(data) if len(data) > open_limit else parse_message(pb.ClientMessage, data)

    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            gateway.Stream, request_deserializer=parse_stream, response_serializer=pb.ServerMessage.SerializeToString),
        "GetTranscript": grpc.unary_unary_rpc_method_handler(
            gateway.GetTranscript, request_deserializer=partial(parse_message, pb.GetTranscriptRequest),
            response_serializer=pb.Transcript.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            gateway.ListModels, request_deserializer=partial(parse_message, pb.ListModelsRequest),
            response_serializer=pb.ModelList.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
