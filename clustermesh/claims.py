"""One key, one node: which node a WireGuard key belongs to, and which of a node's records are new.

A node's record names its key and, during a rotation, the key it will switch to. Peers give a
key the node's allowed IPs, so a record naming another node's key (current or next) would take
that node's tunnels: such a key stays with the node that holds it and the newcomer's record is
refused. Who holds a key: the node an agent remembers with it (`Seen`, kept across restarts),
then current keys before announced ones, then the oldest record.

A node's signed records are accepted only with a non-decreasing `key_epoch`, and at an equal
epoch only with the key it had (or the next key it announced: the switch of a rotation), so an
older signed record written back is refused. A newer certificate (the node enrolled again)
starts its history afresh; an older one is a replay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wiremesh.keys import KeyMaterialError, PublicKey

from .errors import InvalidRecord
from .records import NodeRecord


@dataclass(frozen=True, slots=True)
class Seen:
    """The newest record an agent accepted of a node: its epoch, keys and certificate's start."""

    epoch: int
    key: str
    next_key: str = ""
    cert_from: int = 0  # the not_before of its certificate (0: unsigned)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "key": self.key, "next_key": self.next_key, "cert_from": self.cert_from}

    @classmethod
    def from_dict(cls, d: object) -> "Seen":
        """Raise ValueError unless `d` is a Seen's dict."""
        if not isinstance(d, dict):
            raise ValueError("not an object")
        epoch, cert_from = d.get("epoch"), d.get("cert_from", 0)
        key, nxt = d.get("key"), d.get("next_key", "")
        if not (isinstance(epoch, int) and isinstance(cert_from, int) and isinstance(key, str) and isinstance(nxt, str)):
            raise ValueError("bad field types")
        try:
            for k in (key, nxt):
                if k:
                    PublicKey.from_base64(k)
        except KeyMaterialError as e:
            raise ValueError(str(e)) from None
        return cls(epoch, key, nxt, cert_from)


def seen_of(rec: NodeRecord, cert_from: int) -> Seen:
    return Seen(rec.key_epoch, rec.public_key, rec.next_public_key, cert_from)


def check_epoch(rec: NodeRecord, cert_from: int, seen: Seen | None, key: str | None = None) -> None:
    """Raise InvalidRecord if `rec` (signed, its certificate valid from `cert_from`) is older than
    what was accepted of its node before."""
    if seen is None or cert_from > seen.cert_from:
        return
    if cert_from < seen.cert_from:
        raise InvalidRecord("certificate", f"is older than the one this node's records carried before (not_before "
                                           f"{cert_from} < {seen.cert_from}): an old record written back", key)
    if rec.key_epoch < seen.epoch:
        raise InvalidRecord("key_epoch", f"{rec.key_epoch} is older than the {seen.epoch} already accepted for this "
                                         "node (an old record written back)", key)
    if rec.key_epoch == seen.epoch and rec.public_key not in (seen.key, seen.next_key):
        raise InvalidRecord("key_epoch", f"{rec.key_epoch} is the epoch of another public key of this node (a new "
                                         "key needs a higher key_epoch)", key)


def settle_keys(candidates: Sequence[tuple[str, NodeRecord]], seen: Mapping[str, Seen]
                ) -> tuple[dict[str, NodeRecord], list[tuple[str, InvalidRecord]]]:
    """The records that keep their keys, and those refused for naming another node's key.

    `candidates` are (node, record), oldest first. Each key a record names (current, next) is
    a claim; claims are placed in this order: those an agent remembers of that node, then
    current keys before announced ones, then the oldest record's. A record one of whose claims
    finds the key held by another node is refused."""
    claims: list[tuple[tuple[int, int, int], str, str, str]] = []
    for i, (name, rec) in enumerate(candidates):
        s = seen.get(name)
        for kind, k in ((0, rec.public_key), (1, rec.next_public_key)):
            if k:
                known = s is not None and k in (s.key, s.next_key)
                claims.append(((0 if known else 1, kind, i), name, k, "public_key" if kind == 0 else "next_public_key"))
    holder: dict[str, str] = {}
    refused: dict[str, InvalidRecord] = {}
    for _, name, k, field in sorted(claims, key=lambda c: c[0]):
        if name in refused:
            continue
        other = holder.setdefault(k, name)
        if other != name:
            refused[name] = InvalidRecord(field, f"is node {other!r}'s key" if field == "next_public_key"
                                          else f"already used by node {other!r}")
    kept = {name: rec for name, rec in candidates if name not in refused}
    return kept, list(refused.items())
