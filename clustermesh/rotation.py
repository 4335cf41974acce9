"""Key-rotation records in Consul: a node's rotation (request and progress) and peers' readiness.

```
wiremesh/v1/clusters/<c>/rotations/<node>          Rotation: asked for by `wiremesh keys rotate`, then
                                                   advanced by the node's agent
wiremesh/v1/ready/<c>/<peer>/<rc>/<rnode>          RotationReady: peer <peer> (of cluster <c>) knows
                                                   node <rnode>'s (of cluster <rc>) next key
```

Readiness lives outside the cluster's prefix (which every agent watches): only a node that is
rotating watches it (agent.readiness).

A node writes only its own keys: its rotation, and its readiness for other nodes' rotations
(least-privilege ACLs can say exactly that). No private key is ever in any of them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .errors import InvalidRecord
from .records import SCHEMA, _dump, _envelope, _int, _load, _public_key, _str, check_node_name

# requested -> staged (next key announced) -> committed (switch time set: no way back) -> switched
# (the node uses it) -> done | failed; or abandoned (given up cleanly before the commit: the old
# key stays). See keys.rotation.
STATES = ("requested", "staged", "committed", "switched", "done", "failed", "abandoned")
TERMINAL = frozenset({"done", "failed", "abandoned"})
_ID = re.compile(r"[0-9a-f]{8,32}")
MAX_PEERS_LISTED = 512
_SIGNATURE_MAX = 128  # base64 of a 64-byte Ed25519 signature is 88 characters


def _peer_list(d: Mapping[str, Any], name: str, key: str | None) -> tuple[str, ...]:
    v = d.get(name, [])
    if not isinstance(v, list) or len(v) > MAX_PEERS_LISTED or not all(isinstance(x, str) and len(x) <= 100 for x in v):
        raise InvalidRecord(name, f"must be a list of at most {MAX_PEERS_LISTED} peer names", key)
    return tuple(v)


def _signature(d: Mapping[str, Any], name: str, key: str | None) -> str:
    sig = _str(dict(d), name, key, default="")
    if len(sig) > _SIGNATURE_MAX:
        raise InvalidRecord(name, f"longer than {_SIGNATURE_MAX} characters", key)
    return sig


def _object(d: Mapping[str, Any], name: str, key: str | None) -> Mapping[str, Any] | None:
    v = d.get(name)
    if v is not None and not isinstance(v, dict):
        raise InvalidRecord(name, f"must be a JSON object, not {type(v).__name__}", key)
    return v


_ROTATION_FIELDS = frozenset({"node", "id", "state", "requested_at", "updated_at", "epoch_from", "epoch_to",
                              "switch_at", "next_fingerprint", "confirmed", "lagging", "error",
                              "request_signature", "certificate", "node_signature"})


@dataclass(frozen=True, slots=True)
class Rotation:
    """One rotation of one node's key, from its request to its end."""

    node: str
    id: str
    state: str = "requested"
    requested_at: int = 0  # unix ms
    updated_at: int = 0
    epoch_from: int = 0
    epoch_to: int = 0
    switch_at: int = 0
    next_fingerprint: str = ""
    confirmed: tuple[str, ...] = ()  # peers ("cluster/node") that completed a handshake on the new key
    lagging: tuple[str, ...] = ()  # live peers that had not, when it ended
    error: str = ""
    schema: str = field(default=SCHEMA, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Signatures (clustermesh.control), not compared: a record signed again is the same record.
    # The request's, by the cluster's operator key (or, for a request the node made itself on
    # the cluster's schedule, by the node's identity key), over (cluster, node, id, requested_at);
    # then the node's certificate and its identity key's over the whole record, once the node
    # writes its progress.
    request_signature: str = field(default="", compare=False, repr=False)
    certificate: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    node_signature: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        _envelope(self, _ROTATION_FIELDS)
        check_node_name(self.node, "node")
        if not _ID.fullmatch(self.id):
            raise InvalidRecord("id", f"{self.id[:40]!r} is not a rotation id (8-32 lowercase hex digits)")
        if self.state not in STATES:
            raise InvalidRecord("state", f"{self.state[:20]!r} is not one of {', '.join(STATES)}")
        if len(self.error) > 500:
            raise InvalidRecord("error", "longer than 500 characters")

    @property
    def active(self) -> bool:
        return self.state not in TERMINAL

    @classmethod
    def new(cls, node: str, now_ms: int) -> "Rotation":
        return cls(node, secrets.token_hex(8), "requested", now_ms, now_ms)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str | None = None) -> "Rotation":
        d, schema, extra = _load(raw, key, _ROTATION_FIELDS)
        try:
            return cls(
                node=check_node_name(d.get("node"), "node", key), id=_str(d, "id", key),
                state=_str(d, "state", key, default="requested"),
                requested_at=_int(d, "requested_at", 0, 2**53, key, default=0),
                updated_at=_int(d, "updated_at", 0, 2**53, key, default=0),
                epoch_from=_int(d, "epoch_from", 0, 2**53, key, default=0),
                epoch_to=_int(d, "epoch_to", 0, 2**53, key, default=0),
                switch_at=_int(d, "switch_at", 0, 2**53, key, default=0),
                next_fingerprint=_str(d, "next_fingerprint", key, default="")[:64],
                confirmed=_peer_list(d, "confirmed", key), lagging=_peer_list(d, "lagging", key),
                error=_str(d, "error", key, default=""), schema=schema, extra=extra,
                request_signature=_signature(d, "request_signature", key), certificate=_object(d, "certificate", key),
                node_signature=_signature(d, "node_signature", key))
        except InvalidRecord as e:
            raise InvalidRecord(e.field, e.reason, key) from None

    def to_json(self) -> str:
        known: dict[str, Any] = {"node": self.node, "id": self.id, "state": self.state,
                                 "requested_at": self.requested_at, "updated_at": self.updated_at,
                                 "epoch_from": self.epoch_from, "epoch_to": self.epoch_to, "switch_at": self.switch_at,
                                 "next_fingerprint": self.next_fingerprint, "confirmed": list(self.confirmed),
                                 "lagging": list(self.lagging), "error": self.error}
        for name in ("request_signature", "certificate", "node_signature"):  # written only when set
            if getattr(self, name):
                known[name] = dict(self.certificate or {}) if name == "certificate" else getattr(self, name)
        return _dump(known, self.schema, self.extra)


