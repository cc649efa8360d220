"""TLS and mutual TLS on the public API (`serve --local`, real gRPC on 127.0.0.1 with throwaway
certificates), the client and loadtest connection flags, and metrics on loopback by default."""

from __future__ import annotations

import json
import os
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stream_helpers import kinds, other_address
from tls_helpers import make_authority
from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.api.v1 import live_stream_pb2_grpc as pb_grpc
from liveserve.cli import build_parser, main
from liveserve.services.deploy.local import start_local
from liveserve.services.settings import ServiceSettings
from liveserve.services.security.tls import TlsConfigError, channel_credentials

KEYS_ENV = "LIVESERVE_TLS_TEST_KEYS"
API_KEY = "tls-test-key-7f3a"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, client_ca, rogue = (make_authority(folder, name) for name in ("server-ca", "client-ca", "rogue-ca"))
    return {"folder": folder, "ca": ca, "client_ca": client_ca, "rogue": rogue,
            "server": ca.issue(folder, "server", server=True),
            "client": client_ca.issue(folder, "client", server=False),
            "rogue_client": rogue.issue(folder, "rogue-client", server=False),
            "rogue_server": rogue.issue(folder, "rogue-server", server=True)}


def _settings(pki, **extra) -> ServiceSettings:
    return ServiceSettings(pool_mb=16, max_new_tokens=4, window_frames=8, max_lag_s=600.0,
                           tls_cert_file=str(pki["server"].cert), tls_key_file=str(pki["server"].key), **extra)


@pytest.fixture(scope="module")
def tls_server(tiny_model, pki):
    server = start_local(tiny_model, "127.0.0.1:0", _settings(pki))
    yield server
    server.stop(grace_s=1)


@pytest.fixture(scope="module")
def mtls_server(tiny_model, pki):
    """Mutual TLS and an API key: what a client must bring to a locked-down deployment."""
    os.environ[KEYS_ENV] = API_KEY
    try:
        server = start_local(tiny_model, "127.0.0.1:0",
                             _settings(pki, tls_client_ca_file=str(pki["client_ca"].cert), api_keys_env=KEYS_ENV))
    finally:
        del os.environ[KEYS_ENV]
    yield server
    server.stop(grace_s=1)


def _session(address: str, credentials: grpc.ChannelCredentials | None, api_key: str = "") -> list[str]:
    """A decisions-only session with no frames: Open, Close; the message kinds that came back."""
    open_ = pb.Open(decisions_only=True, credentials={"api_key": api_key} if api_key else {})
    messages = [pb.ClientMessage(open=open_), pb.ClientMessage(close=pb.Close())]
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
        return kinds(pb_grpc.LiveStreamStub(channel).Stream(iter(messages), timeout=20))


def _refused(address: str, credentials: grpc.ChannelCredentials | None, api_key: str = "") -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        _session(address, credentials, api_key)
    return info.value.code()


def test_a_tls_server_serves_clients_that_trust_its_ca_and_no_others(tls_server, pki):
    address = tls_server.address
    assert _session(address, channel_credentials(str(pki["ca"].cert))) == ["opened", "closed"]
    with grpc.secure_channel(address, channel_credentials(str(pki["ca"].cert))) as channel:  # health too
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert _refused(address, None) == grpc.StatusCode.UNAVAILABLE  # plaintext gets no answer
    assert _refused(address, channel_credentials(str(pki["rogue"].cert))) == grpc.StatusCode.UNAVAILABLE
    assert _refused(address, channel_credentials()) == grpc.StatusCode.UNAVAILABLE  # system roots: not ours


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(mtls_server, pki):
    address, ca = mtls_server.address, str(pki["ca"].cert)
    good = channel_credentials(ca, str(pki["client"].cert), str(pki["client"].key))
    assert _session(address, good, API_KEY) == ["opened", "closed"]
    assert _refused(address, good) == grpc.StatusCode.UNAUTHENTICATED  # TLS is not the API key
    assert _refused(address, channel_credentials(ca), API_KEY) == grpc.StatusCode.UNAVAILABLE
    rogue = channel_credentials(ca, str(pki["rogue_client"].cert), str(pki["rogue_client"].key))
    assert _refused(address, rogue, API_KEY) == grpc.StatusCode.UNAVAILABLE


