"""One fuzz target per parser of outside input: bytes in; nothing out, unless the parser has a bug.

Each target reads its first byte as the kind of input to build: the bytes as they are (what a
broken or hostile writer could store), or a valid document of that parser mutated by the rest
of the bytes (a wrong type, an edge of a range, a near-miss string, unknown or leaking fields,
nesting deeper than a recursive parser goes). It then checks the contract: a valid object, or
the module's own error naming a field; never another exception; no secret of the input in a
message; a valid record round-trips through to_json/from_json and keeps its unknown fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from wiremesh.clustermesh import ClusterConfig, InvalidRecord, NodeRecord, layout
from wiremesh.clustermesh.consul_values import (
    KVItem,
    KVParser,
    parse_catalog_services,
    parse_health,
    parse_kv_items,
)
from wiremesh.clustermesh.records import MAX_RECORD_BYTES
from wiremesh.clustermesh.rotation import Rotation, RotationReady, parse_rotations, parse_ready
from wiremesh.clustermesh.services import ServiceDef, parse_services
from wiremesh.clustermesh.snapshot import ParseCache, parse_cluster
from wiremesh.clustermesh.store import _SHAPE_ERRORS
from wiremesh.tunnels import TunnelError
from wiremesh.tunnels.uapi import parse_get

from . import certs, cni, files, seeds
from .oracles import Bug, check_invalid_record, loads_or_none, no_leak
from .seeds import Reader, dumps_json, mutate


def _known(cls: type) -> frozenset[str]:
    return frozenset(cls.__dataclass_fields__) - {"schema", "extra"}  # type: ignore[attr-defined]


# --- records ------------------------------------------------------------------------------------


def check_record(cls: Any, raw: bytes | str, doc: Any = None, key: str = "wiremesh/v1/k") -> Any:
    """`cls.from_json(raw)`: a record that round-trips and keeps unknown fields, or an InvalidRecord."""
    known = _known(cls)
    if doc is None:
        doc = loads_or_none(raw)
    try:
        rec = cls.from_json(raw, key)
    except InvalidRecord as e:
        check_invalid_record(e, key, known, doc)
        return None
    text = rec.to_json()
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECORD_BYTES:
        # Known: to_json may write more bytes than it read (", " and \\uXXXX where the input had
        # neither), so a record accepted just under the limit is written back over it. See
        # test_fuzz_properties.test_record_near_the_limit_is_written_back_over_it.
        return rec
    again = cls.from_json(text, key)
    if again != rec or again.to_json() != text or again.schema != rec.schema:
        raise Bug(f"{cls.__name__} does not round-trip: {rec!r} -> {text[:300]} -> {again!r}")
    if isinstance(doc, dict) and set(rec.extra) != {k for k in doc if k not in known and k != "schema"}:
        raise Bug(f"{cls.__name__} lost or invented unknown fields: {sorted(rec.extra)} from {sorted(doc)}")
    return rec


def _record_input(r: Reader, seed: dict[str, Any]) -> tuple[bytes, Any]:
    """(raw bytes, the document they hold, or None): arbitrary bytes, a mutated seed, or one near 16 KiB."""
    mode = r.below(4)
    if mode == 0:
        return r.rest(), None
    doc = mutate(seed, r, key_fields=("public_key", "next_public_key"))
    if mode == 3 and isinstance(doc, dict):  # around the size limit, on either side of it
        doc["padding"] = "x" * (16 * 1024 - 64 + r.below(128) - len(dumps_json(doc)))
    return dumps_json(doc).encode(), doc


def _both(raw: bytes) -> tuple[bytes, str]:
    # Arbitrary bytes as text too: from_json takes str, and such a str may hold lone surrogates.
    return raw, raw.decode("utf-8", "surrogateescape")


def records(data: bytes) -> None:
    r = Reader(data)
    cls, seed = r.pick([(ClusterConfig, seeds.CLUSTER_CONFIG), (NodeRecord, seeds.NODE_RECORD)])
    raw, doc = _record_input(r, seed)
    for value in _both(raw):
        check_record(cls, value, doc)


def services(data: bytes) -> None:
    r = Reader(data)
    raw, doc = _record_input(r, seeds.SERVICE)
    for value in _both(raw):
        check_record(ServiceDef, value, doc)
    prefix = layout.services_prefix("lab")
    items = {prefix + r.pick(["web", "db", "", "Web", "x/y"]): raw,
             prefix + "db": dumps_json(mutate({**seeds.SERVICE, "name": "db"}, r)).encode()}
    check_services(items, r.pick(["10.96.0.0/16", "10.96.0.0/28", None]))


def check_services(items: dict[str, bytes], service_cidr: str | None) -> None:
    """parse_services: each key accepted (under its own name, its VIP its own) or refused with a reason."""
    prefix = layout.services_prefix("lab")
    good, rejected = parse_services(items, "lab", service_cidr, prefix)
    _check_split(items, good, rejected)
    vips = [s.vip for s in good.values()]
    if len(vips) != len(set(vips)) or any(prefix + n not in items or s.name != n for n, s in good.items()):
        raise Bug(f"parse_services accepted clashing or misnamed services: {good}")


def rotation(data: bytes) -> None:
    r = Reader(data)
    cls, seed = r.pick([(Rotation, seeds.ROTATION), (RotationReady, seeds.READY)])
    raw, doc = _record_input(r, seed)
    for value in _both(raw):
        check_record(cls, value, doc)
    pfx = layout.rotations_prefix("lab")
    check_rotations({pfx + r.pick(["node1", "node2/ready/lab/node1", "a/b", ""]): raw})
    check_ready({layout.ready_prefix("lab") + r.pick(["node2/lab/node1", "node2/LAB/node1", "node2//", "a/b",
                                                      ""]): raw})


def check_rotations(items: dict[str, bytes]) -> None:
    rot, rejected = parse_rotations("lab", items)
    _check_split(items, dict(rot.rotations), rejected)


def check_ready(items: dict[str, bytes]) -> None:
    ready, rejected = parse_ready("lab", items, "lab/node1")
    _check_split(items, ready, rejected)


def _check_split(items: dict[str, bytes], good: dict[str, Any], rejected: list[tuple[str, str]]) -> None:
    for key, reason in rejected:
        if key not in items or not reason or "unexpected validation error" in reason:
            raise Bug(f"refused {key!r} with {reason!r}")
    if len(good) + len(rejected) > len(items):
        raise Bug("more records accepted and refused than given")


def snapshot(data: bytes) -> None:
    r = Reader(data)
    cp = layout.cluster_prefix("lab")
    items: dict[str, KVItem] = {}
    for _ in range(1 + r.below(8)):
        kind = r.below(8)
        if kind == 0:
            key, doc = layout.config_key("lab"), mutate(seeds.CLUSTER_CONFIG, r, rounds=r.below(2))
        elif kind == 1:
            name = r.pick(["node1", "node2", "Node1", ""])
            key = layout.node_key("lab", name)
            doc = mutate({**seeds.NODE_RECORD, "name": name}, r, ("public_key",), rounds=r.below(2))
        elif kind == 2:
            key = layout.ipam_prefix("lab") + r.pick(["10.240.1.0_24", "10.240.2.0_24", "10.240.1.0_25", "x", ""])
            doc = r.pick(["node1", "node2", "", "Node1", "\udcff"])
        elif kind == 3:
            key, doc = layout.service_key("lab", "web"), mutate(seeds.SERVICE, r, rounds=r.below(2))
        elif kind == 4:
            key, doc = layout.rotation_key("lab", "node1"), mutate(seeds.ROTATION, r, rounds=r.below(2))
        elif kind == 5:
            key, doc = cp + r.text(12), r.value()
        elif kind == 6:  # the revocation list's chunks (clustermesh.revocation)
            key = layout.revoked_prefix("lab") + r.pick(["000", "001", "063", "064", "1", "x", ""])
            doc = mutate({"revoked": {"0" * 32: 1_800_000_000, "f" * 32: 0}}, r, rounds=r.below(3))
        else:
            key, doc = r.pick(list(items) or [cp + "nodes/node1"]), r.rest()
        value = doc if isinstance(doc, bytes) else doc.encode("utf-8", "surrogateescape") if isinstance(doc, str) \
            else dumps_json(doc).encode()
        items[key] = KVItem(key, value, modify_index=1 + r.below(4))
    check_snapshot(items)


def check_snapshot(items: dict[str, KVItem]) -> None:
    """parse_cluster over one set of the cluster's keys: every node it accepts holds the lease of its
    pod CIDR and a key no other node has; asked again with its cache, it answers the same."""
    cache = ParseCache()
    first = parse_cluster("lab", 1, items, cache=cache)
    again = parse_cluster("lab", 2, items, cache=cache)
    if (first.nodes, first.leases, first.rejected, first.revoked) != (again.nodes, again.leases, again.rejected,
                                                                       again.revoked):
        raise Bug("parse_cluster answered differently from its cache")
    for rej in first.rejected:
        if rej.key not in items or "unexpected validation error" in rej.reason:
            raise Bug(f"parse_cluster refused {rej.key!r}: {rej.reason}")
    owners: dict[str, str] = {}
    for name, rec in first.nodes.items():
        if first.config is None or first.leases.get(rec.pod_cidr) != name or owners.setdefault(rec.public_key, name) != name:
            raise Bug(f"parse_cluster accepted node {name!r} without its lease, config or own key")


# --- Consul's answers ---------------------------------------------------------------------------


def consul(data: bytes) -> None:
    r = Reader(data)
    seed = r.pick([seeds.KV_ITEMS, seeds.HEALTH, seeds.CATALOG])
    check_consul(r.rest() if r.chance(3) else dumps_json(mutate(seed, r)).encode())


def check_consul(body: bytes) -> None:
    """A Consul answer body as the store reads it (json.loads, then a parser): only the shape errors
    the store turns into BAD_RESPONSE may escape."""
    parsers: list[Callable[[Any], Any]] = [parse_kv_items, KVParser(), lambda b: parse_health("web", b),
                                           parse_catalog_services]
    for parse in parsers:
        try:
            parse(None if not body else json.loads(body))  # the store's _json: json.loads inside its try
        except _SHAPE_ERRORS:  # RecursionError included: a body nested too deeply is BAD_RESPONSE
            pass


# --- the UAPI reply -----------------------------------------------------------------------------

_UAPI_KEYS = ["private_key", "listen_port", "fwmark", "public_key", "preshared_key", "endpoint", "allowed_ip",
              "persistent_keepalive_interval", "last_handshake_time_sec", "last_handshake_time_nsec", "rx_bytes",
              "tx_bytes", "protocol_version", "errno", "remove", ""]
_SECRET_LINE = re.compile(r"(private|preshared)_key")


def uapi(data: bytes) -> None:
    r = Reader(data)
    if r.chance(3):
        text = r.rest().decode("utf-8", "surrogateescape")
    else:
        lines = seeds.uapi_reply().splitlines()
        for _ in range(1 + r.below(4)):
            i = r.below(len(lines) + 1)
            key = r.pick(_UAPI_KEYS)
            value = r.pick([seeds.SECRET_HEX, seeds.SECRET_HEX[:62], seeds.PUB.hex, seeds.PUB.hex.upper(), "0", "-1",
                            "x", "", " 1", "1e3", "9" * 30, "١", "192.0.2.1:1", r.text(70), str(r.value())])
            op = r.below(4)
            if op == 0:
                lines.insert(i, f"{key}={value}")
            elif op == 1 and i < len(lines):
                del lines[i]
            elif op == 2 and i < len(lines):
                lines[i] = lines[i].split("=", 1)[0] + "=" + value
            else:
                lines.insert(i, f"{key}{value}")  # no "=": a malformed line
        text = "\n".join(lines) + "\n\n"
    check_uapi(text)


def check_uapi(text: str) -> None:
    """parse_get: a DeviceState, or a TunnelError naming the device and showing no secret line."""
    secret_lines = [ln for ln in text.splitlines() if _SECRET_LINE.match(ln)]
    public = "\n".join(ln for ln in text.splitlines() if not _SECRET_LINE.match(ln))
    try:
        state = parse_get("wm0", text)
    except TunnelError as e:
        if not str(e).startswith("wm0: "):
            raise Bug(f"UAPI error does not name the device: {e}") from None
        no_leak(str(e), [ln.partition("=")[2] or ln for ln in secret_lines], public)
        return
    if state.name != "wm0" or not all(isinstance(p.rx_bytes, int) for p in state.peers.values()):
        raise Bug(f"parse_get gave {state!r}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "records": records, "services": services, "rotation": rotation, "snapshot": snapshot, "consul": consul,
    "uapi": uapi, "cni": cni.cni, "config": files.config, "topology": files.topology, "answers": files.answers,
    "certs": certs.certs,  # node certificates and signed records (tests/fuzz/certs.py)
}


def seed_inputs(name: str) -> list[bytes]:
    """A starting corpus for `name`: each target's valid document as raw input (where the first bytes
    choose raw input), and short inputs choosing each of its kinds of mutated documents."""
    j = dumps_json
    raw = {
        "records": [bytes([0, 0]) + j(seeds.CLUSTER_CONFIG).encode(), bytes([1, 0]) + j(seeds.NODE_RECORD).encode()],
        "services": [b"\0" + j(seeds.SERVICE).encode()],
        "rotation": [bytes([0, 0]) + j(seeds.ROTATION).encode(), bytes([1, 0]) + j(seeds.READY).encode()],
        "consul": [bytes([i, 0]) + j(s).encode() for i, s in enumerate([seeds.KV_ITEMS, seeds.HEALTH, seeds.CATALOG])],
        "uapi": [b"\0" + seeds.uapi_reply().encode()],
        "config": [b"\0" + files.toml_text(seeds.AGENT_TOML).encode()],
        "topology": [bytes([0, 0, 0]) + files.yaml_text(seeds.TOPOLOGY)],
        "answers": [b"\0" + files.yaml_text(seeds.ANSWERS)],
        "certs": [b"\0" + j(certs.CERT.to_dict()).encode(), b"\1\0", b"\2\0", b"\3\0"],
    }.get(name, [])
    return raw + [bytes([a, b]) + bytes([c]) * 40 for a in range(6) for b in range(6) for c in (0, 1, 0x55)]
