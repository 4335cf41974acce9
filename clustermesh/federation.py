"""Federation: which clusters form one mesh, and which of them may be programmed.

Every member datacenter holds the same membership records (`wiremesh/v1/mesh/<cluster>`:
cluster id, datacenter, pod CIDR); the setup wizard writes them to all of them. An agent reads
them from its local Consul and each remote cluster's nodes through it with `dc=<datacenter>`.

A member is refused (reported, never programmed) when its record is invalid, its id is taken,
or its pod CIDR overlaps one already accepted; members are taken in order of (id, name) with
the local cluster first: every node of one cluster decides the same way, and a cluster never
refuses itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .errors import InvalidRecord
from .records import SCHEMA, SCHEMA_FIELD, _dump, _envelope, _int, _load, _str, check_cluster_name, parse_network
from .snapshot import Rejected
from .store import KVItem

_DC = __import__("re").compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class MeshMember:
    """One cluster's membership record. Versioned like every record (see `records`): unknown
    fields are kept in `extra` and written back, and do not count in equality."""

    name: str
    id: int
    datacenter: str
    pod_cidr: str
    schema: str = field(default=SCHEMA, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _envelope(self, _MEMBER_FIELDS)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str | None = None) -> "MeshMember":
        d, schema, extra = _load(raw, key, _MEMBER_FIELDS)
        name = check_cluster_name(d.get("name"), "name", key)
        cid = _int(d, "id", 1, 255, key)
        dc = _str(d, "datacenter", key)
        if not _DC.fullmatch(dc):
            raise InvalidRecord("datacenter", f"{dc[:64]!r} is not a Consul datacenter name", key)
        pod = parse_network(_str(d, "pod_cidr", key), "pod_cidr", key)
        return cls(name, cid, dc, str(pod), schema, extra)

    def to_json(self) -> str:
        return _dump({name: getattr(self, name) for name in _MEMBER_FIELDS}, self.schema, self.extra)

    @property
    def pod_network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.pod_cidr)


_MEMBER_FIELDS = frozenset(MeshMember.__dataclass_fields__) - {SCHEMA_FIELD, "extra"}


@dataclass(frozen=True, slots=True)
class Membership:
    members: dict[str, MeshMember]  # accepted, by cluster name
    refused: tuple[Rejected, ...]


def parse_mesh(items: Mapping[str, KVItem], local: str | None = None,
               last_good: Mapping[str, MeshMember] | None = None) -> Membership:
    """Validate the membership records and decide which members are accepted (pure).

    A record that fails validation is reported; if `last_good` holds an earlier valid version
    of it, that one stands in, so one bad write never drops a cluster from the mesh.
    """
    refused: list[Rejected] = []
    found: list[tuple[str, MeshMember]] = []
    prefix = layout.mesh_prefix()
    for key, item in items.items():
        if not key.startswith(prefix):
            continue
        try:
            m = MeshMember.from_json(item.value, key)
            if m.name != key[len(prefix):]:
                raise InvalidRecord("name", f"{m.name!r} does not match the key's cluster name", key)
            found.append((key, m))
        except InvalidRecord as e:
            kept = (last_good or {}).get(key)
            refused.append(Rejected(key, str(e).removeprefix(f"{key}: ")
                                    + ("; its last valid version is kept" if kept else "")))
            if kept is not None:
                found.append((key, kept))
    return check_members(found, local, refused)


def check_members(found: list[tuple[str, MeshMember]], local: str | None,
                  refused: list[Rejected] | None = None) -> Membership:
    refused = list(refused or [])
    accepted: dict[str, MeshMember] = {}
    by_id: dict[int, str] = {}
    found = sorted(found, key=lambda km: (km[1].name != local, km[1].id, km[1].name))
    for key, m in found:
        if m.id in by_id:
            refused.append(Rejected(key, f"cluster id {m.id} is already cluster {by_id[m.id]!r}'s"))
            continue
        clash = next((o for o in accepted.values() if o.pod_network.version == m.pod_network.version
                      and o.pod_network.overlaps(m.pod_network)), None)
        if clash is not None:
            refused.append(Rejected(key, f"pod_cidr {m.pod_cidr} overlaps cluster {clash.name!r}'s {clash.pod_cidr}"))
            continue
        dc_clash = next((o for o in accepted.values() if o.datacenter == m.datacenter), None)
        if dc_clash is not None:
            refused.append(Rejected(key, f"datacenter {m.datacenter!r} is already cluster {dc_clash.name!r}'s"))
            continue
        accepted[m.name] = m
        by_id[m.id] = m.name
    return Membership(accepted, tuple(refused))
