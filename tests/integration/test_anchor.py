"""The pinned cluster key and one key per node in a live signed lab (issue 17, items 1 and 2).

- a config rewritten in Consul with `require_signed: false` (anyone with write access, as the
  master token), then an unsigned record with a valid WireGuard key: nothing is programmed, each
  agent logs the refused config once;
- a signed record announcing another node's key (as its next key, or as its own) is refused and
  the node holding that key keeps its tunnels; a node's older signed record written back (its
  record before a rotation) is refused, the node keeps its tunnels and writes its record again;
- the cluster signing key rolled over (announce, enroll again, commit) under traffic: no ping lost.

Waiting is on real state: the agents' log lines and metrics, anchor.json, `wg show`.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiremesh.clustermesh import ClusterConfig, NodeRecord, layout, overlay_address, sign_settings
from wiremesh.clustermesh.signed import lease_value, sign_record
from wiremesh.keys import CERT_DOMAIN, Certificate, VerifyKey, load_or_generate_signing_key, write_signing_key
from wiremesh.lab import Lab
from wiremesh.lab import signing as lab_signing

from .conftest import new_lab_name
from .helpers import Pinger, keep_agent_logs, ping_ok, record_key, wait_until, wg_peers
from .test_signed_records import ca, identity, metric, pod_cidr, put, record, run_cli, skipped_lines

C = "lab"
NODES = ("node1", "node2", "node3")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(new_lab_name())
    try:
        lab.up(3)
        yield lab
    finally:
        keep_agent_logs(lab, tmp_path_factory.mktemp("anchor-logs"))
        lab.down()
        lab.close()


def stored_config(lab: Lab) -> ClusterConfig:
    item = lab.consul(lambda s: s.get(layout.config_key(C)))
    assert item is not None
    return ClusterConfig.from_json(item.value)


def anchor_state(lab: Lab, node: str) -> dict[str, object]:
    return json.loads(Path(lab.node(node).dir, "anchor.json").read_text())  # type: ignore[no-any-return]


def stored_record(lab: Lab, node: str) -> NodeRecord:
    item = lab.consul(lambda s: s.get(layout.node_key(C, node)))
    assert item is not None
    return NodeRecord.from_json(item.value)


def free_cidrs(lab: Lab, n: int) -> list[str]:
    held = {pod_cidr(lab, x) for x in NODES}
    return [c for c in (f"10.240.{i}.0/24" for i in range(100, 200)) if c not in held][:n]


def mesh_intact(lab: Lab) -> None:
    for a in NODES:
        peers = wg_peers(lab, a)
        for b in NODES:
            if a != b:
                assert peers.get(record_key(lab, b), {}).get("allowed_ips") == {pod_cidr(lab, b)}, f"{a} lost {b}"
                assert ping_ok(lab, a, overlay_address(pod_cidr(lab, b))), f"{a} cannot reach {b}"


def sign_again(lab: Lab, cfg: ClusterConfig) -> None:
    """The config as the operator would write it: signed by the cluster key, a serial above the stored one."""
    current = stored_config(lab)
    put(lab, layout.config_key(C), sign_settings(dataclasses.replace(cfg, signing_serial=max(
        cfg.signing_serial, current.signing_serial)), [ca(lab)]).to_json())


def test_the_pinned_anchor_comes_from_enrollment(lab: Lab) -> None:
    pub = ca(lab).public_key().base64
    for n in NODES:
        assert Path(lab.node(n).dir, "cluster.pub").read_text().strip() == pub
        wait_until(lambda n=n: Path(lab.node(n).dir, "anchor.json").exists(), 10, what=f"{n}'s anchor.json")
        state = anchor_state(lab, n)
        assert state["key"] == pub and state["serial"] == stored_config(lab).signing_serial


def test_an_unsigned_config_change_then_an_unsigned_record_programs_nothing(lab: Lab) -> None:
    good = stored_config(lab)
    ckey = layout.config_key(C)
    before = {n: metric(lab, n, "wiremesh_invalid_records_total") for n in NODES}
    (cidr,) = free_cidrs(lab, 1)
    intruder = record("intruder", cidr)
    nkey = layout.node_key(C, "intruder")
    try:
        # Anyone who can write the KV (the master token) turns signing off...
        put(lab, ckey, json.dumps(dict(json.loads(good.to_json()), require_signed=False)))
        for n in NODES:
            wait_until(lambda n=n: skipped_lines(lab, n, ckey), 15, what=f"{n} to refuse the config")
        # ... and adds a peer with a valid WireGuard key and a lease of a free CIDR.
        put(lab, layout.ipam_key(C, cidr), "intruder")
        put(lab, nkey, intruder.to_json())
        for n in NODES:
            wait_until(lambda n=n: skipped_lines(lab, n, nkey), 15, what=f"{n} to refuse the unsigned record")
        for n in NODES:
            assert intruder.public_key not in wg_peers(lab, n), f"{n} programmed the unsigned record"
            lines = skipped_lines(lab, n, ckey)
            assert len(lines) == 1 and "settings_signatures: forged" in lines[0], f"{n}: {lines}"
            assert "certificate" in skipped_lines(lab, n, nkey)[0] or "node_signature" in skipped_lines(lab, n, nkey)[0]
            # The config, the record and its plain lease: each refused, logged and counted once.
            assert metric(lab, n, "wiremesh_invalid_records_total") - before[n] == 3
            assert anchor_state(lab, n)["serial"] == good.signing_serial  # the last signed settings stay
        mesh_intact(lab)
    finally:
        lab.consul(lambda s: s.delete(nkey))
        lab.consul(lambda s: s.delete(layout.ipam_key(C, cidr)))
        sign_again(lab, good)  # a signed config again (a higher serial: the old one written back is refused)
    for n in NODES:
        wait_until(lambda n=n: metric(lab, n, "wiremesh_records_invalid") == 0, 15, what=f"{n} to be clean")


def test_a_record_announcing_another_nodes_key_is_refused(lab: Lab) -> None:
    victim = record_key(lab, "node1")
    c1, c2 = free_cidrs(lab, 2)
    thieves = {
        # Its own key, and node1's as the next one, switched long ago: peers would give node1's key
        # this node's addresses, and drop node1.
        "thief-next": (c1, dataclasses.replace(record("thief-next", c1), next_public_key=victim, switch_at=1),
                       "next_public_key: is node 'node1''s key"),
        "thief-key": (c2, dataclasses.replace(record("thief-key", c2), public_key=victim),
                      "public_key: already used by node 'node1'"),
    }
    try:
        for name, (cidr, rec, _) in thieves.items():
            who = identity(lab, name, cidr)
            put(lab, layout.ipam_key(C, cidr), lease_value(cidr, who))
            put(lab, layout.node_key(C, name), sign_record(rec, who).to_json())
        for n in NODES:
            for name, (_, _, reason) in thieves.items():
                key = layout.node_key(C, name)
                wait_until(lambda n=n, key=key: skipped_lines(lab, n, key), 15, what=f"{n} to refuse {name}")
                lines = skipped_lines(lab, n, key)
                if n == "node1" and name == "thief-key":
                    continue
                assert len(lines) == 1 and reason in lines[0], f"{n}: {name}: {lines}"
        mesh_intact(lab)
        for n in ("node2", "node3"):
            assert wg_peers(lab, n)[victim]["allowed_ips"] == {pod_cidr(lab, "node1")}
    finally:
        for name, (cidr, _, _) in thieves.items():
            lab.consul(lambda s, name=name: s.delete(layout.node_key(C, name)))
            lab.consul(lambda s, cidr=cidr: s.delete(layout.ipam_key(C, cidr)))
    for n in NODES:
        wait_until(lambda n=n: metric(lab, n, "wiremesh_records_invalid") == 0, 15, what=f"{n} to be clean")


def test_an_older_signed_record_written_back_is_refused(lab: Lab) -> None:
    node = "node2"
    item = lab.consul(lambda s: s.get(layout.node_key(C, node)))
    assert item is not None
    old, old_key = item.value.decode(), stored_record(lab, node).public_key
    rot = lab.popen(node, "wiremesh", "-o", "json", "keys", "rotate", node, "--wait",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = rot.communicate(timeout=120)
    assert rot.returncode == 0, err[-1500:]
    new = stored_record(lab, node)
    assert new.public_key != old_key and new.key_epoch == NodeRecord.from_json(old).key_epoch + 1
    key = layout.node_key(C, node)
    for n in NODES:
        wait_until(lambda n=n: wg_peers(lab, n).get(new.public_key) is not None or n == node, 15,
                   what=f"{n} to take {node}'s new key")
    # The record before the rotation, signed by the node itself, written back under its session.
    assert lab.consul(lambda s: s.put(key, old))
    for n in ("node1", "node3"):
        wait_until(lambda n=n: any("key_epoch" in line for line in skipped_lines(lab, n, key)), 15,
                   what=f"{n} to refuse the old record")
        peers = wg_peers(lab, n)  # (the old key may linger a moment without addresses: agent.reconciler)
        assert not peers.get(old_key, {}).get("allowed_ips") and peers[new.public_key]["allowed_ips"] == {
            pod_cidr(lab, node)}
    # The node writes its own record again; its tunnels never left.
    wait_until(lambda: stored_record(lab, node).public_key == new.public_key, 15, what=f"{node} to write its record")
    mesh_intact(lab)
    for n in ("node1", "node3"):
        assert len([line for line in skipped_lines(lab, n, key) if "key_epoch" in line]) == 1


def test_the_cluster_signing_key_rolls_over_under_traffic_without_a_lost_ping(lab: Lab, tmp_path: Path) -> None:
    old_path = lab_signing.key_path(lab, C)
    new_path = tmp_path / "new.key"
    new, _ = load_or_generate_signing_key(new_path)
    new_pub = new.public_key().base64
    pings = [Pinger(lab, a, overlay_address(pod_cidr(lab, b)), interval=0.02)
             for a in NODES for b in NODES if a != b]
    try:
        wait_until(lambda: all(ping_ok(lab, "node1", overlay_address(pod_cidr(lab, b))) for b in NODES[1:]), 10,
                   what="pings to flow")
        # 1. Announce the new key: signed by both.
        code, out = run_cli(lab, "cluster", "roll-signing-key", C, "--key", str(old_path), "--new", str(new_path))
        assert code == 0, out
        announced = stored_config(lab)
        assert announced.next_signing_key == new_pub
        for n in NODES:
            wait_until(lambda n=n: anchor_state(lab, n)["serial"] == announced.signing_serial, 15,
                       what=f"{n} to accept the announcement")
        # Committing now would cut every node: refused, nothing changes.
        code, out = run_cli(lab, "cluster", "roll-signing-key", C, "--key", str(old_path), "--new", str(new_path),
                            "--commit")
        assert code == 1 and "3 live record(s)" in out, out
        # 2. Enroll every node again with the new key; the agents take the certificates live.
        for n in NODES:
            lab_signing.enroll_node(lab, lab.node(n), key=new_path)
            assert Path(lab.node(n).dir, "cluster.pub").read_text().strip() == new_pub
        for n in NODES:
            wait_until(lambda n=n: _signed_by(stored_record(lab, n), new_pub), 20,
                       what=f"{n} to sign with its new certificate")
        # 3. Commit: every agent's anchor moves to the new key.
        code, out = run_cli(lab, "cluster", "roll-signing-key", C, "--key", str(old_path), "--new", str(new_path),
                            "--commit")
        assert code == 0, out
        committed = stored_config(lab)
        assert committed.signing_key == new_pub and not committed.next_signing_key
        for n in NODES:
            wait_until(lambda n=n: anchor_state(lab, n)["key"] == new_pub, 15, what=f"{n} to move its anchor")
            assert anchor_state(lab, n)["serial"] == committed.signing_serial
        mesh_intact(lab)
        for n in NODES:
            assert metric(lab, n, "wiremesh_records_invalid") == 0
    finally:
        results = [(p, *p.stop()) for p in pings]
        if stored_config(lab).signing_key == new_pub:
            write_signing_key(old_path, new)  # the lab's key is the new one from now on
    for p, sent, received in results:
        assert sent > 20 and received == sent, f"lost {sent - received} of {sent} pings during the roll-over"


def _signed_by(rec: NodeRecord, pub: str) -> bool:
    if rec.certificate is None:
        return False
    cert = Certificate.from_dict(rec.certificate)
    try:
        VerifyKey.from_base64(pub).verify(CERT_DOMAIN, cert.body(), cert.signature)
    except Exception:  # noqa: BLE001 - not signed by it
        return False
    return True
