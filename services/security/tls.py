"""TLS for the public API: the Gateway's server credentials and a client's channel credentials, from PEM
files.

Files are read and checked when the server or channel is made, so a missing, unreadable or mismatched
file fails at startup with its path and the reason, not at the first handshake. A client CA on the
server means mutual TLS: a client without a certificate signed by it is refused during the handshake.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """A certificate or key file is missing, unreadable or does not fit; the message names the file."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{what} {path} is not a PEM file")
    return data


def _check_pair(cert_file: str, key_file: str, who: str) -> tuple[bytes, bytes]:
    """The certificate chain and its private key, checked to belong together."""
    if bool(cert_file) != bool(key_file):
        raise TlsConfigError(f"{who} certificate and key go together: got only the "
                             f"{'certificate' if cert_file else 'key'}")
    cert, key = _read(cert_file, f"{who} certificate"), _read(key_file, f"{who} key")
    try:  # grpc would only find out at the first handshake
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            str(Path(cert_file).expanduser()), str(Path(key_file).expanduser()),
            password=lambda: "")  # an encrypted key fails here (gRPC cannot use one) rather than prompting
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{who} key {key_file} does not match certificate {cert_file}, or one of them "
                             f"cannot be parsed ({exc.reason or exc})") from None
    return cert, key


def _check_ca(ca_file: str, what: str) -> bytes:
    data = _read(ca_file, what)
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(Path(ca_file).expanduser()))
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{what} {ca_file} cannot be parsed ({exc.reason or exc})") from None
    return data


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials | None:
    """Credentials for the public port: None (plaintext) when no certificate is configured; with
    `client_ca_file`, clients must present a certificate it signed (mutual TLS)."""
    if not (cert_file or key_file):
        if client_ca_file:
            raise TlsConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file: mutual TLS is TLS first")
        return None
    cert, key = _check_pair(cert_file, key_file, "server")
    if not client_ca_file:
        return grpc.ssl_server_credentials([(key, cert)])
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=_check_ca(client_ca_file, "client CA"),
                                       require_client_auth=True)


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """TLS to the server: trusting `ca_file` (default: the system's root certificates), presenting
    `cert_file`/`key_file` when the server asks for a client certificate (mutual TLS)."""
    ca = _check_ca(ca_file, "CA") if ca_file else None
    cert, key = _check_pair(cert_file, key_file, "client") if (cert_file or key_file) else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def open_channel(address: str, credentials: grpc.ChannelCredentials | None, options=()) -> grpc.Channel:
    """A blocking channel to `address`: TLS with `credentials`, plaintext without."""
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)
