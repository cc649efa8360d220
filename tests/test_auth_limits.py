"""Failed-key limits by what the failing client controls: the key it presents and, where the address is its
own, its address; a trusted proxy's forwarded address counts as the client's. A valid key is admitted
from an address another client flooded with bad keys, served by `serve --local` and by a Gateway on the
Ray application's pools."""

from __future__ import annotations

import grpc
import pytest

from stream_helpers import kinds, stream
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.deploy.local import start_local
from liveserve.services.security.auth import key_source
from liveserve.services.security.client_address import TrustedProxies
from liveserve.services.settings import ServiceSettings

KEYS = "acme:acme-key-0123456789abcdef, beta:beta-key-0123456789abcdef"
GOOD = "acme-key-0123456789abcdef"


def opening(key: str) -> list[pb.ClientMessage]:
    return [pb.ClientMessage(open=pb.Open(credentials={"api_key": key}, decisions_only=True)),
            pb.ClientMessage(close=pb.Close())]


def answer(address: str, key: str, forwarded: str = "") -> grpc.StatusCode:
    """The status an Open with `key` ends with (OK: opened and closed), sent via a proxy forwarding `forwarded`."""
    try:
        replies = stream(address, opening(key), timeout=30,
                         metadata=(("x-forwarded-for", forwarded),) if forwarded else None)
    except grpc.RpcError as exc:
        return exc.code()
    assert kinds(replies) == ["opened", "closed"]
    return grpc.StatusCode.OK


def flood(address: str, count: int, forwarded: str = "") -> list[grpc.StatusCode]:
    """`count` Opens, each with a different wrong key (a new prefix each time: only the address is shared)."""
    return [answer(address, f"{i:08d}-wrong", forwarded) for i in range(count)]


# ---- units ---------------------------------------------------------------------------------------------------

def test_the_clients_own_address_is_the_peers_unless_a_trusted_proxy_forwards_one():
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])
    assert proxies.client_address("192.0.2.4", "203.0.113.9") == "192.0.2.4"  # not a proxy: its header is ignored
    assert proxies.client_address("10.1.2.3", "203.0.113.9") == "203.0.113.9"
    # Each proxy appends the address it was reached from: entries left of the first untrusted one are forgeable.
    assert proxies.client_address("10.1.2.3", "198.51.100.1, 203.0.113.9, 10.9.9.9") == "203.0.113.9"
    assert proxies.client_address("127.0.0.1", "[2001:db8::5]:443") == "2001:db8::5"
    assert proxies.client_address("::ffff:127.0.0.1", "203.0.113.9:5000") == "203.0.113.9"
    assert proxies.client_address("10.1.2.3", "") is None  # a proxy that hides its clients: no address
    assert proxies.client_address("10.1.2.3", "10.0.0.7") is None
    assert proxies.client_address("10.1.2.3", "unknown") is None
    assert TrustedProxies([]).client_address("127.0.0.1", "203.0.113.9") == "127.0.0.1"
    with pytest.raises(ValueError, match="trusted_proxies"):
        ServiceSettings(trusted_proxies=("10.0.0.0/33",))


def test_failures_count_per_key_prefix_without_keeping_the_key():
    assert key_source("abcdefgh-1") == key_source("abcdefgh-2") != key_source("abcdefgX-1")
    assert "abcdefgh" not in key_source("abcdefgh-1")


def test_the_browser_front_forwards_the_browsers_address_after_those_it_was_forwarded():
    from starlette.requests import Request

    from liveserve.services.gateway.web import forwarded_for

    def request(headers: list, client) -> Request:
        return Request({"type": "http", "headers": headers, "client": client})

    relayed = request([(b"x-forwarded-for", b"203.0.113.1")], ("198.51.100.2", 5000))
    assert forwarded_for(relayed) == (("x-forwarded-for", "203.0.113.1, 198.51.100.2"),)
    assert forwarded_for(request([], ("198.51.100.2", 5000))) == (("x-forwarded-for", "198.51.100.2"),)
    assert forwarded_for(request([], None)) == ()
    # The Gateway, reached from loopback, then counts the browser's own address.
    assert TrustedProxies(["127.0.0.1"]).client_address("127.0.0.1", "198.51.100.2") == "198.51.100.2"


