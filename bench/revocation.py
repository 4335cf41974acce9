"""Revocation list cost: what thousands of revoked serials cost the writer and every agent.

Pure (no Consul, no root): the same functions the CLI and the agents run, on in-memory KV items.
  - writer: laying --serials serials into chunks from an empty list (chunks, transactions, the
    largest chunk's size against the 16 KiB record limit), then one more revocation on the full
    list (what it rewrites), then a prune of a list whose serials all expired;
  - agent: a cluster snapshot (parse_cluster) of --nodes signed nodes, cold (first delivery: every
    chunk parsed, every signature checked) and warm (the next delivery, one node record changed:
    what each agent pays on every change in the cluster's prefix), with and without the list, and
    after a revocation (one chunk changed: the list merged again);
    the revocation check itself per record; and the bytes the list adds to each delivery of the
    cluster's prefix (Consul sends every key of it, values in base64, on every change).
Medians of --repeat runs.

    .venv/bin/python bench/revocation.py [--serials 20000] [--nodes 30] [--repeat 5]
    .venv/bin/python bench/revocation.py --smoke
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import statistics
import time
from collections.abc import Callable
from typing import Any

from _common import figure, finished

from wiremesh.clustermesh import ClusterConfig, KVItem, NodeRecord, layout, overlay_address
from wiremesh.clustermesh.revocation import PRUNE_AFTER_S, Stored, parse_chunk, plan_change
from wiremesh.clustermesh.signed import check_valid, lease_value, sign_record
from wiremesh.clustermesh.snapshot import ParseCache, parse_cluster
from wiremesh.keys import NodeIdentity, PrivateKey, SigningKey, issue

C = "bench"
NOW = time.time()


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def lay_out(serials: dict[str, int]) -> tuple[Stored, dict[str, KVItem], int]:
    """The list as Consul would hold it after one revocation of all of `serials`."""
    change = plan_change(C, Stored({}), serials, NOW)
    items: dict[str, KVItem] = {}
    for txn in change.txns:
        for op in txn:
            assert op.value is not None
            items[op.key] = KVItem(op.key, op.value, 100 + len(items))
    stored = Stored({int(k.rsplit("/", 1)[1]): (v.modify_index, parse_chunk(v.value)) for k, v in items.items()})
    return stored, items, len(change.txns)


def cluster_items(nodes: int, ca: SigningKey) -> tuple[dict[str, KVItem], list[NodeIdentity]]:
    cfg = ClusterConfig(name=C, id=1, pod_cidr="10.240.0.0/16", require_signed=True, signing_key=ca.public_key().base64)
    items = {layout.config_key(C): KVItem(layout.config_key(C), cfg.to_json().encode(), 1)}
    idents = []
    for i in range(nodes):
        name, cidr = f"n{i}", f"10.240.{i}.0/24"
        key = SigningKey.generate()
        ident = NodeIdentity(issue(ca, C, name, key.public_key(), cidr, 86400, NOW), key)
        rec = sign_record(NodeRecord(name, C, f"192.0.2.{i % 250 + 1}:51820", PrivateKey.generate().public_key().base64,
                                     cidr, overlay_address(cidr)), ident)
        items[layout.node_key(C, name)] = KVItem(layout.node_key(C, name), rec.to_json().encode(), 10 + i)
        lk = layout.ipam_key(C, cidr)
        items[lk] = KVItem(lk, lease_value(cidr, ident).encode(), 10 + i)
        idents.append(ident)
    return items, idents


def delivery_bytes(items: dict[str, KVItem]) -> int:
    """The size of Consul's answer to a recursive KV read of these items (its JSON, values base64)."""
    return len(json.dumps([{"LockIndex": 0, "Key": k, "Flags": 0, "Value": base64.b64encode(v.value).decode(),
                            "CreateIndex": v.modify_index, "ModifyIndex": v.modify_index} for k, v in items.items()]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serials", type=int, default=20000, help="revoked serials (default 20 000, the most it holds)")
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="2 000 serials, 5 nodes, 2 runs: that the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.serials, args.nodes, args.repeat = 2000, 5, 2
    n = args.serials
    serials = {secrets.token_hex(16): int(NOW) + 86400 + i for i in range(n)}

    # --- the writer -------------------------------------------------------------------------
    figure(f"writer: lay out {n} serials (ms)", round(median_ms(lambda: plan_change(C, Stored({}), serials, NOW),
                                                                args.repeat), 1))
    stored, chunks, txns = lay_out(serials)
    biggest = max(len(v.value) for v in chunks.values())
    figure(f"writer: {n} serials: chunks / transactions", f"{len(chunks)} / {txns}")
    figure("writer: largest chunk (bytes, limit 16384)", biggest)
    one = plan_change(C, stored, {secrets.token_hex(16): int(NOW) + 86400}, NOW)
    figure("writer: one more revocation: chunks rewritten / bytes",
           f"{sum(map(len, one.txns))} / {sum(len(op.value or b'') for t in one.txns for op in t)}")
    figure("writer: one more revocation, plan (ms)",
           round(median_ms(lambda: plan_change(C, stored, {secrets.token_hex(16): int(NOW) + 86400}, NOW),
                           args.repeat), 2))
    later = NOW + 2 * 86400 + n + PRUNE_AFTER_S
    pruned = plan_change(C, stored, {}, later)
    figure(f"writer: prune all {n} (ms)", round(median_ms(lambda: plan_change(C, stored, {}, later), args.repeat), 1))
    figure("writer: prune all: deletes / transactions", f"{sum(map(len, pruned.txns))} / {len(pruned.txns)}")

    # --- every agent ------------------------------------------------------------------------
    ca = SigningKey.generate()
    base, idents = cluster_items(args.nodes, ca)
    for label, items in (("no list", base), (f"{n} serials", {**base, **chunks})):
        cold = median_ms(lambda items=items: parse_cluster(C, 1, items, cache=ParseCache(), now=NOW), args.repeat)
        cache = ParseCache()
        parse_cluster(C, 1, items, cache=cache, now=NOW)
        key = layout.node_key(C, "n0")
        flip = [0]

        def warm(items: dict[str, KVItem] = items, cache: ParseCache = cache, key: str = key) -> None:
            flip[0] += 1  # one node record changed (a new ModifyIndex): what every delivery brings
            items[key] = KVItem(key, items[key].value, 1000 + flip[0])
            snap = parse_cluster(C, 2, items, cache=cache, now=NOW)
            assert len(snap.nodes) == args.nodes and len(snap.revoked) == (n if items is not base else 0)

        figure(f"agent: snapshot of {args.nodes} signed nodes, {label}: cold (ms)", round(cold, 1))
        figure(f"agent: snapshot of {args.nodes} signed nodes, {label}: one record changed (ms)",
               round(median_ms(warm, max(args.repeat, 5)), 2))
        figure(f"agent: one delivery of the cluster's prefix, {label} (KiB)", round(delivery_bytes(items) / 1024, 1))
    items = {**base, **chunks}
    cache = ParseCache()
    parse_cluster(C, 1, items, cache=cache, now=NOW)
    first = min(chunks)
    bump = [0]

    def revoked_one() -> None:
        bump[0] += 1  # a revocation: one chunk rewritten, every agent merges the list again
        items[first] = KVItem(first, items[first].value, 5000 + bump[0])
        parse_cluster(C, 3, items, cache=cache, now=NOW)

    figure(f"agent: snapshot of {args.nodes} signed nodes, {n} serials: one chunk changed (ms)",
           round(median_ms(revoked_one, max(args.repeat, 5)), 2))
    revs = stored.revocations
    cfg = ClusterConfig.from_json(base[layout.config_key(C)].value)
    cert = idents[0].certificate
    reps = 100_000 if not args.smoke else 10_000
    t0 = time.perf_counter()
    for _ in range(reps):
        check_valid(cert, cfg, NOW, None, revs)
    figure(f"agent: revocation and validity check of one certificate, {n} serials listed (ns)",
           round((time.perf_counter() - t0) / reps * 1e9))
    finished("revocation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
