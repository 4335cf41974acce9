"""Frontends, backends, and their byte encoding in the load balancer's maps.

The C structs are in lb.bpf.c; each has a `struct.Struct` here of the same size. Addresses and
ports are in network byte order (as the kernel hands them to the programs); ids, slots and
counts are host-order integers.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

Protocol = Literal["tcp", "udp"]
PROTO_NUMBERS: dict[str, int] = {"tcp": 6, "udp": 17}
PROTO_NAMES: dict[int, Protocol] = {6: "tcp", 17: "udp"}
MAX_BACKENDS = 0xFFFF  # slots and the count are u16

# struct lb4_key {be32 address; be16 dport; u16 backend_slot; u8 proto; u8 pad[3];}
SERVICE_KEY = struct.Struct("=4s2sHB3x")
# struct lb4_service {u32 backend_id; u16 count; u16 rev_nat_index; u8 flags; u8 pad[3];}
SERVICE_VALUE = struct.Struct("=IHHB3x")
# key of wm_lb4_backends: u32 backend_id
BACKEND_KEY = struct.Struct("=I")
# struct lb4_backend {be32 address; be16 port; u8 proto; u8 cluster_id; u8 flags; u8 pad[3];}
BACKEND_VALUE = struct.Struct("=4s2sBBB3x")
# struct ipv4_revnat_tuple {u64 cookie; be32 address; be16 port; u16 pad;}
REVNAT_KEY = struct.Struct("=Q4s2s2x")
# struct ipv4_revnat_entry {be32 address; be16 port; u16 rev_nat_index;}
REVNAT_VALUE = struct.Struct("=4s2sH")


def _ipv4(value: object, what: str) -> ipaddress.IPv4Address:
    if isinstance(value, ipaddress.IPv4Address):
        return value
    try:
        addr = ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"{what}: {value!r} is not an IP address") from e
    if not isinstance(addr, ipaddress.IPv4Address):
        raise ValueError(f"{what}: {value} is not IPv4 (the load balancer is IPv4 only)")
    return addr


def _port_ok(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 0xFFFF


@dataclass(frozen=True, order=True, init=False)
class Frontend:
    """A service's virtual address: VIP, port and protocol (what a client connects to)."""

    vip: ipaddress.IPv4Address
    port: int
    proto: Protocol

    def __init__(self, vip: ipaddress.IPv4Address | str, port: int, proto: Protocol = "tcp") -> None:
        address = _ipv4(vip, "frontend VIP")
        if not _port_ok(port):
            raise ValueError(f"frontend {address}: port {port!r} is not in 1-65535")
        if proto not in PROTO_NUMBERS:
            raise ValueError(f"frontend {address}:{port}: protocol {proto!r} is not tcp or udp")
        object.__setattr__(self, "vip", address)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "proto", proto)
        self.__dict__["packed"] = address.packed + port.to_bytes(2, "big")  # fills the cached_property

    def __str__(self) -> str:
        return f"{self.vip}:{self.port}/{self.proto}"

    # Hashing and comparing by bytes: IPv4Address hashes through a hex string, and tables of
    # 10 000 services hash frontends and backends hundreds of thousands of times.
    @cached_property
    def packed(self) -> bytes:
        """VIP and port in network byte order, as the maps hold them."""
        return self.vip.packed + self.port.to_bytes(2, "big")

    def __hash__(self) -> int:
        return hash((self.packed, self.proto))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frontend):
            return NotImplemented
        return self.packed == other.packed and self.proto == other.proto

    def key(self, slot: int) -> bytes:
        """The wm_lb4_services key of one of this frontend's slots (0: the service entry)."""
        return self.packed + _SLOT.pack(slot) + _PROTO_TAIL[self.proto]


ServiceKey = Frontend  # the name the issue uses for a map's frontend


@dataclass(frozen=True, order=True, init=False)
class Backend:
    """One backend of a service: address and port, and the cluster it lives in (0: unknown).

    Its protocol is its frontend's: the same address and port over TCP and UDP are two backends.
    """

    address: ipaddress.IPv4Address
    port: int
    cluster_id: int

    def __init__(self, address: ipaddress.IPv4Address | str, port: int, cluster_id: int = 0) -> None:
        addr = _ipv4(address, "backend address")
        if not _port_ok(port):
            raise ValueError(f"backend {addr}: port {port!r} is not in 1-65535")
        if not isinstance(cluster_id, int) or isinstance(cluster_id, bool) or not 0 <= cluster_id <= 255:
            raise ValueError(f"backend {addr}:{port}: cluster id {cluster_id!r} is not in 0-255")
        object.__setattr__(self, "address", addr)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "cluster_id", cluster_id)
        self.__dict__["packed"] = addr.packed + port.to_bytes(2, "big")  # fills the cached_property

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"

    @cached_property
    def packed(self) -> bytes:
        """Address and port in network byte order, as the maps hold them."""
        return self.address.packed + self.port.to_bytes(2, "big")

    def __hash__(self) -> int:
        return hash((self.packed, self.cluster_id))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Backend):
            return NotImplemented
        return self.packed == other.packed and self.cluster_id == other.cluster_id

    def value(self, proto: int, flags: int = 0) -> bytes:
        """The wm_lb4_backends value of this backend."""
        return self.packed + bytes((proto, self.cluster_id, flags, 0, 0, 0))


@dataclass(frozen=True)
class ServiceEntry:
    """What the maps hold for one frontend: its service id (rev-NAT index) and its backends in slot order."""

    service_id: int
    backends: tuple[Backend, ...]


# The identity of a backend in the maps: (Backend.packed, protocol number).
BackendIdentity = tuple[bytes, int]
_SLOT = struct.Struct("=H")
_PROTO_TAIL = {name: bytes((number, 0, 0, 0)) for name, number in PROTO_NUMBERS.items()}


def decode_service_key(raw: bytes, cache: dict[bytes, Frontend | None] | None = None) -> tuple[Frontend | None, int]:
    """(frontend, slot) of a wm_lb4_services key; frontend None for a key no frontend can have.

    `cache` (frontend bytes -> Frontend) saves building the same frontend once per slot.
    """
    addr, port, slot, proto = SERVICE_KEY.unpack(raw)
    ident = raw[:6] + raw[8:9]
    if cache is not None and ident in cache:
        return cache[ident], slot
    p = int.from_bytes(port, "big")
    fe = None if proto not in PROTO_NAMES or p == 0 else Frontend(ipaddress.IPv4Address(addr), p, PROTO_NAMES[proto])
    if cache is not None:
        cache[ident] = fe
    return fe, slot


def decode_service_value(raw: bytes) -> tuple[int, int, int]:
    """(backend_id, count, rev_nat_index) of a wm_lb4_services value."""
    backend_id, count, rev_nat, _flags = SERVICE_VALUE.unpack(raw)
    return backend_id, count, rev_nat


def decode_backend(raw: bytes) -> tuple[Backend | None, int]:
    """(backend, protocol number) of a wm_lb4_backends value; backend None if unusable (port 0)."""
    addr, port, proto, cluster_id, _flags = BACKEND_VALUE.unpack(raw)
    p = int.from_bytes(port, "big")
    if p == 0:
        return None, proto
    # Every field is valid by construction: skip __init__'s checks (read() decodes thousands).
    b = object.__new__(Backend)
    b.__dict__.update(address=ipaddress.IPv4Address(addr), port=p, cluster_id=cluster_id, packed=raw[:6])
    return b, proto
