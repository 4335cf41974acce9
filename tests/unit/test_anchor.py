"""The pinned cluster key (clustermesh.anchor, agent.trust) and one key per node (clustermesh.claims):
signing settings taken only signed by the anchor, roll-overs, key claims and key epochs (no Consul)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from wiremesh.agent.config import parse_config
from wiremesh.agent.errors import ConfigError
from wiremesh.agent.trust import TrustState, load_pin, pin_anchor, pin_from_certificate
from wiremesh.clustermesh import Anchor, ClusterConfig, InvalidRecord, KVItem, NodeRecord, Seen, layout, overlay_address
from wiremesh.clustermesh.anchor import accept_settings, apply_settings, sign_settings
from wiremesh.clustermesh.claims import check_epoch, settle_keys
from wiremesh.clustermesh.signed import lease_value, sign_record
from wiremesh.clustermesh.snapshot import ParseCache, parse_cluster
from wiremesh.keys import NodeIdentity, PrivateKey, SigningKey, VerifyKey, issue

C = "lab"
NOW = 1_800_000_000.0
K1, K2, EVIL = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
CKEY = layout.config_key(C)


def pub(k: SigningKey) -> str:
    return k.public_key().base64


def config(key: SigningKey = K1, **kw: Any) -> ClusterConfig:
    return ClusterConfig(name=C, id=1, pod_cidr="10.240.0.0/16", require_signed=True, signing_key=pub(key), **kw)


def anchor(key: SigningKey = K1) -> Anchor:
    return Anchor(C, pub(key), pub(key))


def wg(seed: int) -> str:
    return PrivateKey(bytes([seed]) * 32).public_key().base64


def ident(node: str, cidr: str, ca: SigningKey = K1, now: float = NOW) -> NodeIdentity:
    key = SigningKey.generate()
    return NodeIdentity(issue(ca, C, node, key.public_key(), cidr, 86400, now), key)


def rec(name: str, cidr: str, key: str, **kw: Any) -> NodeRecord:
    return NodeRecord(name, C, "192.0.2.1:51820", key, cidr, overlay_address(cidr), **kw)


# --- signed settings -------------------------------------------------------------------------
def test_signed_settings_round_trip_and_are_accepted() -> None:
    cfg = sign_settings(config(revoked=("a" * 32,)), [K1])
    assert cfg.signing_serial == 1 and dict(cfg.settings_signatures).keys() == {pub(K1)}
    again = ClusterConfig.from_json(cfg.to_json())
    assert again == cfg
    new = accept_settings(again, anchor())
    assert (new.key, new.serial, new.settings) == (pub(K1), 1, cfg)


@pytest.mark.parametrize("change, field, reason", [
    (lambda c: dataclasses.replace(c, require_signed=False, signing_key=""), "settings_signatures", "forged"),
    (lambda c: dataclasses.replace(c, revoked=()), "settings_signatures", "forged"),
    (lambda c: dataclasses.replace(c, settings_signatures=()), "settings_signatures", "missing"),
    (lambda c: sign_settings(dataclasses.replace(c, require_signed=False), [EVIL]), "settings_signatures",
     "not signed by the cluster key"),
])
def test_an_unsigned_or_wrongly_signed_change_is_refused_and_the_last_settings_stay(change, field, reason) -> None:  # type: ignore[no-untyped-def]
    good = sign_settings(config(revoked=("a" * 32,)), [K1])
    a = accept_settings(good, anchor())
    bad = change(good)
    cfg, after, why = apply_settings(dataclasses.replace(bad, mtu=1400), a, CKEY)
    assert why is not None and why.field == field and reason in why.reason
    assert after is a
    # The last accepted settings stay; the fields that are not signed follow Consul.
    assert (cfg.require_signed, cfg.signing_key, cfg.revoked, cfg.mtu) == (True, pub(K1), ("a" * 32,), 1400)


def test_before_any_signed_settings_the_pinned_key_is_required() -> None:
    unsigned = dataclasses.replace(config(EVIL), require_signed=False, revoked=("e" * 32,))
    cfg, after, why = apply_settings(unsigned, anchor(), CKEY)
    assert why is not None
    # (An unsigned revocation only refuses more: a cluster signed before its settings were keeps it.)
    assert (cfg.require_signed, cfg.signing_key, cfg.revoked) == (True, pub(K1), ("e" * 32,))


def test_an_older_signed_config_written_back_is_refused() -> None:
    old = sign_settings(dataclasses.replace(config(), require_signed=False), [K1])
    new = sign_settings(dataclasses.replace(old, require_signed=True), [K1])
    a = accept_settings(new, accept_settings(old, anchor()))
    with pytest.raises(InvalidRecord, match="older than the 2"):
        accept_settings(old, a)
    same_serial = sign_settings(dataclasses.replace(new, revoked=("b" * 32,)), [K1], bump=False)
    with pytest.raises(InvalidRecord, match="serial of other signing settings"):
        accept_settings(same_serial, a)
    assert accept_settings(new, a) == a  # the same settings again: nothing changes


def test_a_roll_over_moves_the_anchor_only_through_the_old_key() -> None:
    base = sign_settings(config(), [K1])
    a1 = accept_settings(base, anchor(K1))
    announced = sign_settings(dataclasses.replace(base, next_signing_key=pub(K2)), [K1, K2])
    a1 = accept_settings(announced, a1)
    a2 = accept_settings(announced, Anchor(C, pub(K2), pub(K2)))  # a node enrolled with the new key
    assert a1.key == pub(K1) and a2.key == pub(K2)
    committed = sign_settings(dataclasses.replace(announced, signing_key=pub(K2), next_signing_key=""), [K1, K2])
    assert accept_settings(committed, a1).key == pub(K2)
    assert accept_settings(committed, a2).key == pub(K2)
    later = sign_settings(dataclasses.replace(committed, revoked=("c" * 32,)), [K2])
    assert accept_settings(later, accept_settings(committed, a1)).serial == later.signing_serial
    # A "roll-over" to the attacker's key, signed by the attacker only, moves nothing.
    hijack = sign_settings(dataclasses.replace(base, signing_key=pub(EVIL)), [EVIL])
    with pytest.raises(InvalidRecord, match="not signed by the cluster key"):
        accept_settings(hijack, a1)


def test_certificates_of_the_next_key_are_valid_during_a_roll_over() -> None:
    announced = sign_settings(config(next_signing_key=pub(K2)), [K1, K2])
    old_id, new_id = ident("a", "10.240.1.0/24", K1), ident("b", "10.240.2.0/24", K2)
    items = {CKEY: KVItem(CKEY, announced.to_json().encode(), 1)}
    for i, (name, cidr, who) in enumerate((("a", "10.240.1.0/24", old_id), ("b", "10.240.2.0/24", new_id))):
        items[layout.node_key(C, name)] = KVItem(layout.node_key(C, name),
                                                 sign_record(rec(name, cidr, wg(i + 1)), who).to_json().encode(), 2)
        items[layout.ipam_key(C, cidr)] = KVItem(layout.ipam_key(C, cidr), lease_value(cidr, who).encode(), 2)
    snap = parse_cluster(C, 1, items, now=NOW, anchor=anchor(K2))
    assert sorted(snap.nodes) == ["a", "b"] and not snap.rejected
    assert snap.anchor is not None and snap.anchor.serial == 1


def test_a_forged_config_in_a_snapshot_is_refused_and_unsigned_records_stay_out() -> None:
    good = sign_settings(config(), [K1])
    items = {CKEY: KVItem(CKEY, good.to_json().encode(), 1)}
    a = parse_cluster(C, 1, items, now=NOW, anchor=anchor()).anchor
    forged = json.loads(good.to_json()) | {"require_signed": False}
    nkey = layout.node_key(C, "intruder")
    items = {CKEY: KVItem(CKEY, json.dumps(forged).encode(), 2),
             nkey: KVItem(nkey, rec("intruder", "10.240.9.0/24", wg(9)).to_json().encode(), 3),
             layout.ipam_key(C, "10.240.9.0/24"): KVItem(layout.ipam_key(C, "10.240.9.0/24"), b"intruder", 3)}
    snap = parse_cluster(C, 2, items, last_config=good, now=NOW, anchor=a)
    assert snap.config is not None and snap.config.require_signed and snap.anchor == a
    reasons = {r.key: r.reason for r in snap.rejected}
    assert reasons[CKEY].startswith("settings_signatures: forged") and "last accepted ones stay" in reasons[CKEY]
    assert "intruder" not in snap.nodes
    # Without an anchor (an agent that pinned nothing) the config is taken as it is, as before.
    assert "intruder" in parse_cluster(C, 2, items, now=NOW).nodes


# --- the agent's pin and state ---------------------------------------------------------------
def agent_cfg(tmp_path: Path, **kw: Any) -> Any:
    return parse_config({"node": "n1", "cluster": C, "underlay_address": "192.0.2.1",
                         "key_file": str(tmp_path / "private.key"), "state_dir": str(tmp_path), **kw})


def test_pin_from_config_file_or_certificate(tmp_path: Path) -> None:
    assert load_pin(agent_cfg(tmp_path)) is None
    assert load_pin(agent_cfg(tmp_path, cluster_signing_key=pub(K1))) == pub(K1)
    (tmp_path / "cluster.pub").write_text(pub(K2) + "\n")
    assert load_pin(agent_cfg(tmp_path)) == pub(K2)
    (tmp_path / "cluster.pub").write_text("not a key\n")
    with pytest.raises(ConfigError, match="cluster_key_file"):
        load_pin(agent_cfg(tmp_path))
    with pytest.raises(ConfigError, match="cluster_key_file"):
        load_pin(agent_cfg(tmp_path, cluster_key_file=str(tmp_path / "absent.pub")))
    me = ident("n1", "10.240.1.0/24", K2)
    assert pin_from_certificate(me, config(K1, next_signing_key=pub(K2))) == pub(K2)
    assert pin_from_certificate(me, config(EVIL)) is None  # Consul's key did not sign it: nothing pinned


def test_the_anchor_and_the_nodes_seen_survive_a_restart(tmp_path: Path) -> None:
    trust = TrustState(tmp_path, C)
    a = pin_anchor(trust, pub(K1), None, config())
    assert a == anchor(K1)
    moved = accept_settings(sign_settings(config(K2), [K1, K2]), a)
    trust.save_anchor(moved)
    assert pin_anchor(trust, pub(K1), None, config()) == moved  # rolled over from the same pin
    assert pin_anchor(trust, None, None, config()) == moved
    repinned = pin_anchor(trust, pub(EVIL), None, config())  # the operator pinned another key
    assert repinned is not None and repinned.key == pub(EVIL) and repinned.serial == moved.serial
    seen = {"n2": Seen(3, wg(2), wg(3), 7)}
    trust.save_seen(seen)
    assert TrustState(tmp_path, C).load_seen() == seen
    assert TrustState(tmp_path, "other").load_seen() == {}
    (tmp_path / "nodes-seen.json").write_text("{broken")
    assert trust.load_seen() == {}


# --- one key, one node -----------------------------------------------------------------------
A, B = "10.240.1.0/24", "10.240.2.0/24"


def test_a_record_naming_another_nodes_key_as_its_next_is_refused() -> None:
    victim = rec("a", A, wg(1))
    thief = rec("b", B, wg(2), next_public_key=wg(1), switch_at=1)
    for order in ([("b", thief), ("a", victim)], [("a", victim), ("b", thief)]):
        kept, refused = settle_keys(order, {})
        assert list(kept) == ["a"] and [(n, e.field) for n, e in refused] == [("b", "next_public_key")]


def test_a_remembered_key_stays_with_its_node_whatever_the_order() -> None:
    victim = rec("a", A, wg(1))
    thief = rec("b", B, wg(1))
    kept, refused = settle_keys([("b", thief), ("a", victim)], {"a": Seen(0, wg(1))})
    assert list(kept) == ["a"] and refused[0][1].reason == "already used by node 'a'"
    # A rotating node's announced next key is its own even against an older record naming it.
    rotating = rec("a", A, wg(1), next_public_key=wg(5))
    squatter = rec("b", B, wg(5))
    kept, _ = settle_keys([("b", squatter), ("a", rotating)], {"a": Seen(0, wg(1), wg(5))})
    assert list(kept) == ["a"]


def test_a_rotation_keeps_its_records() -> None:
    seen: dict[str, Seen] = {}
    for step in (rec("a", A, wg(1)), rec("a", A, wg(1), next_public_key=wg(2)),
                 rec("a", A, wg(1), next_public_key=wg(2), switch_at=5), rec("a", A, wg(2), key_epoch=1)):
        check_epoch(step, 10, seen.get("a"))
        kept, refused = settle_keys([("a", step), ("b", rec("b", B, wg(3)))], seen)
        assert not refused
        seen["a"] = Seen(step.key_epoch, step.public_key, step.next_public_key, 10)


def test_key_epoch_never_goes_back() -> None:
    seen = Seen(3, wg(2), "", 10)
    check_epoch(rec("a", A, wg(2), key_epoch=3), 10, seen)
    check_epoch(rec("a", A, wg(4), key_epoch=4), 10, seen)
    with pytest.raises(InvalidRecord, match="key_epoch: 2 is older than the 3"):
        check_epoch(rec("a", A, wg(1), key_epoch=2), 10, seen)
    with pytest.raises(InvalidRecord, match="epoch of another public key"):
        check_epoch(rec("a", A, wg(9), key_epoch=3), 10, seen)
    with pytest.raises(InvalidRecord, match="older than the one this node's records carried"):
        check_epoch(rec("a", A, wg(2), key_epoch=3), 9, seen)
    check_epoch(rec("a", A, wg(9), key_epoch=0), 11, seen)  # enrolled again: a new history
    # At the same epoch, the next key it announced is the switch of a rotation.
    check_epoch(rec("a", A, wg(7), key_epoch=3), 10, Seen(3, wg(2), wg(7), 10))


def test_an_old_signed_record_written_back_is_refused_and_the_last_one_kept() -> None:
    cfg = sign_settings(config(), [K1])
    me = ident("a", A)
    items = {CKEY: KVItem(CKEY, cfg.to_json().encode(), 1),
             layout.ipam_key(C, A): KVItem(layout.ipam_key(C, A), lease_value(A, me).encode(), 1)}
    nkey = layout.node_key(C, "a")
    before, after = sign_record(rec("a", A, wg(1)), me), sign_record(rec("a", A, wg(2), key_epoch=1), me)
    cache, seen = ParseCache(), {}
    for i, r in enumerate((before, after)):
        items[nkey] = KVItem(nkey, r.to_json().encode(), 10 + i)
        s = parse_cluster(C, 10 + i, items, cache=cache, now=NOW, anchor=anchor(), seen=seen)
        seen = dict(s.seen)
        assert s.nodes["a"] == r and not s.rejected
    items[nkey] = KVItem(nkey, before.to_json().encode(), 20)  # written back
    s = parse_cluster(C, 20, items, cache=cache, now=NOW, anchor=anchor(), seen=seen)
    assert [r.reason.split(":")[0] for r in s.rejected] == ["key_epoch"]
    assert s.nodes["a"] == after and s.kept == {"a"} and s.seen["a"].epoch == 1
    # After a restart (no cache, the seen epochs from the state dir) it is refused just the same.
    s = parse_cluster(C, 20, items, now=NOW, anchor=anchor(), seen=seen)
    assert "a" not in s.nodes and s.rejected[0].reason.startswith("key_epoch")


def test_snapshot_refuses_a_thief_of_a_key_as_next_and_keeps_the_victim() -> None:
    thief_id, victim_id = ident("b", B), ident("a", A)
    cfg = sign_settings(config(), [K1])
    items = {CKEY: KVItem(CKEY, cfg.to_json().encode(), 1)}
    for name, cidr, who, r, idx in (("a", A, victim_id, rec("a", A, wg(1)), 50),
                                    ("b", B, thief_id, rec("b", B, wg(2), next_public_key=wg(1), switch_at=1), 5)):
        items[layout.node_key(C, name)] = KVItem(layout.node_key(C, name), sign_record(r, who).to_json().encode(), idx)
        items[layout.ipam_key(C, cidr)] = KVItem(layout.ipam_key(C, cidr), lease_value(cidr, who).encode(), 1)
    s = parse_cluster(C, 1, items, now=NOW, anchor=anchor())
    assert list(s.nodes) == ["a"]
    assert [(r.key, r.reason) for r in s.rejected] == [(layout.node_key(C, "b"), "next_public_key: is node 'a''s key")]


# --- the operator's side: signed changes and the roll-over (an in-memory KV) -----------------
class FakeStore:
    def __init__(self) -> None:
        self.kv: dict[str, KVItem] = {}
        self.index = 1

    def get(self, key: str) -> KVItem | None:
        return self.kv.get(key)

    def put(self, key: str, value: str | bytes, cas: int | None = None) -> bool:
        old = self.kv.get(key)
        if cas is not None and (old.modify_index if old else 0) != cas:
            return False
        self.index += 1
        self.kv[key] = KVItem(key, value.encode() if isinstance(value, str) else value, self.index)
        return True

    def list(self, prefix: str) -> tuple[int, dict[str, KVItem]]:
        return self.index, {k: v for k, v in self.kv.items() if k.startswith(prefix)}

    def delete(self, key: str, cas: int | None = None) -> bool:
        old = self.kv.get(key)
        if cas is not None and (old.modify_index if old else 0) != cas:
            return False
        self.kv.pop(key, None)
        return True


def test_operator_changes_are_signed_and_a_roll_over_commits_only_when_every_node_moved(tmp_path: Path) -> None:
    from wiremesh.clustermesh import (EnrollError, announce, attach_signing_key, cluster_signers, commit, enroll,
                                      next_key_path, promote_key_files)
    from wiremesh.keys import read_signing_key, write_signing_key

    store: Any = FakeStore()
    store.put(CKEY, ClusterConfig(name=C, id=1, pod_cidr="10.240.0.0/16").to_json())
    assert attach_signing_key(store, C, K1)
    a = accept_settings(ClusterConfig.from_json(store.get(CKEY).value), anchor(K1))
    ident1 = SigningKey.generate()
    done = enroll(store, C, "n1", K1, ident1.public_key(), NOW, identity_key=ident1)
    assert done.cluster_key == pub(K1)
    me = NodeIdentity(done.certificate, ident1)
    store.put(layout.node_key(C, "n1"), sign_record(rec("n1", done.certificate.pod_cidr, wg(1)), me).to_json())
    # (a revocation goes into the revocation chunks, not the config: tests/unit/test_revocation.py)
    a = accept_settings(ClusterConfig.from_json(store.get(CKEY).value), a)
    # Roll-over: announce (both keys sign), enroll again with the new key, commit.
    key_path = tmp_path / "lab.key"
    write_signing_key(key_path, K1)
    write_signing_key(next_key_path(key_path), K2)
    announce(store, C, K1, K2)
    announced = ClusterConfig.from_json(store.get(CKEY).value)
    assert announced.next_signing_key == pub(K2) and len(announced.settings_signatures) == 2
    assert [k.public_key() for k in cluster_signers(announced, key_path)] == [K1.public_key(), K2.public_key()]
    a = accept_settings(announced, a)
    with pytest.raises(EnrollError, match="1 live record"):
        commit(store, C, K1, K2, NOW)
    again = enroll(store, C, "n1", K2, ident1.public_key(), NOW + 10, identity_key=ident1)
    assert again.cluster_key == pub(K2) and again.lease == "held"
    store.put(layout.node_key(C, "n1"), sign_record(rec("n1", again.certificate.pod_cidr, wg(1)),
                                                    NodeIdentity(again.certificate, ident1)).to_json())
    done = commit(store, C, K1, K2, NOW + 10)
    cfg = done.config
    assert done.changed and not done.cut and cfg.signing_key == pub(K2) and not cfg.next_signing_key
    assert accept_settings(cfg, a).key == pub(K2)
    promote_key_files(key_path)
    assert read_signing_key(key_path).public_key() == K2.public_key()
    with pytest.raises(EnrollError, match="not cluster 'lab''s signing key"):
        cluster_signers(cfg, key_path.with_name("lab.old.key"))


def test_a_commit_signs_services_again_drops_finished_rotations_and_waits_for_active_ones() -> None:
    from wiremesh.clustermesh import (EnrollError, ServiceDef, ServicePort, announce, attach_signing_key, commit,
                                      update_config)
    from wiremesh.clustermesh.control import Trust, rotation_value, sign_request, sign_service, verify_service
    from wiremesh.clustermesh.rotation import Rotation

    store: Any = FakeStore()
    store.put(CKEY, ClusterConfig(name=C, id=1, pod_cidr="10.240.0.0/16").to_json())
    assert attach_signing_key(store, C, K1)
    update_config(store, C, lambda c: dataclasses.replace(c, require_signed=True), [K1])
    web = sign_service(ServiceDef("web", C, "10.96.0.20", (ServicePort(80),)), K1)
    store.put(layout.service_key(C, "web"), web.to_json())
    me = ident("n1", "10.240.1.0/24", now=NOW)
    done_rot = Rotation("n1", "a1b2c3d4", state="done", requested_at=int(NOW * 1000))
    store.put(layout.rotation_key(C, "n1"), rotation_value(sign_request(done_rot, C, K1), me))
    announce(store, C, K1, K2)
    announced = ClusterConfig.from_json(store.get(CKEY).value)
    # During the announcement either key vouches for a definition.
    for k in (K1, K2):
        verify_service(Trust(announced, (VerifyKey.from_base64(pub(K1)), VerifyKey.from_base64(pub(K2))), NOW),
                       sign_service(web, k).to_json(), sign_service(web, k))
    active = dataclasses.replace(done_rot, node="n2", state="staged")
    store.put(layout.rotation_key(C, "n2"), rotation_value(sign_request(active, C, K1), ident("n2", "10.240.2.0/24")))
    with pytest.raises(EnrollError, match="1 rotation"):
        commit(store, C, K1, K2, NOW)
    assert ClusterConfig.from_json(store.get(CKEY).value).signing_key == pub(K1)  # nothing changed
    store.delete(layout.rotation_key(C, "n2"))
    done = commit(store, C, K1, K2, NOW)
    assert done.changed and done.resigned == [layout.service_key(C, "web")]
    assert done.dropped == [layout.rotation_key(C, "n1")] and store.get(layout.rotation_key(C, "n1")) is None
    after = ClusterConfig.from_json(store.get(CKEY).value)
    s = parse_cluster(C, 1, store.list(layout.cluster_prefix(C))[1], now=NOW, anchor=Anchor(C, pub(K2), pub(K2)))
    assert after.signing_key == pub(K2) and list(s.services) == ["web"] and not s.rejected
