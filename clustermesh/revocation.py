"""A cluster's revocation list: thousands of revoked certificate serials, pruned as they expire.

Layout: `wiremesh/v1/clusters/<cluster>/revoked/NNN` (NNN: 000 to MAX_CHUNKS - 1), each chunk a
JSON object `{"revoked": {"<serial>": <not_after>, ...}}` of at most CHUNK_ENTRIES serials, so
that a chunk stays under the 16 KiB record limit and the cluster config never grows with the
list. `not_after` is the revoked certificate's own expiry (unix seconds): once it is past (by
PRUNE_AFTER_S, for agents whose clock is behind), the certificate is refused as expired anyway and
the writer drops its serial. The list holds at most MAX_CHUNKS x CHUNK_ENTRIES live serials.

Readers (every agent, through the cluster's snapshot) check each chunk strictly and refuse a bad
one with one error naming the field; the last good list stays (`RevocationCache`), and the
serials a refused chunk still spells out count as revoked too: revocation fails closed. The
config's own `revoked` list (the layout before this one: at most 256 serials, no expiry) is still
read; the writer moves it here (enroll.revoke).

Writers change chunks with check-and-set inside Consul transactions. New serials fill the chunks
that have room, so one revocation rewrites one chunk, not the list; a transaction carries at most
TXN_BYTES of values (Consul 1.8 caps a transaction's request at 512 KiB and 64 operations). Every
state between two transactions is a valid list holding every serial not yet expired.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from wiremesh.keys import CERT_DOMAIN, Certificate, CertificateError, KeyMaterialError, VerifyKey

from . import layout
from .consul_values import KVItem, KVOp
from .errors import ClusterMeshError, InvalidRecord
from .records import MAX_RECORD_BYTES, SCHEMA, SCHEMA_FIELD, _load

CHUNK_ENTRIES = 320  # 320 x 49 bytes (a 13-digit expiry) + envelope: under MAX_RECORD_BYTES with room to spare
MAX_CHUNKS = 64  # 20 480 live serials
PRUNE_AFTER_S = 86400  # a serial is dropped a day after its certificate expired
TXN_BYTES = 192 * 1024  # values per transaction (base64 in the request: 256 KiB of Consul's 512)
TXN_OPS = 60
FIELD = "revoked"
_KNOWN = frozenset({FIELD})
_SERIAL = re.compile(r"[0-9a-f]{32}")
_CHUNK_NAME = re.compile(r"[0-9]{3}")
TIME_MAX = 2**40  # unix seconds (keys.certificate's bound)


class RevocationFull(ClusterMeshError):
    """The revocation list has no room for more live serials."""

    hint = ("revoked serials leave the list a day after their certificates expire; issue shorter-lived "
            "certificates (wiremesh node enroll --valid-for)")


@dataclass(frozen=True, slots=True)
class Revocations:
    """Revoked serials -> the expiry (unix seconds) of the certificate each one names."""

    entries: Mapping[str, int] = field(default_factory=dict)

    def __contains__(self, serial: object) -> bool:
        return serial in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)


def check_serial(serial: object, field_: str = FIELD, key: str | None = None) -> str:
    if not isinstance(serial, str) or not _SERIAL.fullmatch(serial):
        shown = repr(serial[:40]) if isinstance(serial, str) else f"a {type(serial).__name__}"
        raise InvalidRecord(field_, f"{shown} is not a certificate serial (32 lowercase hex digits)", key)
    return serial


def chunk_key(cluster: str, index: int) -> str:
    return f"{layout.revoked_prefix(cluster)}{index:03d}"


def chunk_index(key: str, prefix: str) -> int:
    """The chunk number a key names; InvalidRecord("key") for anything the writer never makes."""
    name = key[len(prefix):]
    if not _CHUNK_NAME.fullmatch(name) or int(name) >= MAX_CHUNKS:
        raise InvalidRecord("key", f"{name[:40]!r} is not a revocation chunk (000-{MAX_CHUNKS - 1:03d})", key)
    return int(name)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk as stored: its entries, and what this agent does not know (kept on rewrite)."""

    entries: Mapping[str, int]
    schema: str = SCHEMA
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        if len(self.entries) > CHUNK_ENTRIES:
            raise InvalidRecord(FIELD, f"{len(self.entries)} serials in one chunk (at most {CHUNK_ENTRIES})")
        d: dict[str, Any] = {**self.extra, FIELD: dict(self.entries)}
        if self.schema != SCHEMA:
            d[SCHEMA_FIELD] = self.schema
        return json.dumps(d, sort_keys=True, separators=(",", ":"))  # compact: 49 bytes a serial at most


