"""Who may call the Gateway: the API key a request carries names its tenant, and a host with too many
failed key checks in a minute is refused before its message is looked at."""

from __future__ import annotations

import math

import grpc

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.gateway.calls import CallFailed, Unparsable
from liveserve.services.security.auth import FailedAuthLimit, tenant_keys_from_env, tenant_of
from liveserve.services.settings import ServiceSettings


class Access:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.api_keys = tenant_keys_from_env(settings.api_keys_env)  # key -> tenant
        if settings.api_keys_env and not self.api_keys:
            raise ValueError(f"api_keys_env names {settings.api_keys_env}, which holds no keys")
        self.auth_failures = FailedAuthLimit(settings.auth_failures_per_min)

    def check_host(self, host: str) -> None:
        """A host with too many failed key checks this minute is refused before its message is looked at."""
        if self.api_keys and (wait := self.auth_failures.retry_after(host)):
            raise CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"too many failed api_key checks from this address (auth_failures_per_min: "
                             f"{self.settings.auth_failures_per_min}); retry in {math.ceil(wait)}s")

    def tenant(self, credentials, host: str, where: str) -> str:
        """The tenant whose key `credentials` carry; a miss counts against the host."""
        tenant = tenant_of(credentials, self.api_keys)
        if tenant is None:
            self.auth_failures.failed(host)
            raise CallFailed(grpc.StatusCode.UNAUTHENTICATED, f"missing or unknown api_key in {where}")
        return tenant

    def authenticate(self, first: pb.ClientMessage | Unparsable, host: str) -> str:
        """The tenant of a stream's first message, which must be an Open."""
        self.check_host(host)
        if isinstance(first, Unparsable):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, first.problem)
        kind = first.WhichOneof("kind")
        if kind != "open":
            raise CallFailed(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the first message of a stream must be open, got {kind or 'an empty message'}")
        return self.tenant(first.open.credentials, host, "open.credentials")