def test_bad_tls_files_fail_at_startup_naming_the_file(tiny_model, pki, tmp_path):
    server, rogue = pki["server"], pki["rogue_server"]
    missing = tmp_path / "missing.pem"
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("hello")
    cases = [({"tls_cert_file": str(missing), "tls_key_file": str(server.key)}, str(missing)),
             ({"tls_cert_file": str(not_pem), "tls_key_file": str(server.key)}, "not a PEM file"),
             ({"tls_cert_file": str(server.cert), "tls_key_file": str(rogue.key)}, "does not match"),
             ({"tls_cert_file": str(server.cert), "tls_key_file": str(server.key),
               "tls_client_ca_file": str(missing)}, "client CA")]
    for values, words in cases:
        with pytest.raises(TlsConfigError, match=words):
            start_local(tiny_model, "127.0.0.1:0", ServiceSettings(pool_mb=8, **values))
    with pytest.raises(ValueError, match="go together"):
        ServiceSettings(tls_cert_file=str(server.cert))
    with pytest.raises(ValueError, match="mutual TLS is TLS first"):
        ServiceSettings(tls_client_ca_file=str(pki["ca"].cert))


def test_the_client_command_brings_its_key_and_certificates(mtls_server, pki, capsys):
    common = ["client", "--address", mtls_server.address, "--max-frames", "1", "--fast"]
    tls = ["--ca", str(pki["ca"].cert), "--cert", str(pki["client"].cert), "--key", str(pki["client"].key)]
    assert main([*common, *tls, "--api-key", API_KEY]) == 0
    err = capsys.readouterr().err
    assert "1 frames decided" in err and API_KEY not in err
    assert main([*common, *tls]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main([*common, "--ca", str(pki["ca"].cert), "--api-key", API_KEY]) == 2  # no client certificate
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main([*common, "--cert", str(pki["client"].cert)]) == 2
    assert "go together" in capsys.readouterr().err


def test_the_api_key_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LIVESERVE_API_KEY", "from-env")
    args = build_parser().parse_args(["client"])
    assert args.api_key == "from-env" and not args.tls


def test_loadtest_flags_reach_its_channel_and_stay_out_of_the_report(mtls_server, pki, tmp_path, capsys):
    report = tmp_path / "lt.json"
    argv = ["loadtest", "--address", mtls_server.address, "--sessions", "1", "--duration", "1", "--fps", "2",
            "--frame-size", "64", "--quiet", "--json", str(report), "--drain-timeout", "20",
            "--ca", str(pki["ca"].cert), "--cert", str(pki["client"].cert), "--key", str(pki["client"].key)]
    assert main([*argv, "--api-key", API_KEY]) == 0, capsys.readouterr().err
    text = report.read_text()
    data = json.loads(text)
    assert API_KEY not in text and data["config"]["credentials"] == {"api_key": "<redacted>"}
    assert not data["levels"][0]["errors"]
    assert main([*argv, "--strict"]) == 1  # no key: every session refused
    out = capsys.readouterr()
    assert "UNAUTHENTICATED" in out.out + out.err
    assert main(["loadtest", "--address", mtls_server.address, "--ca", str(tmp_path / "nope.pem")]) == 2
    assert "nope.pem" in capsys.readouterr().err


def test_metrics_listen_on_loopback_unless_told_otherwise(capsys):
    from liveserve.services.observability.telemetry import serve_metrics

    args = build_parser().parse_args(["serve", "--local"])
    assert args.metrics_host == "127.0.0.1"
    port = serve_metrics(f"{args.metrics_host}:0")  # what `serve --local` does with it
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    other = other_address()
    if other is not None:
        with pytest.raises(OSError):
            socket.create_connection((other, port), timeout=5).close()
    assert main(["serve", "--metrics-host", "0.0.0.0"]) == 2  # on Ray, Ray's exporter decides: say so
    assert "--metrics-host applies to --local" in capsys.readouterr().err


def test_serve_takes_tls_files_as_absolute_settings_and_refuses_bad_ones_before_loading(pki, tmp_path, capsys,
                                                                                     monkeypatch):
    from liveserve.cli.serve import _settings

    monkeypatch.chdir(pki["folder"])
    args = build_parser().parse_args(["serve", "--local", "--tls-cert", "server.pem", "--tls-key", "server.key",
                                      "--tls-client-ca", "client-ca.pem"])
    settings = _settings(args)
    assert settings["tls_cert_file"] == str(pki["server"].cert)  # absolute: Ray replicas run elsewhere
    assert settings["tls_client_ca_file"] == str(pki["client_ca"].cert)
    missing = tmp_path / "absent.pem"
    for mode in (["--local"], []):  # before a model loads or Ray starts
        assert main(["serve", *mode, "--model", str(tmp_path / "no-model"), "--tls-cert", str(missing),
                     "--tls-key", "server.key"]) == 2
        err = capsys.readouterr().err
        assert f"server certificate {missing}: No such file or directory" in err and err.count("\n") == 1
