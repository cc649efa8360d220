"""What a call brings to the Gateway that is not a parsed message, and how a call is ended early.

server.py's deserializers hand over `Unparsable` or `Unparsed` instead of failing the call themselves, so
the Gateway ends it with a status of its own choosing (`CallFailed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from liveserve.api.v1 import live_stream_pb2 as pb


@dataclass(frozen=True, slots=True)
class Unparsable:
    """A client message that protobuf could not parse (server.py's deserializer); ends the call."""

    problem: str


@dataclass(frozen=True, slots=True)
class Unparsed:
    """A client message over `max_open_bytes`, not parsed yet: refused if it is the first (an Open is
    small), parsed when the session reads it (frames may be larger)."""

    data: bytes

    def parse(self) -> pb.ClientMessage | Unparsable:
        return parse_message(pb.ClientMessage, self.data)


def parse_message(message_type, data: bytes):
    """A client's message of `message_type`, or what was wrong with it: the Gateway ends the call with
    INVALID_ARGUMENT rather than let gRPC drop the message or fail the call with an unrelated status."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        return Unparsable(f"a message could not be parsed as {message_type.DESCRIPTOR.full_name} ({exc})")


class CallFailed(Exception):
    """Ends the call with `code` and `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details
