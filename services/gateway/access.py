"""Who may call the Gateway: the API key a request carries names its tenant. Failed key checks are limited
by what the failing client controls (auth.py): the key it presents, and its address where that is its own
(client_address.py); a valid key is always admitted, whoever else failed from the same address."""

from __future__ import annotations

import logging
import math

import grpc

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.gateway.calls import CallFailed, Unparsable
from liveserve.services.security.auth import FailedAuthLimit, key_source, peer_host, tenant_keys_from_env, tenant_of
from liveserve.services.security.client_address import FORWARDED_FOR, TrustedProxies
from liveserve.services.settings import ServiceSettings

log = logging.getLogger(__name__)
SHORT_KEY_CHARS = 16  # keys shorter than this can be guessed: the failure limit does not keep keys secret


class Access:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.api_keys = tenant_keys_from_env(settings.api_keys_env)  # key -> tenant
        if settings.api_keys_env and not self.api_keys:
            raise ValueError(f"api_keys_env names {settings.api_keys_env}, which holds no keys")
        if short := sorted({tenant for key, tenant in self.api_keys.items() if len(key) < SHORT_KEY_CHARS}):
            log.warning("API keys of %s are shorter than %d characters: use long random keys (e.g. openssl rand "
                        "-hex 32)", ", ".join(short), SHORT_KEY_CHARS)
        self.proxies = TrustedProxies(settings.trusted_proxies)
        # Two limits, so that many keys tried from one address cannot push that address out of memory.
        self.key_failures = FailedAuthLimit(settings.auth_failures_per_min)
        self.address_failures = FailedAuthLimit(settings.auth_failures_per_min)

    def client_address(self, context: grpc.aio.ServicerContext) -> str | None:
        """The calling client's own address (a trusted proxy's forwarded one), None when it is not known."""
        forwarded = ",".join(value for key, value in context.invocation_metadata() or () if key == FORWARDED_FOR)
        return self.proxies.client_address(peer_host(context.peer() or ""), forwarded)

    def tenant(self, credentials, address: str | None, where: str) -> str:
        """The tenant whose key `credentials` carry. A miss counts against the key's prefix and `address`
        (the client's own, or None); once either is over `auth_failures_per_min`, misses are refused with
        RESOURCE_EXHAUSTED and a retry time instead of UNAUTHENTICATED."""
        tenant = tenant_of(credentials, self.api_keys)  # always checked: a valid key is never refused
        if tenant is not None:
            return tenant
        sources = [(self.key_failures, key_source(credentials.get("api_key", "")), "with this api_key")]
        if address is not None:
            sources.append((self.address_failures, address, "from this address"))
        for limit, source, which in sources:
            if wait := limit.retry_after(source):
                raise CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"too many failed api_key checks {which} (auth_failures_per_min: "
                                 f"{self.settings.auth_failures_per_min}); retry in {math.ceil(wait)}s")
        for limit, source, _ in sources:
            limit.failed(source)
        raise CallFailed(grpc.StatusCode.UNAUTHENTICATED, f"missing or unknown api_key in {where}")

    def authenticate(self, first: pb.ClientMessage | Unparsable, address: str | None) -> str:
        """The tenant of a stream's first message, which must be an Open."""
        if isinstance(first, Unparsable):
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, first.problem)
        kind = first.WhichOneof("kind")
        if kind != "open":
            raise CallFailed(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the first message of a stream must be open, got {kind or 'an empty message'}")
        return self.tenant(first.open.credentials, address, "open.credentials")
