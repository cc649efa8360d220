"""Whose address a call comes from: the peer's own, or the client's as a trusted proxy forwarded it.

Failed key checks are counted per address only where the address is the client's own (auth.py). Behind a
load balancer, an ingress or a sidecar that does not keep the source address, every client arrives from
the proxy's few addresses; counting those would let one client's failures count against all of them.
A proxy listed in `trusted_proxies` is believed about the address it forwards (`x-forwarded-for`); an
address a client writes into that header itself is ignored unless it reached us through such a proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

FORWARDED_FOR = "x-forwarded-for"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or CIDR ranges ("10.0.0.0/8", "::1"); ValueError names the first that is neither."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or CIDR range") from None
    return tuple(networks)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as proxies write it: bare, "1.2.3.4:port" or "[v6]:port"; None if it is none of these."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: the same client as a.b.c.d.
    return getattr(address, "ipv4_mapped", None) or address


class TrustedProxies:
    def __init__(self, entries: Iterable[str]) -> None:
        self.networks = parse_networks(entries)

    def trusts(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.networks)

    def client_address(self, peer_host: str, forwarded_for: str = "") -> str | None:
        """The client's own address: the peer's when the peer is not a trusted proxy; else the nearest
        address of the forwarded chain that is not one (each proxy appends the address it was reached
        from, so the entries left of the first untrusted one are the client's to write). None when that is
        not known: a trusted proxy forwarded no address, an unreadable one, or only trusted ones."""
        peer = _ip(peer_host)
        if peer is None or not self.trusts(peer):
            return peer_host  # a direct client (or a Unix socket): the address is its own
        for entry in reversed(forwarded_for.split(",") if forwarded_for else []):
            address = _ip(entry)
            if address is None:
                return None
            if not self.trusts(address):
                return str(address)
        return None
