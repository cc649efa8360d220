"""API keys for the public API: each key names its tenant; failed attempts are limited per client host."""

from __future__ import annotations

import pytest

from liveserve.services.security.auth import (ANONYMOUS, FailedAuthLimit, bare_key_tenant, peer_host, tenant_keys_from_env,
                                     tenant_of)


def test_keys_come_from_the_named_variable_each_with_its_tenant(monkeypatch):
    monkeypatch.setenv("LIVESERVE_API_KEYS", " acme:k1, k2 ,, beta : k3:x ")
    keys = tenant_keys_from_env("LIVESERVE_API_KEYS")
    assert keys == {"k1": "acme", "k2": bare_key_tenant("k2"), "k3:x": "beta"}
    assert "k2" not in bare_key_tenant("k2")  # a bare key's tenant name does not reveal the key
    assert tenant_keys_from_env("") == {}
    monkeypatch.delenv("LIVESERVE_API_KEYS")
    assert tenant_keys_from_env("LIVESERVE_API_KEYS") == {}


def test_an_open_needs_one_of_the_keys_only_when_keys_are_configured():
    keys = {"k1": "acme", "k2": "beta"}
    assert tenant_of({"api_key": "k2"}, keys) == "beta"
    assert tenant_of({"api_key": "k3"}, keys) is None
    assert tenant_of({"api_key": "k"}, keys) is None  # a prefix is not a key
    assert tenant_of({}, keys) is None
    assert tenant_of({}, {}) == ANONYMOUS


def test_failed_attempts_are_limited_per_host_in_bounded_memory():
    limit = FailedAuthLimit(per_min=3, max_sources=4)
    for _ in range(2):
        limit.failed("10.0.0.1")
    assert limit.retry_after("10.0.0.1") == 0.0
    limit.failed("10.0.0.1")
    assert 59.0 < limit.retry_after("10.0.0.1") <= 60.0
    assert limit.retry_after("10.0.0.2") == 0.0  # other hosts are not affected
    for i in range(10):
        limit.failed(f"192.168.0.{i}")
    assert len(limit._failures) == 4  # the least recently failing hosts are forgotten
    assert FailedAuthLimit(per_min=0).retry_after("10.0.0.1") == 0.0


@pytest.mark.parametrize("peer, host", [("ipv4:10.1.2.3:5000", "10.1.2.3"), ("ipv6:[::1]:41000", "::1"),
                                        ("unix:/tmp/s", "unix:/tmp/s")])
def test_the_client_host_comes_from_the_grpc_peer(peer, host):
    assert peer_host(peer) == host
