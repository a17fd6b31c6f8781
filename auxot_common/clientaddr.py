"""The address of the client behind a request, trusting proxy headers only from trusted proxies.

Behind a reverse proxy (Fly.io, nginx, an ingress, NAT) every request arrives from the proxy's
address, so anything keyed on the peer (the failed-key limiter, the access log) would treat all
users as one. A proxy's header is believed only when the peer itself is a configured trusted
proxy (``AUXOT_TRUSTED_PROXIES``, CIDRs): anyone else could write any address into it.

Pure code: the router passes the peer address and the headers, the function returns a string.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_FORWARDED_HOPS = 32  # an X-Forwarded-For longer than this is read from its right end only


def parse_trusted_proxies(value: str) -> tuple[Network, ...]:
    """CIDRs (or single addresses) separated by commas or whitespace.

    Raises ValueError naming the first entry that is not an address or network.
    """
    networks: list[Network] = []
    for entry in value.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, trusted: Iterable[Network]) -> bool:
    return address is not None and any(address.version == net.version and address in net for net in trusted)


def client_address(peer: str | None, headers: Mapping[str, str], trusted: tuple[Network, ...]) -> str:
    """The client's address as a string.

    - With no trusted proxies, or a peer that is not one: the peer address, headers ignored.
    - From a trusted peer: ``Fly-Client-IP`` if it holds an address; otherwise the right-most
      ``X-Forwarded-For`` entry that is not itself a trusted proxy (entries to its left were
      written by the client and prove nothing), the left-most when all are trusted; otherwise
      the peer.

    :param peer: the TCP peer (aiohttp's ``request.remote``); None or garbage gives "unknown".
    :param headers: the request headers (case-insensitive mapping).
    :param trusted: from :func:`parse_trusted_proxies`.
    """
    peer_address = _address(peer or "")
    fallback = str(peer_address) if peer_address is not None else (peer or "unknown")
    if not trusted or not _trusted(peer_address, trusted):
        return fallback
    fly = _address(headers.get("Fly-Client-IP", ""))
    if fly is not None:
        return str(fly)
    forwarded = headers.get("X-Forwarded-For", "")
    hops = [hop for hop in forwarded.split(",") if hop.strip()][-MAX_FORWARDED_HOPS:]
    client = fallback
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break  # a malformed hop: nothing to its left can be believed
        client = str(address)
        if not _trusted(address, trusted):
            break
    return client
