"""Signed records in a live lab (issue 12, item 1): forged, unsigned, expired, revoked records and
records claiming addresses outside their certificate are never programmed, each is logged once and
counted, and the legitimate nodes beside them keep working; the same for forged leases. Then an
unsigned cluster moves to signed records without losing a ping.

Every bad record carries a valid WireGuard key and a free or stolen pod CIDR, so only the signing
checks stand between it and the device. Waiting is on real state: the agents' invalid-record
gauge and their log lines, and `wg show` inside the nodes.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wiremesh.clustermesh import ClusterConfig, NodeRecord, layout, overlay_address, sign_settings
from wiremesh.clustermesh.signed import lease_value, sign_record
from wiremesh.keys import NodeIdentity, PrivateKey, SigningKey, issue, read_signing_key
from wiremesh.lab import Lab
from wiremesh.lab import signing as lab_signing

from .conftest import new_lab_name
from .helpers import Pinger, ping_ok, reaches, record_key, tunnel_diagnosis, wait_until, wg_peers

C = "lab"
NODES = ("node1", "node2", "node3")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(new_lab_name())
    try:
        lab.up(3)
        yield lab
    finally:
        lab.down()
        lab.close()


def metric(lab: Lab, node: str, name: str) -> float:
    _, body = lab.http_get(lab.node(node).health_url + "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith((name + " ", name + "{")))


def skipped_lines(lab: Lab, node: str, key: str) -> list[str]:
    log = (Path(lab.node(node).dir) / "agent.log").read_text().splitlines()
    return [line for line in log if "skipping invalid record" in line and f"{key}:" in line]


def ca(lab: Lab) -> SigningKey:
    return read_signing_key(lab_signing.key_path(lab, C))


def identity(lab: Lab, node: str, cidr: str, *, signer: SigningKey | None = None, now: float | None = None,
             valid_for: int = 86400) -> NodeIdentity:
    key = SigningKey.generate()
    cert = issue(signer or ca(lab), C, node, key.public_key(), cidr, valid_for, now or time.time())
    return NodeIdentity(cert, key)


def record(name: str, cidr: str, **kw: Any) -> NodeRecord:
    """A node record with a fresh, valid WireGuard key and an endpoint no lab node has."""
    return NodeRecord(name=name, cluster=C, endpoint="10.99.0.200:51820",
                      public_key=PrivateKey.generate().public_key().base64, pod_cidr=cidr,
                      overlay_ip=overlay_address(cidr), **kw)


def pod_cidr(lab: Lab, node: str) -> str:
    return str(json.loads(Path(lab.node(node).dir, "state.json").read_text())["pod_cidr"])


def put(lab: Lab, key: str, value: str) -> None:
    assert lab.consul(lambda s: s.put(key, value))


def wait_counted(lab: Lab, n: int) -> None:
    for node in NODES:
        wait_until(lambda node=node: metric(lab, node, "wiremesh_records_invalid") == n, 15,
                   what=f"{node} to count {n} invalid records")


def mesh_works(lab: Lab) -> None:
    for a in NODES:
        peers = wg_peers(lab, a)
        for b in NODES:
            if a != b:
                assert record_key(lab, b) in peers, f"{a} lost {b}"
                assert reaches(lab, a, overlay_address(pod_cidr(lab, b))) is not None, \
                    f"{a} cannot reach {b}\n" + tunnel_diagnosis(lab, a, b)


def test_forged_missing_expired_revoked_and_stolen_records_are_never_programmed(lab: Lab) -> None:
    free = [f"10.240.{i}.0/24" for i in (50, 51, 52, 53, 54, 55, 56, 57)]
    attacker = SigningKey.generate()
    forged_sig = sign_record(record("forged-sig", free[1]), identity(lab, "forged-sig", free[1]))
    other = identity(lab, "forged-sig", free[1])  # the same certificate fields, another identity key
    revoked_id = identity(lab, "revoked", free[4])
    bad: dict[str, tuple[str, str]] = {
        "unsigned": (record("unsigned", free[0]).to_json(), "node_signature: missing"),
        "forged-sig": (dataclasses.replace(forged_sig, node_signature=other.sign(b"x", {})).to_json(),
                       "node_signature: forged"),
        "forged-cert": (sign_record(record("forged-cert", free[2]),
                                    identity(lab, "forged-cert", free[2], signer=attacker)).to_json(),
                        "certificate: forged"),
        "expired": (sign_record(record("expired", free[3]),
                                identity(lab, "expired", free[3], now=time.time() - 10 * 86400)).to_json(),
                    "certificate: expired"),
        "revoked": (sign_record(record("revoked", free[4]), revoked_id).to_json(), "is revoked"),
        "outside": (sign_record(record("outside", free[6]), identity(lab, "outside", free[5])).to_json(),
                    "outside the node's certificate"),
        "stolen": (sign_record(record("stolen", pod_cidr(lab, "node2")),
                               identity(lab, "stolen", pod_cidr(lab, "node2"))).to_json(),
                   "leased to node 'node2'"),
    }
    legit_id = identity(lab, "legit", free[7])
    legit = sign_record(record("legit", free[7]), legit_id)
    before = {n: metric(lab, n, "wiremesh_invalid_records_total") for n in NODES}
    config = lab.consul(lambda s: s.get(layout.config_key(C)))
    assert config is not None
    try:
        # A revocation is a change of the signing settings: signed by the cluster key (clustermesh.anchor).
        stored = ClusterConfig.from_json(config.value)
        put(lab, layout.config_key(C), sign_settings(dataclasses.replace(
            stored, revoked=(revoked_id.certificate.serial,)), [ca(lab)]).to_json())
        for name, (value, _) in bad.items():
            put(lab, layout.node_key(C, name), value)
        put(lab, layout.node_key(C, "legit"), legit.to_json())
        wait_counted(lab, len(bad))
        for n in NODES:
            wait_until(lambda n=n: legit.public_key in wg_peers(lab, n), 10, what=f"{n} to program the legit record")
            peers = wg_peers(lab, n)
            for name, (value, reason) in bad.items():
                assert json.loads(value)["public_key"] not in peers, f"{n} programmed {name}"
                lines = skipped_lines(lab, n, layout.node_key(C, name))
                assert len(lines) == 1 and reason in lines[0], f"{n}: {name}: {lines}"
            assert metric(lab, n, "wiremesh_invalid_records_total") - before[n] == len(bad)
            assert peers[legit.public_key]["allowed_ips"] == {free[7]}
        mesh_works(lab)
    finally:
        for name in [*bad, "legit"]:
            lab.consul(lambda s, name=name: s.delete(layout.node_key(C, name)))
        now = ClusterConfig.from_json(lab.consul(lambda s: s.get(layout.config_key(C))).value)  # type: ignore[union-attr]
        put(lab, layout.config_key(C), sign_settings(dataclasses.replace(now, revoked=()), [ca(lab)]).to_json())
    wait_counted(lab, 0)
    for n in NODES:
        wait_until(lambda n=n: len(wg_peers(lab, n)) == 2, 10, what=f"{n} to drop the legit record")


def test_forged_leases_are_refused_and_take_nothing_from_their_node(lab: Lab) -> None:
    cidr2 = pod_cidr(lab, "node2")
    lease2 = layout.ipam_key(C, cidr2)
    original = lab.consul(lambda s: s.get(lease2))
    assert original is not None
    attacker = SigningKey.generate()
    node3_cert = json.loads(Path(lab.node("node3").dir, "node.crt").read_text())
    forged = {
        # node2's lease rewritten for a node whose certificate the cluster never signed
        lease2: (lease_value(cidr2, identity(lab, "evil", cidr2, signer=attacker)), "certificate: forged"),
        # a free CIDR claimed by a plain lease (no signature at all)
        layout.ipam_key(C, "10.240.60.0/24"): ("evil", "signature: missing"),
        # node3's real certificate copied into a lease of another CIDR, signed by someone else
        layout.ipam_key(C, "10.240.61.0/24"): (json.dumps({"node": "node3", "pod_cidr": "10.240.61.0/24",
                                                           "certificate": node3_cert, "signature": "AAAA"}),
                                               "outside the node's certificate"),
    }
    try:
        for key, (value, _) in forged.items():
            put(lab, key, value)
        wait_counted(lab, len(forged))
        for n in NODES:
            for key, (_, reason) in forged.items():
                lines = skipped_lines(lab, n, key)
                assert len(lines) == 1 and "bad IPAM lease" in lines[0] and reason in lines[0], f"{n}: {lines}"
            assert len(wg_peers(lab, n)) == 2
        mesh_works(lab)  # node2 keeps its CIDR: its certificate, not the forged lease, says whose it is
    finally:
        put(lab, lease2, original.value.decode())
        for key in list(forged)[1:]:
            lab.consul(lambda s, key=key: s.delete(key))
    wait_counted(lab, 0)


def run_cli(lab: Lab, *args: str) -> tuple[int, str]:
    p = lab.run("hub", "wiremesh", "--consul", lab.consul_address(C), *args)
    return p.returncode, p.stdout + p.stderr


def test_an_unsigned_cluster_moves_to_signed_records_without_losing_a_ping() -> None:
    lab = Lab(new_lab_name(), signed=False)
    try:
        lab.up(3)
        config = lab.consul(lambda s: s.get(layout.config_key(C)))
        assert config is not None and "signing_key" not in json.loads(config.value)
        pings = [Pinger(lab, a, overlay_address(pod_cidr(lab, b)), interval=0.02)
                 for a, b in (("node1", "node2"), ("node2", "node3"), ("node3", "node1"))]
        wait_until(lambda: all(ping_ok(lab, "node1", overlay_address(pod_cidr(lab, b))) for b in ("node2", "node3")),
                   10, what="pings to flow")
        key = lab_signing.key_path(lab, C)
        # 1. A signing key for the cluster: its public half goes to Consul, nothing is required yet.
        code, out = run_cli(lab, "cluster", "signing-key", C, "--key", str(key), "--create")
        assert code == 0, out
        # Requiring signatures now would refuse every node: the command says so and changes nothing.
        code, out = run_cli(lab, "cluster", "require-signed", C, "--key", str(key))
        assert code == 1 and "6 live record(s) or lease(s)" in out and "nothing changed" in out, out
        # 2. Enroll every node (for the CIDR it holds), 3. restart its agent: its records are signed.
        for n in NODES:
            assert lab_signing.enroll_node(lab, lab.node(n)) == pod_cidr(lab, n)
            lab.stop_agent(n, signal.SIGKILL)  # a crash-like stop: the record and the tunnels stay
            lab.start_agent(n)
            wait_until(lambda n=n: "node_signature" in json.loads(
                lab.consul(lambda s: s.get(layout.node_key(C, n))).value), 20,  # type: ignore[union-attr]
                what=f"{n}'s record to be signed")
        lab.wait_converged()
        # 4. Require signatures: every record and lease passes the trial, so it turns on.
        code, out = run_cli(lab, "cluster", "require-signed", C, "--key", str(key))
        assert code == 0 and "require_signed on" in out, out
        # An unsigned record is now refused (so the agents follow require_signed), and the signed
        # mesh beside it is untouched.
        latecomer = record("latecomer", "10.240.70.0/24")
        put(lab, layout.ipam_key(C, latecomer.pod_cidr), "latecomer")
        put(lab, layout.node_key(C, "latecomer"), latecomer.to_json())
        wait_counted(lab, 2)
        for n in NODES:
            assert latecomer.public_key not in wg_peers(lab, n)
        mesh_works(lab)
        for p in pings:
            sent, received = p.stop()
            assert sent > 20 and received == sent, f"lost {sent - received} of {sent} pings during the migration"
    finally:
        lab.down()
        lab.close()
