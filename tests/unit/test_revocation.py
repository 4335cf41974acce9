"""The revocation list in chunks (issue 17, item 4): checks, pruning, layout, the snapshot's use of it."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from wiremesh.clustermesh import (MAX_RECORD_BYTES, ClusterConfig, InvalidRecord, KVItem, KVOp, layout, revocation_list,
                                  revoke)
from wiremesh.clustermesh.enroll import EnrollError
from wiremesh.clustermesh.errors import ConsulReason, TransactionFailed, TxnOpError
from wiremesh.clustermesh.revocation import (CHUNK_ENTRIES, MAX_CHUNKS, PRUNE_AFTER_S, Chunk, RevocationCache,
                                             RevocationFull, Stored, chunk_key, parse_chunk, plan_change,
                                             read_revocations, stored_chunks)
from wiremesh.clustermesh.snapshot import ParseCache, parse_cluster
from wiremesh.keys import MAX_VALIDITY_S

from .test_signing import CA, NOW, config, ident, kv, node

C = "lab"


def serial() -> str:
    return secrets.token_hex(16)


def chunk_item(i: int, entries: dict[str, int], index: int = 1, **extra: Any) -> tuple[str, KVItem]:
    return kv(chunk_key(C, i), json.dumps({"revoked": entries, **extra}), index)


class KV:
    """An in-memory Consul KV with ModifyIndexes, check-and-set and transactions."""

    def __init__(self) -> None:
        self.items: dict[str, KVItem] = {}
        self.index = 10
        self.txns = 0
        self.conflicts = 0  # transactions to refuse (as a concurrent writer would make them)

    def get(self, key: str) -> KVItem | None:
        return self.items.get(key)

    def list(self, prefix: str) -> tuple[int, dict[str, KVItem]]:
        return self.index, {k: v for k, v in self.items.items() if k.startswith(prefix)}

    def put(self, key: str, value: str | bytes, *, cas: int | None = None) -> bool:
        cur = self.items.get(key)
        if cas is not None and (cur.modify_index if cur else 0) != cas:
            return False
        self.index += 1
        raw = value.encode() if isinstance(value, str) else value
        self.items[key] = KVItem(key, raw, self.index)
        return True

    def txn(self, ops: list[KVOp]) -> tuple[KVItem, ...]:
        self.txns += 1
        if self.conflicts:
            self.conflicts -= 1
            raise TransactionFailed("transaction: conflict", (TxnOpError(0, "index is stale"),))
        for op in ops:
            cur = self.items.get(op.key)
            if (cur.modify_index if cur else 0) != op.index:
                raise TransactionFailed("transaction: conflict", (TxnOpError(0, "index is stale"),),
                                        409, ConsulReason.CONFLICT)
        for op in ops:
            if op.verb == "cas":
                assert op.value is not None
                self.put(op.key, op.value)
            else:
                assert op.verb == "delete-cas"
                del self.items[op.key]
        return ()


def cluster_kv(cfg: ClusterConfig | None = None) -> KV:
    s = KV()
    s.put(layout.config_key(C), (cfg or config()).to_json())
    return s


# --- one chunk ---------------------------------------------------------------------------------


def test_a_chunk_round_trips_and_keeps_unknown_fields() -> None:
    s1, s2 = serial(), serial()
    c = parse_chunk(json.dumps({"revoked": {s1: 1, s2: 2**40}, "signature": "x"}))
    assert dict(c.entries) == {s1: 1, s2: 2**40} and c.extra == {"signature": "x"}
    assert parse_chunk(c.to_json()) == c


@pytest.mark.parametrize("value, field, reason", [
    ({"revoked": {"ABC": 1}}, "revoked", "'ABC' is not a certificate serial"),
    ({"revoked": {"0" * 32: "soon"}}, "revoked." + "0" * 32, "a str is not a certificate expiry"),
    ({"revoked": {"0" * 32: -1}}, "revoked." + "0" * 32, "-1 is not a certificate expiry"),
    ({"revoked": {"0" * 32: True}}, "revoked." + "0" * 32, "not a certificate expiry"),
    ({"revoked": {"0" * 32: 2**40 + 1}}, "revoked." + "0" * 32, "not a certificate expiry"),
    ({"revoked": ["0" * 32]}, "revoked", "must be an object of serial: expiry, not a list"),
    ({"other": 1}, "revoked", "missing"),
    ({"revoked": {}, "schema": "2.0"}, "schema", "newer than this agent's"),
    ({"revoked": {}, "private_key": "k"}, "private_key", "never carries a private key"),
    ({"revoked": {f"{i:032x}": 1 for i in range(CHUNK_ENTRIES + 1)}}, "revoked", f"at most {CHUNK_ENTRIES}"),
])
def test_a_bad_chunk_is_refused_naming_the_field(value: object, field: str, reason: str) -> None:
    with pytest.raises(InvalidRecord) as e:
        parse_chunk(json.dumps(value), "k")
    assert e.value.field == field and reason in e.value.reason, e.value


def test_a_full_chunk_fits_the_record_limit_whatever_the_expiries() -> None:
    full = Chunk({f"{i:032x}": 2**40 for i in range(CHUNK_ENTRIES)}, extra={"signature": "s" * 88})
    assert len(full.to_json().encode()) <= MAX_RECORD_BYTES
    assert len(parse_chunk(full.to_json()).entries) == CHUNK_ENTRIES


# --- planning a change ---------------------------------------------------------------------------


def apply(stored: Stored, ops: list[KVOp], cluster: str = C) -> Stored:
    chunks = dict(stored.chunks)
    for op in ops:
        i = int(op.key.rsplit("/", 1)[1])
        if op.verb == "delete-cas":
            del chunks[i]
        else:
            assert op.value is not None
            chunks[i] = (chunks.get(i, (0, None))[0] + 1, parse_chunk(op.value))
    return Stored(chunks)


def test_thousands_of_serials_fill_chunks_under_the_limit_and_one_more_rewrites_one_chunk() -> None:
    many = {serial(): int(NOW) + 86400 + i for i in range(5000)}
    change = plan_change(C, Stored({}), many, NOW)
    stored = Stored({})
    for txn in change.txns:
        assert len(txn) <= 60 and sum(len(op.value or b"") for op in txn) <= 256 * 1024
        stored = apply(stored, txn)
    assert len(stored.chunks) == -(-5000 // CHUNK_ENTRIES) and stored.revocations.entries == many
    one = plan_change(C, stored, {serial(): int(NOW) + 86400}, NOW)
    assert [len(t) for t in one.txns] == [1] and len(one.revocations) == 5001
    again = plan_change(C, apply(stored, one.txns[0]), dict(list(many.items())[:10]), NOW)
    assert again.txns == [] and again.added == []


def test_expired_serials_are_pruned_and_emptied_chunks_deleted() -> None:
    old = {serial(): int(NOW) - PRUNE_AFTER_S - 1 for _ in range(CHUNK_ENTRIES)}  # one whole chunk, expired
    recent = {serial(): int(NOW) - 10 for _ in range(5)}  # expired, but within the grace: kept
    stored = Stored({})
    for txn in plan_change(C, Stored({}), {**old, **recent}, NOW - 2 * PRUNE_AFTER_S).txns:
        stored = apply(stored, txn)
    assert len(stored.chunks) == 2
    change = plan_change(C, stored, {}, NOW)
    assert sorted(change.pruned) == sorted(old) and set(change.revocations) == set(recent)
    ops = [op for t in change.txns for op in t]
    assert [(op.verb, op.key) for op in ops] == [("delete-cas", chunk_key(C, 0))]  # chunk 1 is untouched
    # A serial whose certificate expired long ago is not listed at all.
    assert plan_change(C, Stored({}), {serial(): int(NOW) - PRUNE_AFTER_S}, NOW).txns == []


def test_a_later_expiry_replaces_an_earlier_one() -> None:
    s = serial()
    stored = apply(Stored({}), plan_change(C, Stored({}), {s: int(NOW) + 10}, NOW).txns[0])
    change = plan_change(C, stored, {s: int(NOW) + 99}, NOW)
    assert change.revocations.entries[s] == int(NOW) + 99 and change.added == []


def test_a_full_list_refuses_more_and_says_how_many() -> None:
    full = Stored({i: (1, Chunk({serial(): int(NOW) + 86400 for _ in range(CHUNK_ENTRIES)}))
                   for i in range(MAX_CHUNKS)})
    with pytest.raises(RevocationFull, match=r"full \(20480 live serials.*2 serial\(s\) not added"):
        plan_change(C, full, {serial(): int(NOW) + 86400, serial(): int(NOW) + 86400}, NOW)
    # Pruning makes room.
    some = dict(full.chunks)
    some[3] = (1, Chunk({serial(): int(NOW) - PRUNE_AFTER_S - 1}))
    assert plan_change(C, Stored(some), {serial(): int(NOW) + 1}, NOW).added


# --- reading: agents ---------------------------------------------------------------------------------


def test_a_refused_chunk_keeps_the_last_good_list_and_its_spelled_out_serials() -> None:
    a, b, c = serial(), serial(), serial()
    cache = RevocationCache()
    good = dict([chunk_item(0, {a: 5}, 1), chunk_item(1, {b: 5}, 1)])
    assert set(read_revocations(C, good, cache)[0]) == {a, b}
    bad = dict([chunk_item(0, {a: 5}, 1), chunk_item(1, {b: "x", c: 5}, 2)])  # b's expiry broken, c added
    revs, refused = read_revocations(C, bad, cache)
    assert refused == [(chunk_key(C, 1), f"revoked.{b}: a str is not a certificate expiry (unix seconds 0-{2**40})")]
    assert {a, b, c} <= set(revs)
    gone = dict([chunk_item(0, {a: 5}, 1), kv(chunk_key(C, 1), "not json", 3)])
    revs, refused = read_revocations(C, gone, cache)
    assert {a, b} <= set(revs) and refused[0][1].startswith("value: not JSON")
    # Fixed: the list is what the chunks say again.
    assert set(read_revocations(C, dict([chunk_item(0, {a: 5}, 1)]), cache)[0]) == {a}


def test_chunk_keys_are_bounded() -> None:
    items = dict([kv(layout.revoked_prefix(C) + f"{MAX_CHUNKS:03d}", json.dumps({"revoked": {}})),
                  kv(layout.revoked_prefix(C) + "x", json.dumps({"revoked": {}}))])
    _, refused = read_revocations(C, items)
    assert len(refused) == 2 and all(r.startswith("key: ") for _, r in refused)


def test_a_revoked_serial_in_the_chunks_refuses_the_nodes_record_and_lease() -> None:
    me, other = ident("x", "10.240.1.0/24"), ident("y", "10.240.2.0/24")
    decoys = {serial(): int(NOW) + 86400 for _ in range(3000)}
    stored = Stored({})
    for txn in plan_change(C, Stored({}), {**decoys, me.certificate.serial: me.certificate.not_after}, NOW).txns:
        stored = apply(stored, txn)
    chunks = [kv(chunk_key(C, i), c.to_json(), idx) for i, (idx, c) in stored.chunks.items()]
    cfg = config()
    items = dict([kv(layout.config_key(C), cfg.to_json()), *node("x", "10.240.1.0/24", me),
                  *node("y", "10.240.2.0/24", other), *chunks])
    cache = ParseCache()
    s = parse_cluster(C, 1, items, cache=cache, now=NOW)
    assert set(s.nodes) == {"y"} and len(s.revoked) == 3001
    assert {r.key: r.reason for r in s.rejected} == {
        layout.node_key(C, "x"): f"certificate: serial {me.certificate.serial} is revoked",
        layout.ipam_key(C, "10.240.1.0/24"): f"bad IPAM lease (certificate: serial {me.certificate.serial} is revoked)"}
    assert len(cfg.to_json()) < 1024  # the config does not grow with the list
    # A chunk turned bad: the last good list stays, the node stays refused.
    key0 = chunk_key(C, 0)
    items[key0] = KVItem(key0, b'{"revoked": 7}', 99)
    s = parse_cluster(C, 2, items, cache=cache, now=NOW)
    assert set(s.nodes) == {"y"} and "revoked: must be an object" in {r.key: r.reason for r in s.rejected}[key0]


def test_the_configs_own_list_still_counts() -> None:
    me = ident("x", "10.240.1.0/24")
    items = dict([kv(layout.config_key(C), config(revoked=(me.certificate.serial,)).to_json()),
                  *node("x", "10.240.1.0/24", me)])
    assert not parse_cluster(C, 1, items, now=NOW).nodes


# --- the writer, against an in-memory KV ---------------------------------------------------------


def test_revoke_moves_the_configs_list_prunes_and_learns_expiries_from_live_certificates() -> None:
    me = ident("x", "10.240.1.0/24")
    legacy = serial()
    s = cluster_kv(config(revoked=(legacy,)))
    for key, value in node("x", "10.240.1.0/24", me):
        s.put(key, value.value)
    done = revoke(s, C, [me.certificate.serial], now=NOW)  # type: ignore[arg-type]
    assert done.added == [me.certificate.serial] and done.migrated == [legacy] and done.legacy == ()
    revs, own = revocation_list(s, C)  # type: ignore[arg-type]
    assert own == () and revs.entries == {me.certificate.serial: me.certificate.not_after,
                                          legacy: int(NOW) + MAX_VALIDITY_S}
    again = revoke(s, C, [me.certificate.serial], now=NOW)  # type: ignore[arg-type]
    assert not again.changed
    later = revoke(s, C, [], now=me.certificate.not_after + PRUNE_AFTER_S)  # type: ignore[arg-type]
    assert later.pruned == [me.certificate.serial] and set(later.revocations) == {legacy}


def test_revoke_trusts_only_expiries_the_cluster_signed() -> None:
    from wiremesh.keys import SigningKey

    forged = ident("x", "10.240.1.0/24", ca=SigningKey.generate(), valid=60)  # same serial space, wrong CA
    s = cluster_kv()
    for key, value in node("x", "10.240.1.0/24", forged):
        s.put(key, value.value)
    revoke(s, C, [forged.certificate.serial], now=NOW, not_after=int(NOW) + 500)  # type: ignore[arg-type]
    assert revocation_list(s, C)[0].entries == {forged.certificate.serial: int(NOW) + 500}  # type: ignore[arg-type]
    assert CA  # the cluster's key is another


def test_revoke_reads_again_after_a_conflict_and_refuses_bad_input() -> None:
    s = cluster_kv()
    s.conflicts = 2
    done = revoke(s, C, [serial()], now=NOW)  # type: ignore[arg-type]
    assert done.changed and s.txns == 3
    with pytest.raises(EnrollError, match="SERIAL: 'nope' is not a certificate serial"):
        revoke(s, C, ["nope"], now=NOW)  # type: ignore[arg-type]
    s.put(chunk_key(C, 5), '{"revoked": {"x": 1}}')
    with pytest.raises(EnrollError) as e:
        revoke(s, C, [serial()], now=NOW)  # type: ignore[arg-type]
    assert "revoked/005" in str(e.value) and "fix or delete" in (e.value.hint or "")
    with pytest.raises(InvalidRecord):
        stored_chunks(C, s.items)