def parse_chunk(raw: bytes | str, key: str | None = None) -> Chunk:
    """A chunk's value, checked strictly: InvalidRecord names the field at fault."""
    d, schema, extra = _load(raw, key, _KNOWN)
    entries = d.get(FIELD)
    if not isinstance(entries, dict):
        shown = "missing" if entries is None else f"must be an object of serial: expiry, not a {type(entries).__name__}"
        raise InvalidRecord(FIELD, shown, key)
    if len(entries) > CHUNK_ENTRIES:
        raise InvalidRecord(FIELD, f"{len(entries)} serials in one chunk (at most {CHUNK_ENTRIES})", key)
    for serial, not_after in entries.items():
        check_serial(serial, FIELD, key)
        if isinstance(not_after, bool) or not isinstance(not_after, int) or not 0 <= not_after <= TIME_MAX:
            shown = str(not_after)[:24] if isinstance(not_after, (int, float)) else f"a {type(not_after).__name__}"
            raise InvalidRecord(f"{FIELD}.{serial}", f"{shown} is not a certificate expiry (unix seconds "
                                                      f"0-{TIME_MAX})", key)
    return Chunk(entries, schema, extra)


def salvage(raw: bytes) -> set[str]:
    """The serials a refused chunk still spells out: they stay revoked (revocation fails closed)."""
    try:
        d = json.loads(raw) if len(raw) <= MAX_RECORD_BYTES else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return set()
    entries = d.get(FIELD) if isinstance(d, dict) else None
    if isinstance(entries, dict):
        return {s for s in list(entries)[:CHUNK_ENTRIES] if _SERIAL.fullmatch(s)}
    if isinstance(entries, list):
        return {s for s in entries[:CHUNK_ENTRIES] if isinstance(s, str) and _SERIAL.fullmatch(s)}
    return set()


class RevocationCache:
    """Chunks parsed per key and ModifyIndex, and the last good list (one per watch)."""

    def __init__(self) -> None:
        self.chunks: dict[str, tuple[int, Chunk | InvalidRecord]] = {}
        self.good = Revocations()
        self._merged: tuple[tuple[tuple[str, int], ...], Revocations] | None = None


def read_revocations(cluster: str, items: Mapping[str, KVItem], cache: RevocationCache | None = None
                     ) -> tuple[Revocations, list[tuple[str, str]]]:
    """The revocation list in a snapshot's `items`, and the (key, reason) of each chunk refused.

    With a refused chunk, the last good list (kept in `cache`) stays, with the valid chunks'
    serials and those the refused chunk still spells out added."""
    cache = cache or RevocationCache()
    prefix = layout.revoked_prefix(cluster)
    mine = sorted((k, items[k].modify_index) for k in items if k.startswith(prefix))
    if cache._merged is not None and cache._merged[0] == tuple(mine):
        return cache._merged[1], [(k, f"{e.field}: {e.reason}") for k, (_, e) in cache.chunks.items()
                                  if isinstance(e, InvalidRecord)]
    chunks: dict[str, tuple[int, Chunk | InvalidRecord]] = {}
    refused: list[tuple[str, str]] = []
    merged: dict[str, int] = {}
    kept: set[str] = set()
    for key, index in mine:
        hit = cache.chunks.get(key)
        parsed: Chunk | InvalidRecord
        if hit is not None and hit[0] == index:
            parsed = hit[1]
        else:
            try:
                chunk_index(key, prefix)
                parsed = parse_chunk(items[key].value, key)
            except InvalidRecord as e:
                parsed = e
        chunks[key] = (index, parsed)
        if isinstance(parsed, InvalidRecord):
            refused.append((key, f"{parsed.field}: {parsed.reason}"))
            kept |= salvage(items[key].value)
            continue
        for serial, not_after in parsed.entries.items():
            if merged.get(serial, -1) < not_after:
                merged[serial] = not_after
    if refused:
        for serial, not_after in cache.good.entries.items():
            merged[serial] = max(merged.get(serial, 0), not_after)
        for serial in kept - set(merged):
            merged[serial] = TIME_MAX  # expiry unknown: never pruned by a reader's view
    result = Revocations(merged)
    if not refused:
        cache.good = result
    cache.chunks = chunks
    cache._merged = (tuple(mine), result)
    return result, refused


# --- writing ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Stored:
    """The chunks as read for a change: index -> (ModifyIndex, chunk)."""

    chunks: dict[int, tuple[int, Chunk]]

    @property
    def revocations(self) -> Revocations:
        merged: dict[str, int] = {}
        for _, chunk in self.chunks.values():
            for serial, not_after in chunk.entries.items():
                merged[serial] = max(merged.get(serial, 0), not_after)
        return Revocations(merged)