_READY_FIELDS = frozenset({"next_public_key", "switch_at", "signature"})


@dataclass(frozen=True, slots=True)
class RotationReady:
    """A peer's word that it knows a node's next key (and takes it when the node commits).

    `switch_at` is kept for records written by agents of the first rotation protocol (which
    announced the switch time with the key); 0 in new ones."""

    next_public_key: str
    switch_at: int = 0
    schema: str = field(default=SCHEMA, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # The writing node's identity-key signature (clustermesh.control); "" unsigned. Not compared.
    signature: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        _envelope(self, _READY_FIELDS)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str | None = None) -> "RotationReady":
        d, schema, extra = _load(raw, key, _READY_FIELDS)
        return cls(_public_key(d, "next_public_key", key), _int(d, "switch_at", 0, 2**53, key, default=0), schema=schema,
                   extra=extra, signature=_signature(d, "signature", key))

    def to_json(self) -> str:
        known: dict[str, Any] = {"next_public_key": self.next_public_key}
        if self.switch_at:
            known["switch_at"] = self.switch_at
        if self.signature:
            known["signature"] = self.signature
        return _dump(known, self.schema, self.extra)


@dataclass(frozen=True, slots=True)
class Rotations:
    """A cluster's rotation records, validated, by node."""

    rotations: dict[str, Rotation] = field(default_factory=dict)


def parse_rotations(cluster: str, items: Mapping[str, bytes],
                    verify: Callable[[str, bytes, Rotation], None] | None = None,
                    last: dict[str, Rotation] | None = None) -> tuple[Rotations, list[tuple[str, str]]]:
    """Every key under the cluster's rotations/ prefix -> (Rotations, [(key, reason)] refused).

    `verify(key, raw, rotation)` raises InvalidRecord for a record its cluster does not vouch for
    (clustermesh.control). `last` (key -> the last record accepted there, kept by the caller
    between snapshots and updated here): a key whose value is refused keeps its last good record."""
    pfx = layout.rotations_prefix(cluster)
    out = Rotations()
    refused: list[tuple[str, str]] = []
    kept: dict[str, Rotation] = {}
    for key in sorted(items):
        parts = key[len(pfx):].split("/")
        try:
            if len(parts) == 1:
                try:
                    rot = Rotation.from_json(items[key], key)
                    if rot.node != parts[0]:
                        raise InvalidRecord("node", f"{rot.node!r} does not match the key's node {parts[0]!r}", key)
                    if verify is not None:
                        verify(key, items[key], rot)
                except InvalidRecord as e:
                    before = (last or {}).get(key)
                    if before is None:
                        raise
                    refused.append((key, str(e).removeprefix(f"{key}: ") + "; its last good record stays"))
                    rot = before
                out.rotations[rot.node] = kept[key] = rot
            elif len(parts) == 4 and parts[1] == "ready":
                continue  # where readiness was written before it moved to ready/ (left by an older agent)
            else:
                raise InvalidRecord("key", "not a rotation", key)
        except InvalidRecord as e:
            refused.append((key, str(e).removeprefix(f"{key}: ")))
    if last is not None:
        last.clear()
        last.update(kept)
    return out, refused


def parse_ready(cluster: str, items: Mapping[str, bytes], rotating: str) -> tuple[dict[str, RotationReady],
                                                                                   list[tuple[str, str]]]:
    """The readiness words of `cluster`'s nodes (every key under its ready/ prefix) for the
    rotation of `rotating` ("cluster/node") -> ({"cluster/peer": ready}, [(key, reason)] refused)."""
    pfx = layout.ready_prefix(cluster)
    out: dict[str, RotationReady] = {}
    refused: list[tuple[str, str]] = []
    for key in sorted(items):
        parts = key[len(pfx):].split("/")
        try:
            if len(parts) != 3:
                raise InvalidRecord("key", "not a readiness key (ready/<cluster>/<peer>/<cluster>/<node>)", key)
            if f"{parts[1]}/{parts[2]}" != rotating:
                continue
            peer = check_node_name(parts[0], "key", key)
            out[f"{cluster}/{peer}"] = RotationReady.from_json(items[key], key)
        except InvalidRecord as e:
            refused.append((key, str(e).removeprefix(f"{key}: ")))
    return out, refused
