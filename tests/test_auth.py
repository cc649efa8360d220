"""API keys for the public API (the Gateway refuses an Open without an accepted key when keys are set)."""

from __future__ import annotations

from liveserve.services.auth import api_key_accepted, api_keys_from_env


def test_keys_come_from_the_named_variable(monkeypatch):
    monkeypatch.setenv("LIVESERVE_API_KEYS", " k1, k2 ,,")
    assert api_keys_from_env("LIVESERVE_API_KEYS") == {"k1", "k2"}
    assert api_keys_from_env("") == frozenset()
    monkeypatch.delenv("LIVESERVE_API_KEYS")
    assert api_keys_from_env("LIVESERVE_API_KEYS") == frozenset()


def test_an_open_needs_one_of_the_keys_only_when_keys_are_configured():
    keys = frozenset({"k1", "k2"})
    assert api_key_accepted({"api_key": "k2"}, keys)
    assert not api_key_accepted({"api_key": "k3"}, keys)
    assert not api_key_accepted({"api_key": "k"}, keys)  # a prefix is not a key
    assert not api_key_accepted({}, keys)
    assert api_key_accepted({}, frozenset())
