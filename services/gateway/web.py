"""The browser front: the LiveStream session protocol over a WebSocket, and the page that uses it.

`/v1/stream` relays one WebSocket to one gRPC `LiveStream/Stream` call on the gateway's own address
(loopback), so API keys, validation, limits and errors are exactly the gRPC API's. Messages are the
ClientMessage / ServerMessage protobufs, in either encoding, chosen by the client's first message:
- a text frame is protobuf JSON (field names as in the .proto, `bytes` as base64, enums by name), e.g.
  {"open": {"fps": 2, "credentials": {"api_key": "..."}}} or {"frame": {"timestamp": 0.5, "image": "<JPEG, base64>"}};
  replies are JSON ServerMessages with every field present, 64-bit integers as numbers;
- a binary frame is a serialized ClientMessage; replies are then serialized ServerMessages.
When the call ends with a status other than OK, a last ServerMessage {"error": {"code", "message"}} carries
it, and the WebSocket closes with code 4000 + the gRPC status code (4016 UNAUTHENTICATED, 4003
INVALID_ARGUMENT, ...); a call that ends well closes with 1000. A message that is not a ClientMessage ends
the session with 4003. A client that closes its WebSocket cancels the call.

`GET /v1/models` answers ListModels as JSON ({"models": [...]}; the API key, where the deployment has
keys, in an `X-Api-Key` header), or a refusal as {"error": {"code", "status", "message"}} with an HTTP
status to match (401, 429, 412, 503...).

Served by `liveserve serve --local --http-port` (local_http.py) and on Ray by each Gateway replica as
its Serve HTTP ingress (deployments.py), both with the page at `/`.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from importlib import resources

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.services.security.client_address import FORWARDED_FOR

STREAM_PATH = "/v1/stream"
MODELS_PATH = "/v1/models"
# gRPC status -> HTTP status, for the models list's refusals
HTTP_STATUS = {grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 412,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}
CLOSE_OK = 1000
CLOSE_STATUS_BASE = 4000  # + the gRPC status code: WebSocket close codes 4000-4999 are the application's
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}


class BadClientMessage(ValueError):
    """A WebSocket message that is not a ClientMessage in the session's encoding."""


def forwarded_for(connection: WebSocket | Request) -> tuple[tuple[str, str], ...]:
    """The relayed call's metadata: the browser's address after any the front was forwarded, so the
    Gateway, which sees every relayed call from loopback (a trusted proxy by default), counts failed keys
    against the browser's address rather than its own front's (client_address.py)."""
    chain = [entry for entry in (connection.headers.get(FORWARDED_FOR, ""),
                                 connection.client.host if connection.client else "") if entry]
    return ((FORWARDED_FOR, ", ".join(chain)),) if chain else ()


def loopback_target(address: str) -> str:
    """Where a bridge on the gateway's host reaches its gRPC server: a wildcard host becomes loopback."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("", "0.0.0.0", "[::]", "::") else address


def parse_client_message(data: str | bytes) -> pb.ClientMessage:
    try:
        if isinstance(data, bytes):
            return pb.ClientMessage.FromString(data)
        return json_format.Parse(data, pb.ClientMessage())
    except (json_format.ParseError, DecodeError, ValueError) as exc:
        kind = "binary ClientMessage" if isinstance(data, bytes) else "ClientMessage JSON"
        raise BadClientMessage(f"not a {kind}: {str(exc)[:200]}") from None


def server_message_json(message: pb.ServerMessage) -> str:
    return json.dumps(json_format.MessageToDict(message, always_print_fields_with_no_presence=True,
                                                preserving_proto_field_name=True, unquote_int64_if_possible=True),
                      separators=(",", ":"), ensure_ascii=False)


async def bridge(websocket: WebSocket, channel: _Channel) -> None:
    """Relay one WebSocket to one LiveStream/Stream call on `channel` until either side ends."""
    await websocket.accept()
    first = await _receive(websocket)
    if first is None:
        return
    binary = isinstance(first, bytes)

    async def send(message: pb.ServerMessage) -> None:
        if binary:
            await websocket.send_bytes(message.SerializeToString())
        else:
            await websocket.send_text(server_message_json(message))

    async def end(code: grpc.StatusCode, details: str) -> None:
        if code != grpc.StatusCode.OK:
            await send(pb.ServerMessage(error=pb.Error(code=code.value[0], message=details)))
        await websocket.close(CLOSE_OK if code == grpc.StatusCode.OK else CLOSE_STATUS_BASE + code.value[0])

    try:
        opening = parse_client_message(first)
    except BadClientMessage as exc:
        await end(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return
    call = _Call(channel.stub(), opening, asyncio.get_running_loop(), forwarded_for(websocket))
    failure: list[BadClientMessage] = []
    reader = asyncio.get_running_loop().create_task(_relay_client(websocket, call, failure))
    try:
        while not isinstance(item := await call.responses.get(), tuple):
            await send(item)
        code, details = item
        if failure:  # the client's bad message cancelled the call: say why
            await end(grpc.StatusCode.INVALID_ARGUMENT, str(failure[0]))
        elif not call.cancelled:  # else the browser has gone: nobody to tell
            await end(code, details)
    except (WebSocketDisconnect, RuntimeError):  # the browser went away mid-send
        pass
    finally:
        reader.cancel()
        call.cancel()


class _Channel:
    """One plaintext channel to the gateway, made on first use and shared by the app's sessions."""

    def __init__(self, target: str) -> None:
        self._target, self._stub = target, None
        self._lock = threading.Lock()

    def stub(self) -> pb_grpc.LiveStreamStub:
        with self._lock:
            if self._stub is None:
                # No send limit here: the gateway's own limits answer an oversized frame, as on gRPC.
                options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 4 << 20)]
                self._stub = pb_grpc.LiveStreamStub(grpc.insecure_channel(self._target, options=options))
            return self._stub


