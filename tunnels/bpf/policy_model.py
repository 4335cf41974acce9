"""What the policy datapath's maps hold (policy.bpf.c), as values and as bytes.

The plan gives `PolicyMaps`: the IP -> identity cache, the enforced endpoints (by the host-side
veth's ifindex) and, per endpoint, identity, protocol and direction, the verdict per port
interval. This module only encodes them; the loader (policy.py) writes the difference.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

ANY_IDENTITY = 0xFFFFFFFF  # a rule entry for every peer identity without an entry of its own
WORLD_IDENTITY = 2  # an address no endpoint and no named CIDR holds (Cilium's reserved:world)
UNKNOWN_IDENTITY = 3  # an address in a cluster's pod CIDR whose endpoint is not learnt yet
FIRST_IDENTITY = 256  # identities below are reserved
MAX_INTERVALS = 16
INGRESS, EGRESS = 0, 1
ENFORCE_INGRESS, ENFORCE_EGRESS = 1, 2
DENY, ALLOW = 0, 1
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": socket.IPPROTO_ICMP, "other": 0}

IPCACHE_KEY = struct.Struct("=I4s")  # prefixlen, address (network order)
IPCACHE_VALUE = struct.Struct("=I")
ENDPOINT_KEY = struct.Struct("=I")  # ifindex
ENDPOINT_VALUE = struct.Struct("=II")  # endpoint id, flags
RULE_KEY = struct.Struct("=IIBBH")  # endpoint, identity, proto, dir, pad
INTERVAL = struct.Struct("=HHB3xI")  # lo, hi, action, rule id
RULE_HEAD = struct.Struct("=BBHI")  # count, default action, pad, default rule id
RULE_VALUE_SIZE = RULE_HEAD.size + MAX_INTERVALS * INTERVAL.size


@dataclass(frozen=True, slots=True, order=True)
class Interval:
    lo: int
    hi: int
    action: int
    rule: int = 0


@dataclass(frozen=True, slots=True)
class RuleEntry:
    """One endpoint's verdicts for one peer identity, protocol and direction."""

    intervals: tuple[Interval, ...] = ()
    default_action: int = DENY
    default_rule: int = 0


@dataclass(frozen=True, slots=True, order=True)
class RuleKey:
    endpoint: int
    identity: int
    proto: int
    direction: int


@dataclass(frozen=True, slots=True)
class PolicyMaps:
    """The whole desired content of a node's policy maps."""

    ipcache: Mapping[ipaddress.IPv4Network, int] = field(default_factory=dict)
    endpoints: Mapping[int, tuple[int, int]] = field(default_factory=dict)  # ifindex -> (endpoint id, flags)
    rules: Mapping[RuleKey, RuleEntry] = field(default_factory=dict)


def encode_ipcache(net: ipaddress.IPv4Network, identity: int) -> tuple[bytes, bytes]:
    return IPCACHE_KEY.pack(net.prefixlen, net.network_address.packed), IPCACHE_VALUE.pack(identity)


def decode_ipcache(key: bytes, value: bytes) -> tuple[ipaddress.IPv4Network, int]:
    plen, addr = IPCACHE_KEY.unpack(key)
    return ipaddress.IPv4Network((addr, plen)), IPCACHE_VALUE.unpack(value)[0]


def encode_endpoint(ifindex: int, endpoint: int, flags: int) -> tuple[bytes, bytes]:
    return ENDPOINT_KEY.pack(ifindex), ENDPOINT_VALUE.pack(endpoint, flags)


def decode_endpoint(key: bytes, value: bytes) -> tuple[int, tuple[int, int]]:
    e, f = ENDPOINT_VALUE.unpack(value)
    return ENDPOINT_KEY.unpack(key)[0], (e, f)


def encode_rule(key: RuleKey, entry: RuleEntry) -> tuple[bytes, bytes]:
    if len(entry.intervals) > MAX_INTERVALS:
        raise ValueError(f"{len(entry.intervals)} port intervals; the datapath holds {MAX_INTERVALS}")
    body = b"".join(INTERVAL.pack(i.lo, i.hi, i.action, i.rule) for i in entry.intervals)
    body += bytes(INTERVAL.size * (MAX_INTERVALS - len(entry.intervals)))
    head = RULE_HEAD.pack(len(entry.intervals), entry.default_action, 0, entry.default_rule)
    return RULE_KEY.pack(key.endpoint, key.identity, key.proto, key.direction, 0), head + body


def decode_rule(key: bytes, value: bytes) -> tuple[RuleKey, RuleEntry]:
    e, ident, proto, direction, _ = RULE_KEY.unpack(key)
    count, dflt, _pad, drule = RULE_HEAD.unpack_from(value)
    ivs = tuple(Interval(*INTERVAL.unpack_from(value, RULE_HEAD.size + i * INTERVAL.size)) for i in range(count))
    return RuleKey(e, ident, proto, direction), RuleEntry(ivs, dflt, drule)