# ---- over gRPC -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(tiny_model):
    mp = pytest.MonkeyPatch()
    mp.setenv("LIVESERVE_LIMIT_KEYS", KEYS)
    servers = {}

    def start(**settings) -> str:
        server = start_local(tiny_model, "127.0.0.1:0", ServiceSettings(
            api_keys_env="LIVESERVE_LIMIT_KEYS", pool_mb=8, auth_failures_per_min=3, **settings))
        servers[len(servers)] = server
        return server.address

    yield start
    for server in servers.values():
        server.stop(grace_s=1)
    mp.undo()


def test_a_flooded_address_refuses_bad_keys_and_admits_a_valid_one(keyed):
    address = keyed(trusted_proxies=())  # loopback is nobody's proxy here: the peer's address is the client's
    assert flood(address, 3) == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert answer(address, "zzzzzzzz-new") == grpc.StatusCode.RESOURCE_EXHAUSTED  # a new key, the same address
    assert answer(address, GOOD) == grpc.StatusCode.OK
    assert answer(address, "beta-key-0123456789abcdef") == grpc.StatusCode.OK


def test_behind_a_trusted_proxy_the_forwarded_address_is_counted(keyed):
    address = keyed()  # loopback is trusted by default (the browser front, a sidecar)
    assert flood(address, 3, forwarded="203.0.113.7") == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert answer(address, "zzzzzzzz-new", "203.0.113.7") == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert answer(address, GOOD, "203.0.113.7") == grpc.StatusCode.OK
    # Other clients behind the same proxy are not refused for the flooder's failures.
    assert answer(address, "yyyyyyyy-new", "203.0.113.8") == grpc.StatusCode.UNAUTHENTICATED
    # A proxy that forwards no address: the key's prefix is all that is counted, and the proxy's address never.
    assert flood(address, 4) == [grpc.StatusCode.UNAUTHENTICATED] * 4
    statuses = [answer(address, "xxxxxxxx-same") for _ in range(4)]
    assert statuses == [grpc.StatusCode.UNAUTHENTICATED] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert answer(address, GOOD) == grpc.StatusCode.OK


def test_list_models_and_transcripts_share_the_limit_and_admit_a_valid_key(keyed):
    address = keyed(trusted_proxies=())
    from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.LiveStreamStub(channel)
        codes = []
        for i in range(4):
            try:
                stub.ListModels(pb.ListModelsRequest(credentials={"api_key": f"{i:08d}-wrong"}), timeout=10)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert stub.ListModels(pb.ListModelsRequest(credentials={"api_key": GOOD}), timeout=10).models


# ---- on the Ray application's pools --------------------------------------------------------------------------

def test_on_ray_a_valid_key_is_admitted_from_a_flooded_address(ray_app, monkeypatch):
    """The Gateway a Ray Gateway replica runs (Ray handles to the application's pools, its own gRPC server),
    here in the test's process so it can have keys the shared application does not."""
    from ray import serve

    from liveserve.services.gateway.model_pools import PoolSeams
    from liveserve.services.gateway.server import GatewayServer
    from liveserve.services.gateway.service import Gateway
    from liveserve.services.wire.seams import RayPerception, ray_decision, ray_reaction

    monkeypatch.setenv("LIVESERVE_LIMIT_KEYS", KEYS)
    args = dict(ray_app.config["applications"][0]["args"])
    settings = ServiceSettings.from_dict({**args, "models": {"quiet": args["models"]["quiet"]},
                                          "address": "127.0.0.1:0", "api_keys_env": "LIVESERVE_LIMIT_KEYS",
                                          "auth_failures_per_min": 3, "trusted_proxies": []})
    model = settings.served_models()[0]

    def handle(name: str):
        return serve.get_deployment_handle(name, app_name="liveserve")

    def build() -> Gateway:
        seams = PoolSeams(model, RayPerception(handle(model.perception_pool)), ray_decision(handle(model.decision_pool)),
                          ray_reaction(handle(model.reaction_pool)))
        return Gateway([seams], settings)

    server = GatewayServer(build, settings.address, max_frame_bytes=settings.max_frame_bytes).start()
    try:
        assert flood(server.address, 3) == [grpc.StatusCode.UNAUTHENTICATED] * 3
        assert answer(server.address, "zzzzzzzz-new") == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert answer(server.address, GOOD) == grpc.StatusCode.OK
    finally:
        server.stop(grace_s=1)