def stored_chunks(cluster: str, items: Mapping[str, KVItem]) -> Stored:
    """The chunks under the cluster's revocation prefix, for a writer: a bad one stops the change
    (its serials would be lost), naming the key and the field."""
    prefix = layout.revoked_prefix(cluster)
    chunks: dict[int, tuple[int, Chunk]] = {}
    for key, item in items.items():
        if key.startswith(prefix):
            chunks[chunk_index(key, prefix)] = (item.modify_index, parse_chunk(item.value, key))
    return Stored(chunks)


@dataclass(frozen=True, slots=True)
class Change:
    """What a revocation writes: transactions in order, and the list they leave."""

    txns: list[list[KVOp]]
    revocations: Revocations
    added: list[str]
    pruned: list[str]


def plan_change(cluster: str, stored: Stored, add: Mapping[str, int], now: float) -> Change:
    """Add `add` (serial -> its certificate's expiry), drop serials past their expiry by
    PRUNE_AFTER_S, and lay the rest into chunks, rewriting only the chunks that change (pure)."""
    def live(not_after: int) -> bool:
        return not_after + PRUNE_AFTER_S > now

    chunks = {i: dict(c.entries) for i, (_, c) in stored.chunks.items()}
    where = {s: i for i, entries in chunks.items() for s in entries}
    pruned = sorted(s for entries in chunks.values() for s, na in entries.items() if not live(na))
    changed: set[int] = set()
    for i, entries in chunks.items():
        for serial in [s for s, na in entries.items() if not live(na)]:
            del entries[serial]
            changed.add(i)
    added: list[str] = []
    fresh: list[tuple[str, int]] = []
    for serial, not_after in add.items():
        check_serial(serial, "SERIAL")
        if not live(not_after):
            continue  # expired long ago: refused as expired, nothing to list
        at = where.get(serial)
        if at is not None and serial in chunks[at]:
            if chunks[at][serial] < not_after:
                chunks[at][serial] = not_after
                changed.add(at)
            continue
        fresh.append((serial, not_after))
        added.append(serial)
    order = iter([*sorted(chunks), *(i for i in range(MAX_CHUNKS) if i not in chunks)])
    target = next(order, None)
    for n, (serial, not_after) in enumerate(fresh):
        while target is not None and len(chunks.setdefault(target, {})) >= CHUNK_ENTRIES:
            target = next(order, None)
        if target is None:
            live_count = sum(map(len, chunks.values()))
            raise RevocationFull(f"cluster {cluster!r}: the revocation list is full ({live_count} live serials, "
                                 f"at most {MAX_CHUNKS * CHUNK_ENTRIES}); {len(fresh) - n} serial(s) not added")
        chunks[target][serial] = not_after
        changed.add(target)
    ops: list[tuple[int, KVOp]] = []
    for i in sorted(changed):
        index, old = stored.chunks.get(i, (0, Chunk({})))
        key = chunk_key(cluster, i)
        if not chunks[i]:
            if index:
                ops.append((0, KVOp.delete_cas(key, index)))
            continue
        value = Chunk(chunks[i], old.schema, old.extra).to_json()
        ops.append((len(value), KVOp.cas(key, value, index)))
    txns: list[list[KVOp]] = []
    size = 0
    for n, op in ops:
        if not txns or size + n > TXN_BYTES or len(txns[-1]) >= TXN_OPS:
            txns.append([])
            size = 0
        txns[-1].append(op)
        size += n
    merged = {s: na for entries in chunks.values() for s, na in entries.items()}
    return Change(txns, Revocations(merged), added, pruned)


def certificate_expiries(docs: list[object], signing_key: VerifyKey | None) -> dict[str, int]:
    """Serial -> expiry of the certificates among `docs` that the cluster's key signed. Only those:
    a forged certificate with a revoked serial and an early expiry would let it leave the list early."""
    out: dict[str, int] = {}
    if signing_key is None:
        return out
    for doc in docs:
        try:
            cert = Certificate.from_dict(doc)
            signing_key.verify(CERT_DOMAIN, cert.body(), cert.signature, "certificate")
        except (CertificateError, KeyMaterialError):
            continue
        out[cert.serial] = max(out.get(cert.serial, 0), cert.not_after)
    return out


__all__ = ["CHUNK_ENTRIES", "Change", "Chunk", "MAX_CHUNKS", "PRUNE_AFTER_S", "RevocationCache", "RevocationFull",
           "Revocations", "Stored", "certificate_expiries", "check_serial", "chunk_index", "chunk_key", "parse_chunk",
           "plan_change", "read_revocations", "stored_chunks"]
