"""Signing keys, certificates, signed records and leases, and the snapshot's checks (no Consul)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wiremesh.clustermesh import ClusterConfig, InvalidRecord, KVItem, NodeRecord, layout, overlay_address
from wiremesh.clustermesh.signed import lease_value, sign_record
from wiremesh.clustermesh.snapshot import ParseCache, parse_cluster
from wiremesh.keys import (Certificate, CertificateError, KeyMaterialError, NodeIdentity, PrivateKey, SigningKey,
                           issue, load_or_generate_signing_key, read_signing_key)

C = "lab"
NOW = 1_800_000_000.0
CA = SigningKey.generate()


def ident(node: str, cidr: str, ca: SigningKey = CA, now: float = NOW, valid: int = 86400) -> NodeIdentity:
    key = SigningKey.generate()
    return NodeIdentity(issue(ca, C, node, key.public_key(), cidr, valid, now), key)


def config(**kw: object) -> ClusterConfig:
    return ClusterConfig(name=C, id=1, pod_cidr="10.240.0.0/16", require_signed=True,
                         signing_key=CA.public_key().base64, **kw)  # type: ignore[arg-type]


def rec(name: str, cidr: str) -> NodeRecord:
    return NodeRecord(name, C, "192.0.2.1:51820", PrivateKey.generate().public_key().base64, cidr,
                      overlay_address(cidr))


def kv(key: str, value: str, index: int = 1) -> tuple[str, KVItem]:
    return key, KVItem(key, value.encode(), index, index)


def snap(cfg: ClusterConfig, *records: tuple[str, KVItem], now: float = NOW):  # type: ignore[no-untyped-def]
    items = dict([kv(layout.config_key(C), cfg.to_json()), *records])
    return parse_cluster(C, 1, items, now=now)


def node(name: str, cidr: str, identity: NodeIdentity | None, lease: bool = True) -> list[tuple[str, KVItem]]:
    r = rec(name, cidr)
    out = [kv(layout.node_key(C, name), (sign_record(r, identity) if identity else r).to_json())]
    if lease:
        out.append(kv(layout.ipam_key(C, cidr), lease_value(cidr, identity) if identity else name))
    return out


# --- keys and certificates -------------------------------------------------------------------


def test_signing_key_file_is_0600_atomic_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "d" / "ca.key"
    key, created = load_or_generate_signing_key(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_signing_key(path) == key and load_or_generate_signing_key(path) == (key, False)
    assert key.secret_bytes().hex() not in repr(key) and "public=" in repr(key)
    os.chmod(path, 0o644)
    with pytest.raises(KeyMaterialError, match="0600"):
        read_signing_key(path)


def test_certificate_round_trips_and_checks() -> None:
    me = ident("n1", "10.240.1.0/24")
    cert = Certificate.from_dict(json.loads(json.dumps(me.certificate.to_dict())))
    assert cert == me.certificate
    cert.check(CA.public_key(), NOW)
    with pytest.raises(CertificateError, match="revoked"):
        cert.check(CA.public_key(), NOW, {cert.serial})
    with pytest.raises(CertificateError, match="expired"):
        cert.check(CA.public_key(), NOW + 86400)
    with pytest.raises(CertificateError, match="does not verify"):
        cert.check(SigningKey.generate().public_key(), NOW)
    with pytest.raises(CertificateError, match="does not verify"):
        dataclasses.replace(cert, pod_cidr="10.240.2.0/24").check(CA.public_key(), NOW)


@pytest.mark.parametrize(("change", "field"), [
    ({"pod_cidr": "10.240.1.1/24"}, "pod_cidr"), ({"serial": "xyz"}, "serial"), ({"not_after": 0}, "not_after"),
    ({"identity_key": "AAAA"}, "identity_key"), ({"version": 2}, "version"), ({"node": "Bad_Name"}, "node"),
    ({"extra": 1}, "certificate"), ({"not_before": True}, "not_before"),
])
def test_malformed_certificate_names_the_field(change: dict[str, object], field: str) -> None:
    d = {**ident("n1", "10.240.1.0/24").certificate.to_dict(), **change}
    with pytest.raises(CertificateError) as e:
        Certificate.from_dict(d)
    assert e.value.field == field


def test_identity_key_must_match_the_certificate() -> None:
    me = ident("n1", "10.240.1.0/24")
    with pytest.raises(CertificateError, match="identity_key"):
        NodeIdentity(me.certificate, SigningKey.generate())


# --- the snapshot's checks -------------------------------------------------------------------


def test_signed_records_and_leases_are_accepted() -> None:
    s = snap(config(), *node("n1", "10.240.1.0/24", ident("n1", "10.240.1.0/24")),
             *node("n2", "10.240.2.0/24", ident("n2", "10.240.2.0/24")))
    assert s.rejected == () and set(s.nodes) == {"n1", "n2"} and s.leases["10.240.1.0/24"] == "n1"


def test_rotation_needs_no_new_certificate() -> None:
    me = ident("n1", "10.240.1.0/24")
    r = rec("n1", "10.240.1.0/24")
    rotated = dataclasses.replace(r, next_public_key=PrivateKey.generate().public_key().base64)
    items = [kv(layout.node_key(C, "n1"), sign_record(rotated, me).to_json()),
             kv(layout.ipam_key(C, "10.240.1.0/24"), lease_value("10.240.1.0/24", me))]
    assert snap(config(), *items).nodes["n1"].next_public_key == rotated.next_public_key


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: node("x", "10.240.9.0/24", None, lease=False), "node_signature: missing"),
    (lambda: node("x", "10.240.9.0/24", ident("x", "10.240.9.0/24", ca=SigningKey.generate())), "certificate: forged"),
    (lambda: node("x", "10.240.9.0/24", ident("x", "10.240.9.0/24", now=NOW - 2 * 86400)), "certificate: expired"),
    (lambda: node("x", "10.240.9.0/24", ident("x", "10.240.8.0/24"), lease=False), "outside the node's certificate"),
    (lambda: node("x", "10.240.9.0/24", ident("y", "10.240.9.0/24"), lease=False), "is node 'y'"),
])
def test_bad_records_are_refused_with_a_reason(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    good = node("n1", "10.240.1.0/24", ident("n1", "10.240.1.0/24"))
    s = snap(config(), *good, *make())
    assert set(s.nodes) == {"n1"}
    assert [r.reason for r in s.rejected if r.key == layout.node_key(C, "x")][0].find(reason) >= 0, s.rejected


def test_tampered_record_and_revoked_serial_are_refused() -> None:
    me = ident("x", "10.240.9.0/24")
    signed = sign_record(rec("x", "10.240.9.0/24"), me)
    tampered = json.loads(signed.to_json()) | {"endpoint": "192.0.2.66:51820"}
    s = snap(config(), kv(layout.node_key(C, "x"), json.dumps(tampered)))
    assert "node_signature: forged" in s.rejected[0].reason
    s = snap(config(revoked=(me.certificate.serial,)), kv(layout.node_key(C, "x"), signed.to_json()))
    assert "revoked" in s.rejected[0].reason and not s.nodes


def test_forged_lease_is_refused_and_takes_nothing() -> None:
    n1 = ident("n1", "10.240.1.0/24")
    forged = lease_value("10.240.1.0/24", ident("evil", "10.240.1.0/24", ca=SigningKey.generate()))
    s = snap(config(), kv(layout.node_key(C, "n1"), sign_record(rec("n1", "10.240.1.0/24"), n1).to_json()),
             kv(layout.ipam_key(C, "10.240.1.0/24"), forged), kv(layout.ipam_key(C, "10.240.5.0/24"), "plain"))
    assert set(s.nodes) == {"n1"} and s.leases == {}
    assert sorted(r.reason.split(" (")[1].split(":")[0] for r in s.rejected) == ["certificate", "signature"]


def test_unsigned_cluster_accepts_both_forms() -> None:
    plain = ClusterConfig(name=C, id=1, pod_cidr="10.240.0.0/16")
    s = snap(plain, *node("n1", "10.240.1.0/24", None), *node("n2", "10.240.2.0/24", ident("n2", "10.240.2.0/24")))
    assert s.rejected == () and set(s.nodes) == {"n1", "n2"}


def test_verification_is_cached_per_value() -> None:
    cache = ParseCache()
    items = dict([kv(layout.config_key(C), config().to_json()), *node("n1", "10.240.1.0/24", ident("n1", "10.240.1.0/24"))])
    parse_cluster(C, 1, items, cache=cache, now=NOW)
    later = parse_cluster(C, 2, items, cache=cache, now=NOW + 2 * 86400)  # the clock checks run every time
    assert not later.nodes and all("certificate: expired" in r.reason for r in later.rejected)
    # The reason does not change with the clock: the agent logs a refused record once, not each second.
    again = parse_cluster(C, 3, items, cache=cache, now=NOW + 2 * 86400 + 7)
    assert [r.reason for r in again.rejected] == [r.reason for r in later.rejected]


def test_config_signing_fields_validate_and_round_trip() -> None:
    cfg = config(revoked=("0" * 32,))
    assert ClusterConfig.from_json(cfg.to_json()) == cfg
    assert "require_signed" not in ClusterConfig(name=C, id=1, pod_cidr="10.0.0.0/16").to_json()
    for bad, field in ((dict(require_signed=True), "require_signed"), (dict(signing_key="AAAA"), "signing_key"),
                       (dict(revoked=["x"]), "revoked")):
        with pytest.raises(InvalidRecord) as e:
            ClusterConfig.from_json(json.dumps({"name": C, "id": 1, "pod_cidr": "10.0.0.0/16", **bad}))
        assert e.value.field == field


# --- property: certificate parsing ------------------------------------------------------------

_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                       max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["version", "cluster", "node", "identity_key", "pod_cidr", "not_before",
                                        "not_after", "serial", "signature", "other"]), _VALUES, max_size=9), st.data())
def test_certificate_is_a_certificate_or_an_error_naming_a_field(mutation: dict[str, object], data: st.DataObject) -> None:
    base = ident("n1", "10.240.1.0/24").certificate.to_dict()
    doc = {**base, **mutation} if data.draw(st.booleans()) else mutation
    try:
        cert = Certificate.from_dict(doc)
    except CertificateError as e:
        assert e.field and e.reason and CA.secret_bytes().hex() not in str(e)
        return
    assert Certificate.from_dict(cert.to_dict()) == cert
    try:
        cert.check(CA.public_key(), time.time())
    except CertificateError as e:
        assert e.field == "certificate"
