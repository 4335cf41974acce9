"""Plain values describing WireGuard devices and peers, shared by both backends."""

from __future__ import annotations

import ipaddress
import hashlib
from dataclasses import dataclass, field

# The preshared key of a staged peer (a rotating node's announced next key). Not a secret: a lock.
# A handshake initiation from the holder of that key is consumed (the peer's rx_bytes grow: the
# node has switched, proven by its new key) but never completes, because the node itself uses no
# preshared key: its packets stay queued on its side instead of being dropped here for want of
# allowed IPs. The agent then makes the peer again, unlocked, with the node's allowed IPs.
STAGED_PSK = hashlib.sha256(b"wiremesh: a staged peer; its handshakes never complete").digest()


def normalize_cidr(text: str) -> str:
    """Canonical text of a network ('10.1.0.7/24' -> '10.1.0.0/24'; a bare address -> /32)."""
    return str(ipaddress.ip_network(text, strict=False))


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """What a peer should look like on the device (public key in base64)."""

    public_key: str
    endpoint: str | None = None  # "ip:port" or "[v6]:port"
    allowed_ips: frozenset[str] = frozenset()
    persistent_keepalive: int = 0
    staged: bool = False  # locked by STAGED_PSK (and planned with no allowed IPs, no keepalive)


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A peer as the device reports it."""

    public_key: str
    endpoint: str | None = None
    allowed_ips: frozenset[str] = frozenset()
    persistent_keepalive: int = 0
    latest_handshake: float = 0.0  # unix seconds, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0
    staged: bool = False  # its preshared key is STAGED_PSK


@dataclass(frozen=True, slots=True)
class DeviceState:
    """The device as it is: its identity (public half only), port and peers by public key."""

    name: str
    public_key: str | None
    listen_port: int
    peers: dict[str, PeerStatus] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PeerChange:
    """One peer's part of a device update: only the fields that must change are set.

    `remove` deletes the peer; otherwise the peer is created or updated, `endpoint` is sent
    only when it changed and `allowed_ips` (a full replacement) only when the set changed.
    With `replaces`, the peer is new and takes the allowed IPs of the peer with that key, which
    stays (with none) until removed by a change of its own a moment later.
    """

    public_key: str
    remove: bool = False
    endpoint: str | None = None
    allowed_ips: frozenset[str] | None = None
    persistent_keepalive: int | None = None
    update_only: bool = False
    # The peer's previous public key (a key rotation): its allowed IPs move to this peer in the
    # same device update; it is removed later (agent.reconciler, LINGER_S), once it holds nothing.
    replaces: str | None = None
    # The peer is removed and made again in the same update (every field set): a fresh entry, with
    # no handshake state. A staged peer answered its node's initiation, and wireguard-go sends no
    # initiation of its own for 5 s after an answer: unlocked in place, it would wait that long.
    recreate: bool = False
    staged: bool | None = None  # set (True) or clear (False) the STAGED_PSK lock; None: as it is
    name: str = ""  # who the peer is ("cluster/node"), for logs and status; backends ignore it


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'1.2.3.4:51820' or '[fd00::1]:51820' -> (host, port)."""
    if endpoint.startswith("["):
        host, _, port = endpoint[1:].partition("]:")
    else:
        host, _, port = endpoint.rpartition(":")
    return str(ipaddress.ip_address(host)), int(port)
