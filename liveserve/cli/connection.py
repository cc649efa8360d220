"""How a client command reaches the server: API key and TLS flags, shared by `client`, `transcript` and
`loadtest`.

The API key defaults to LIVESERVE_API_KEY, so it need not appear on a command line (where other users
of the host can read it); it is never printed.
"""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "LIVESERVE_API_KEY"


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, ""), metavar="KEY",
                       help=f"sent as credentials api_key (default: ${API_KEY_ENV}; never printed)")
    group.add_argument("--tls", action="store_true",
                       help="connect with TLS, trusting the system's root certificates unless --ca is given")
    group.add_argument("--ca", default="", metavar="PEM",
                       help="trust this CA certificate for the server's certificate (implies --tls)")
    group.add_argument("--cert", default="", metavar="PEM",
                       help="client certificate for mutual TLS, with --key (implies --tls)")
    group.add_argument("--key", default="", metavar="PEM", help="the client certificate's private key")


def uses_tls(args: argparse.Namespace) -> bool:
    return bool(args.tls or args.ca or args.cert or args.key)


def channel_credentials(args: argparse.Namespace):
    """grpc.ChannelCredentials for the flags, or None for plaintext; files are read and checked now."""
    if not uses_tls(args):
        return None
    from liveserve.services.security.tls import channel_credentials as make

    return make(args.ca, args.cert, args.key)