class _Call:
    """One LiveStream/Stream call, read on its own thread; its messages, then its (code, details), arrive
    in `responses` on the loop. Blocking gRPC rather than grpc.aio: there, a write that races the server's
    abort replaces the server's status with INTERNAL, and the browser would never learn why."""

    def __init__(self, stub: pb_grpc.LiveStreamStub, opening: pb.ClientMessage, loop: asyncio.AbstractEventLoop,
                 metadata: tuple[tuple[str, str], ...] = ()):
        self.responses: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self._loop = loop
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put(opening)
        self._call = stub.Stream(iter(self._requests.get, None), metadata=metadata)
        threading.Thread(target=self._read, name="web-stream", daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self._call:
                self._deliver(message)
            status = (grpc.StatusCode.OK, "")
        except grpc.RpcError as exc:
            status = (exc.code(), exc.details() or "")
        self._deliver(status)

    def _deliver(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self.responses.put_nowait, item)
        except RuntimeError:  # the loop has closed: the server is gone
            self.cancel()

    def send(self, message: pb.ClientMessage) -> None:
        self._requests.put(message)

    def done_writing(self) -> None:
        self._requests.put(None)

    def cancel(self) -> None:
        if not self._call.done():
            self.cancelled = True
            self._call.cancel()
        self._requests.put(None)


async def _relay_client(websocket: WebSocket, call: _Call, failure: list) -> None:
    """The browser's messages into the call. A Close message half-closes the call (what was sent is still
    decided and replied to); a closed WebSocket or a bad message cancels it."""
    try:
        while (data := await _receive(websocket)) is not None:
            message = parse_client_message(data)
            call.send(message)
            if message.HasField("close"):
                call.done_writing()  # the server decides what was sent, then ends the call
                return
    except BadClientMessage as exc:
        failure.append(exc)
    call.cancel()  # the browser is gone (or spoke nonsense): free the session now


async def _receive(websocket: WebSocket) -> str | bytes | None:
    """The next message's payload, or None once the client closed."""
    try:
        message = await websocket.receive()
    except (WebSocketDisconnect, RuntimeError):
        return None
    if message["type"] == "websocket.disconnect":
        return None
    return message["bytes"] if message.get("bytes") is not None else message.get("text", "")


async def refuse(websocket: WebSocket, reason: str) -> None:
    """Answer the client's first message (its Open) with `reason`, as the gRPC API answers a refused Open."""
    await websocket.accept()
    if (first := await _receive(websocket)) is None:
        return
    code = grpc.StatusCode.FAILED_PRECONDITION
    message = pb.ServerMessage(error=pb.Error(code=code.value[0], message=reason))
    if isinstance(first, bytes):
        await websocket.send_bytes(message.SerializeToString())
    else:
        await websocket.send_text(server_message_json(message))
    await websocket.close(CLOSE_STATUS_BASE + code.value[0])


def _error_response(code: grpc.StatusCode, message: str) -> Response:
    body = json.dumps({"error": {"code": code.value[0], "status": code.name, "message": message}})
    return Response(body, status_code=HTTP_STATUS.get(code, 500), media_type="application/json")


def page_response(path: str) -> Response:
    name, media_type = PAGE_FILES[path]
    body = (resources.files("liveserve") / "web" / name).read_bytes()
    return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})


def web_app(grpc_address: str, refusal: str = "") -> Starlette:
    """The page and the WebSocket bridge to the gRPC API at `grpc_address` (plaintext, on this host).
    With a `refusal`, every stream is refused with it (FAILED_PRECONDITION) instead."""
    channel = _Channel(loopback_target(grpc_address))

    async def page(request: Request) -> Response:
        return page_response(request.url.path)

    async def stream(websocket: WebSocket) -> None:
        if refusal:
            await refuse(websocket, refusal)
        else:
            await bridge(websocket, channel)

    async def models(request: Request) -> Response:
        if refusal:
            return _error_response(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        api_key = request.headers.get("x-api-key", "")
        listing = pb.ListModelsRequest(credentials={"api_key": api_key} if api_key else {})
        try:
            answer = await asyncio.to_thread(channel.stub().ListModels, listing, timeout=10,
                                             metadata=forwarded_for(request))
        except grpc.RpcError as exc:
            return _error_response(exc.code(), exc.details() or "")
        return Response(json_format.MessageToJson(answer, always_print_fields_with_no_presence=True,
                                                  preserving_proto_field_name=True),
                        media_type="application/json", headers={"Cache-Control": "no-cache"})

    routes = [Route(path, page) for path in PAGE_FILES] + [Route(MODELS_PATH, models),
                                                           WebSocketRoute(STREAM_PATH, stream)]
    return Starlette(routes=routes)
