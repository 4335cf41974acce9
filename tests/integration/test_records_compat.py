"""Forward-compatible records in a live 3-node lab: fields an agent does not know are used, not
refused; a record of a newer major schema version is skipped with one log line.

The lab's cluster requires signed records: a record rewritten here is signed again with its
node's identity key, as a newer agent that added the fields would have signed it.

Each test writes a "probe": a node record of schema 2.0 written after its other writes. Every agent
logs a rejected key once, from a snapshot of the whole prefix, so once node1 has logged the probe
it has also read everything written before it: the tests wait for that instead of sleeping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wiremesh.clustermesh import KVItem, layout
from wiremesh.keys import RECORD_DOMAIN, Certificate, NodeIdentity, PrivateKey, read_signing_key
from wiremesh.lab import Lab

from .helpers import record_key, wait_until, wg_peers

CLUSTER = "lab"
NEWER = "schema: schema version 2.0 is newer than this agent's 1.0; upgrade the agent"


def log_lines(lab: Lab, node: str, needle: str) -> list[str]:
    return [line for line in (Path(lab.node(node).dir) / "agent.log").read_text().splitlines() if needle in line]


def rejections(lab: Lab, node: str, key: str) -> list[str]:
    return [line for line in log_lines(lab, node, key) if "skipping" in line or "invalid" in line]


def stored(lab: Lab, node: str) -> KVItem:
    item = lab.consul(lambda s: s.get(layout.node_key(CLUSTER, node)))
    assert item is not None and item.session, f"{node} has no record held by its session"
    return item


def signed_by(lab: Lab, node: str, record: dict[str, Any]) -> dict[str, Any]:
    """`record` signed with `node`'s identity key (its certificate beside it), if the lab has one."""
    d = Path(lab.node(node).dir)
    if not (d / "node.crt").exists():
        return record
    me = NodeIdentity(Certificate.from_dict(json.loads((d / "node.crt").read_text())),
                      read_signing_key(d / "identity.key"))
    body = {k: v for k, v in record.items() if k != "node_signature"}
    return {**body, "node_signature": me.sign(RECORD_DOMAIN, body)}


def write_own_record(lab: Lab, node: str, record: dict[str, Any]) -> None:
    """Overwrite `node`'s record under the session that already holds it (acquiring a key again
    with its holder's session is a plain write), as the node's own agent would, signed as it would."""
    record = signed_by(lab, node, record)
    item = stored(lab, node)
    assert lab.consul(lambda s: s.put(item.key, json.dumps(record), acquire=item.session))


def newer_major_record(lab: Lab, name: str) -> tuple[str, str]:
    """A record that would be valid but for its schema version 2.0: (key, its public key)."""
    base = json.loads(stored(lab, "node1").value)
    pub = PrivateKey.generate().public_key().base64
    key = layout.node_key(CLUSTER, name)
    assert lab.consul(lambda s: s.put(key, json.dumps(dict(base, name=name, public_key=pub, schema="2.0",
                                                           endpoint="10.99.0.77:51820"))))
    return key, pub


def probe(lab: Lab, name: str, nodes: tuple[str, ...] = ("node1",)) -> str:
    """Write a schema-2.0 probe and wait until each of `nodes` has logged it: they have then read
    every earlier write."""
    key, _ = newer_major_record(lab, name)
    for n in nodes:
        wait_until(lambda n=n: rejections(lab, n, key), 15, what=f"{n} to log the probe {key}")
    return key


def delete(lab: Lab, *keys: str) -> None:
    for key in keys:
        lab.consul(lambda s, k=key: s.delete(k))


def node2_is_a_peer_of_node1(lab: Lab, staged: str | None = None) -> None:
    """node2 is node1's peer with its record's key. `staged`, a next key written into node2's
    record, may sit beside it as a locked entry (no allowed IPs, issue 17 item 6) until node2's
    agent rewrites its record without the key it never made (a race with node1's pass)."""
    peers = wg_peers(lab, "node1")
    key2 = record_key(lab, "node2")
    pod2 = json.loads(Path(lab.node("node2").dir, "state.json").read_text())["pod_cidr"]
    assert key2 in peers, f"node1 lost node2 as a peer: {sorted(peers)}"
    assert peers[key2]["allowed_ips"] == {pod2}
    assert peers[key2]["endpoint"] == f"{lab.node('node2').underlay}:51820"
    if staged is not None and staged in peers:
        assert peers.pop(staged)["allowed_ips"] == set(), "a next key was programmed with addresses"
    assert len(peers) == 2


def no_node2_rejection(lab: Lab) -> None:
    key = layout.node_key(CLUSTER, "node2")
    for n in ("node1", "node2", "node3"):
        assert rejections(lab, n, key) == [], f"{n} refused node2's record"


def test_unknown_fields_are_used_and_kept(lab3: Lab) -> None:
    original = json.loads(stored(lab3, "node2").value)
    unknown = {"signature": "c2lnbmVkIGJ5IGEgbGF0ZXIgYWdlbnQ=", "trust": {"cert": ["a", {"not_after": 1767225600}]}}
    keys: list[str] = []
    try:
        write_own_record(lab3, "node2", {**original, "schema": "1.3", **unknown})
        # node2 too: it has then compared its own record with what it would publish.
        keys.append(probe(lab3, "probe-unknown", ("node1", "node2")))
        node2_is_a_peer_of_node1(lab3)
        no_node2_rejection(lab3)
        # The fields differ from what node2 publishes only in what it does not know: to node2 it
        # is its own record unchanged, so it does not rewrite it and nothing is dropped.
        now = json.loads(stored(lab3, "node2").value)
        assert {k: now.get(k) for k in unknown} == unknown and now["schema"] == "1.3"
    finally:
        delete(lab3, *keys)
        write_own_record(lab3, "node2", original)


def test_next_public_key_and_signature_are_used(lab3: Lab) -> None:
    original = json.loads(stored(lab3, "node2").value)
    nxt = PrivateKey.generate().public_key().base64
    extended = {**original, "next_public_key": nxt, "signature": "c2lnbmVkIGJ5IGEgbGF0ZXIgYWdlbnQ="}
    keys: list[str] = []
    try:
        write_own_record(lab3, "node2", extended)
        keys.append(probe(lab3, "probe-next-key"))
        node2_is_a_peer_of_node1(lab3, staged=nxt)
        no_node2_rejection(lab3)
    finally:
        delete(lab3, *keys)
        write_own_record(lab3, "node2", original)


def test_newer_major_record_is_skipped_with_one_log_line(lab3: Lab) -> None:
    keys: list[str] = []
    try:
        key, pub = newer_major_record(lab3, "fake-v2")
        keys.append(key)
        wait_until(lambda: rejections(lab3, "node1", key), 15, what=f"node1 to log {key}")
        # More snapshots go by (another record, then node2's own rewritten): still one line.
        keys.append(probe(lab3, "probe-after-fake"))
        write_own_record(lab3, "node2", json.loads(stored(lab3, "node2").value))
        keys.append(probe(lab3, "probe-after-rewrite"))
        lines = log_lines(lab3, "node1", key)
        assert len(lines) == 1, lines
        assert lines[0].endswith(f"{key}: {NEWER}"), lines[0]
        for n in ("node1", "node2", "node3"):
            assert pub not in wg_peers(lab3, n), f"{n} programmed the schema-2.0 record"
            assert len(wg_peers(lab3, n)) == 2
        node2_is_a_peer_of_node1(lab3)
    finally:
        delete(lab3, *keys)
