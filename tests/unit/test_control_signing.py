"""Signed control inputs (issue 17, item 3): service definitions and rotation requests signed by the
operator, rotation progress and readiness by their node, backends only where certified nodes are."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any

import pytest

from wiremesh.agent.readiness import ReadinessWatch
from wiremesh.agent.service_plan import BackendsView, certified_places, plan_services
from wiremesh.clustermesh import (
    Backend,
    ClusterBackends,
    ClusterConfig,
    InvalidRecord,
    KVItem,
    NodeRecord,
    Rotation,
    RotationReady,
    ServiceDef,
    ServicePort,
    certified,
    layout,
    overlay_address,
    ready_value,
    rotation_value,
    sign_request,
    sign_service,
    verify_ready,
)
from wiremesh.clustermesh.signed import lease_value, sign_record
from wiremesh.clustermesh.snapshot import ParseCache, parse_cluster
from wiremesh.keys import NodeIdentity, PrivateKey, SigningKey, issue

C = "lab"
NOW = float(int(time.time()))  # the CLI checks certificates against the clock
CA = SigningKey.generate()
N1, N2 = "10.240.1.0/24", "10.240.2.0/24"


def ident(node: str, cidr: str, ca: SigningKey = CA) -> NodeIdentity:
    key = SigningKey.generate()
    return NodeIdentity(issue(ca, C, node, key.public_key(), cidr, 86400, NOW), key)


ID1, ID2 = ident("n1", N1), ident("n2", N2)


def config(signed: bool = True) -> ClusterConfig:
    return ClusterConfig(name=C, id=1, pod_cidr="10.240.0.0/16", require_signed=signed,
                         signing_key=CA.public_key().base64)


def kv(key: str, value: str, index: int = 1) -> tuple[str, KVItem]:
    return key, KVItem(key, value.encode(), index, index)


def node_items(name: str, cidr: str, identity: NodeIdentity | None) -> list[tuple[str, KVItem]]:
    r = NodeRecord(name, C, f"192.0.2.{cidr.split('.')[2]}:51820", PrivateKey.generate().public_key().base64, cidr,
                   overlay_address(cidr))
    return [kv(layout.node_key(C, name), (sign_record(r, identity) if identity else r).to_json()),
            kv(layout.ipam_key(C, cidr), lease_value(cidr, identity) if identity else name)]


NODES = [*node_items("n1", N1, ID1), *node_items("n2", N2, ID2)]


def snap(cfg: ClusterConfig, *extra: tuple[str, KVItem], cache: ParseCache | None = None):  # type: ignore[no-untyped-def]
    items = dict([kv(layout.config_key(C), cfg.to_json()), *NODES, *extra])
    return parse_cluster(C, 1, items, now=NOW, cache=cache)


def svc(name: str = "web", vip: str = "10.96.0.20", port: int = 80) -> ServiceDef:
    return ServiceDef(name, C, vip, (ServicePort(port),))


def service_item(s: ServiceDef, index: int = 1) -> tuple[str, KVItem]:
    return kv(layout.service_key(C, s.name), s.to_json(), index)


def reasons(sn: Any) -> dict[str, str]:
    return {r.key: r.reason for r in sn.rejected}


# --- service definitions -------------------------------------------------------------------------
def test_signed_definition_is_accepted_unsigned_or_forged_refused() -> None:
    good = sign_service(svc(), CA)
    assert snap(config(), service_item(good)).services == {"web": good}
    for bad, why in ((svc(), "signature: missing"), (sign_service(svc(), SigningKey.generate()), "forged"),
                     (dataclasses.replace(good, vip="10.96.0.21"), "forged")):
        sn = snap(config(), service_item(bad))
        assert sn.services == {}
        assert why in reasons(sn)[layout.service_key(C, "web")]


def test_unsigned_cluster_takes_definitions_as_before() -> None:
    assert snap(config(signed=False), service_item(svc())).services == {"web": svc()}
    assert snap(config(signed=False), service_item(sign_service(svc(), SigningKey.generate()))).services["web"] == svc()


def test_a_refused_definition_leaves_the_last_good_one() -> None:
    cache = ParseCache()
    good = sign_service(svc(), CA)
    assert snap(config(), service_item(good, 1), cache=cache).services == {"web": good}
    forged = svc(vip="10.96.0.99", port=81)  # unsigned: someone with KV write access
    sn = snap(config(), service_item(forged, 2), cache=cache)
    assert sn.services["web"].vip == good.vip and sn.services["web"].ports == good.ports
    assert "its last good definition stays" in reasons(sn)[layout.service_key(C, "web")]
    newer = sign_service(svc(port=8080), CA)  # the operator's change is taken
    assert snap(config(), service_item(newer, 3), cache=cache).services == {"web": newer}
    assert snap(config(), cache=cache).services == {}  # deleted: gone


def test_last_good_of_an_unsigned_cluster_is_forgotten_when_signing_turns_on() -> None:
    cache = ParseCache()
    assert snap(config(signed=False), service_item(svc()), cache=cache).services
    assert snap(config(), service_item(svc()), cache=cache).services == {}


# --- rotation requests and progress ---------------------------------------------------------------
def rot_item(value: str, node: str = "n1", index: int = 1) -> tuple[str, KVItem]:
    return kv(layout.rotation_key(C, node), value, index)


def test_rotation_request_must_be_the_operators() -> None:
    req = Rotation.new("n1", 1_000)
    ok = snap(config(), rot_item(sign_request(req, C, CA).to_json()))
    assert ok.rotations.rotations["n1"].id == req.id and not ok.rejected
    for value, why in ((req.to_json(), "request_signature: missing"),
                       (sign_request(req, C, SigningKey.generate()).to_json(), "forged"),
                       (sign_request(req, "other", CA).to_json(), "forged"),  # another cluster's request
                       (sign_request(req, C, ID2.key).to_json(), "forged")):  # another node's key
        sn = snap(config(), rot_item(value))
        assert "n1" not in sn.rotations.rotations
        assert why in reasons(sn)[layout.rotation_key(C, "n1")], value
    assert snap(config(signed=False), rot_item(req.to_json())).rotations.rotations["n1"] == req


def test_progress_is_signed_by_the_rotating_node() -> None:
    req = sign_request(Rotation.new("n1", 1_000), C, CA)
    staged = dataclasses.replace(req, state="staged", epoch_to=1, updated_at=2_000)
    sn = snap(config(), rot_item(rotation_value(staged, ID1)))
    assert sn.rotations.rotations["n1"].state == "staged" and not sn.rejected
    for value, why in ((staged.to_json(), "node_signature: missing"),
                       (rotation_value(staged, ID2), "is node 'n2'"),
                       (rotation_value(staged, ident("n1", N1, SigningKey.generate())), "certificate")):
        sn = snap(config(), rot_item(value))
        assert "n1" not in sn.rotations.rotations and why in reasons(sn)[layout.rotation_key(C, "n1")]
    tampered = json.loads(rotation_value(staged, ID1))
    tampered["state"] = "abandoned"
    assert "forged" in reasons(snap(config(), rot_item(json.dumps(tampered))))[layout.rotation_key(C, "n1")]


def test_a_node_may_ask_for_its_own_rotation() -> None:
    own = sign_request(Rotation.new("n1", 1_000), C, ID1.key)  # the cluster's rotate_every, by the node
    assert snap(config(), rot_item(rotation_value(own, ID1))).rotations.rotations["n1"].id == own.id
    theirs = sign_request(Rotation.new("n1", 1_000), C, ID2.key)  # n2 asking for n1's
    assert "forged" in reasons(snap(config(), rot_item(rotation_value(theirs, ID1))))[layout.rotation_key(C, "n1")]


def test_refused_rotation_keeps_the_last_good_one_and_replays_are_refused() -> None:
    cache = ParseCache()
    old = sign_request(Rotation.new("n1", 1_000), C, CA)
    new = sign_request(Rotation.new("n1", 5_000), C, CA)
    staged = dataclasses.replace(new, state="staged", updated_at=6_000)
    assert snap(config(), rot_item(rotation_value(staged, ID1), index=2), cache=cache).rotations.rotations["n1"] == staged
    forged = dataclasses.replace(staged, state="abandoned")  # unsigned overwrite
    sn = snap(config(), rot_item(forged.to_json(), index=3), cache=cache)
    assert sn.rotations.rotations["n1"].state == "staged"
    assert "its last good record stays" in reasons(sn)[layout.rotation_key(C, "n1")]
    sn = snap(config(), rot_item(old.to_json(), index=4), cache=cache)  # an older signed request written back
    assert sn.rotations.rotations["n1"].id == new.id and "replayed" in reasons(sn)[layout.rotation_key(C, "n1")]


# --- readiness -------------------------------------------------------------------------------------
NXT = PrivateKey.generate().public_key().base64


def signed_record(name: str, cidr: str, identity: NodeIdentity) -> NodeRecord:
    return sign_record(NodeRecord(name, C, "192.0.2.9:51820", PrivateKey.generate().public_key().base64, cidr,
                                  overlay_address(cidr)), identity)


def test_readiness_is_the_peers_own_word_for_this_rotation() -> None:
    rec2 = signed_record("n2", N2, ID2)
    word = RotationReady.from_json(ready_value(RotationReady(NXT), f"{C}/n2", f"{C}/n1", ID2))
    verify_ready(word, f"{C}/n2", f"{C}/n1", rec2)
    with pytest.raises(InvalidRecord, match="missing"):
        verify_ready(RotationReady(NXT), f"{C}/n2", f"{C}/n1", rec2)
    with pytest.raises(InvalidRecord, match="forged"):  # moved to another node's rotation
        verify_ready(word, f"{C}/n2", f"{C}/n3", rec2)
    with pytest.raises(InvalidRecord, match="forged"):  # written by n1 in n2's name
        verify_ready(RotationReady.from_json(ready_value(RotationReady(NXT), f"{C}/n2", f"{C}/n1", ID1)),
                     f"{C}/n2", f"{C}/n1", rec2)
    with pytest.raises(InvalidRecord, match="no certified record"):
        verify_ready(word, f"{C}/n2", f"{C}/n1", None)


class _Store:
    def __init__(self, items: dict[str, bytes]) -> None:
        self.items = items

    def watch(self, prefix: str, stop: Any, wait_s: int = 30, dc: str | None = None) -> Any:
        yield 1, {k: KVItem(k, v, 1) for k, v in self.items.items() if k.startswith(prefix)}
        while not stop.is_set():
            stop.wait(0.05)


def test_readiness_watch_refuses_unsigned_words_once_and_keeps_the_last_good(caplog: pytest.LogCaptureFixture) -> None:
    key = layout.rotation_ready_key(C, "n2", C, "n1")
    rec2 = signed_record("n2", N2, ID2)
    good = ready_value(RotationReady(NXT), f"{C}/n2", f"{C}/n1", ID2)
    stop, woke = threading.Event(), threading.Event()
    rw = ReadinessWatch(_Store({key: good.encode()}), f"{C}/n1", stop, woke.set,  # type: ignore[arg-type]
                        lambda name, fn: threading.Thread(target=fn, daemon=True).start())
    try:
        rw.follow({C: None})
        assert woke.wait(5)
        assert rw.view({f"{C}/n2": rec2}, {C}) == {f"{C}/n2": RotationReady(NXT)}
        other = PrivateKey.generate().public_key().base64
        with rw._lock:  # a forged word replaces the good one in Consul
            next(iter(rw._watches.values())).ready = {f"{C}/n2": RotationReady(other)}
        with caplog.at_level(logging.WARNING, "wiremesh.rotation"):
            for _ in range(3):
                assert rw.view({f"{C}/n2": rec2}, {C}) == {f"{C}/n2": RotationReady(NXT)}
        lines = [r.getMessage() for r in caplog.records if "invalid readiness word" in r.getMessage()]
        assert len(lines) == 1 and key in lines[0] and "last good word stays" in lines[0]
        assert rw.view({f"{C}/n2": rec2}, set()) == {f"{C}/n2": RotationReady(other)}  # unsigned cluster: as before
    finally:
        stop.set()
        rw.close()


# --- backends ------------------------------------------------------------------------------------
def test_certified_places_are_pod_cidrs_and_node_addresses() -> None:
    sn = snap(config())
    place = certified(sn.nodes)
    assert place.admits("10.240.1.7") and place.admits("10.240.2.200") and place.admits("192.0.2.1")
    assert not place.admits("10.240.3.7") and not place.admits("10.99.0.5") and not place.admits("nonsense")
    unsigned = [r for r in sn.nodes.values()]
    assert not certified({r.name: dataclasses.replace(r, certificate=None) for r in unsigned}).admits("10.240.1.7")


def test_a_backend_outside_every_certified_cidr_is_never_used() -> None:
    nodes = snap(config()).nodes
    good, stray = Backend(C, "10.240.1.7", 80, "n1", "web-a"), Backend(C, "10.99.0.5", 80, "x", "web-stray")
    remote = Backend("west", "10.241.0.9", 80, "w1", "web-w")
    view = BackendsView({"web": {C: ClusterBackends((good, stray)), "west": ClusterBackends((remote,))}}, {"web": True})
    places = certified_places({C}, {C: nodes})
    st = plan_services(C, {"web": svc()}, view, {C: 1, "west": 2}, places)
    (fe,) = st.frontends
    assert [str(b.address) for b in st.frontends[fe]] == ["10.240.1.7", "10.241.0.9"]  # west is unsigned: as before
    assert any("10.99.0.5" in s and "certified" in s for s in st.skipped)
    assert len(plan_services(C, {"web": svc()}, view, {C: 1, "west": 2}).frontends[fe]) == 3  # no places: all
    # Affinity local: a local cluster whose only backends are refused falls back to the remote ones.
    only_stray = BackendsView({"web": {C: ClusterBackends((stray,)), "west": ClusterBackends((remote,))}}, {"web": True})
    local = dataclasses.replace(svc(), affinity="local")
    st = plan_services(C, {"web": local}, only_stray, {C: 1, "west": 2}, places)
    assert [str(b.address) for b in st.frontends[fe]] == ["10.241.0.9"]


# --- what the agent writes -------------------------------------------------------------------------
class _KV:
    def __init__(self) -> None:
        self.kv: dict[str, str] = {}

    def put(self, key: str, value: str | bytes, **_: Any) -> bool:
        self.kv[key] = value if isinstance(value, str) else value.decode()
        return True

    def delete(self, key: str, **_: Any) -> bool:
        self.kv.pop(key, None)
        return True

    def get(self, key: str, **_: Any) -> KVItem | None:
        return KVItem(key, self.kv[key].encode(), 1) if key in self.kv else None


def test_the_rotator_signs_its_progress_its_own_requests_and_its_readiness(tmp_path: Any) -> None:
    from wiremesh.agent.rotation import Rotator
    from wiremesh.keys import write_key_file

    write_key_file(tmp_path / "private.key", PrivateKey.generate())
    store, now = _KV(), int(NOW * 1000)
    rot = Rotator(store, C, "n1", tmp_path / "private.key", clock=lambda: now, identity=ID1)  # type: ignore[arg-type]
    rkey = layout.rotation_key(C, "n1")

    def accepted() -> Rotation:
        sn = snap(config(), kv(rkey, store.kv[rkey]))
        assert not sn.rejected, sn.rejected
        return sn.rotations.rotations["n1"]

    rot.schedule(3600, ["n1"], {}, key_age_from=now - 3600_000 * 2)  # its own request, on the schedule
    assert accepted().state == "requested"
    request = sign_request(Rotation.new("n1", now), C, CA)  # the operator's request, then the node's progress
    rot.drive(request, {f"{C}/n2"}, {}, dict, lambda _k: True, lambda _at: True, lambda: None, {})
    assert accepted().state == "staged" and accepted().id == request.id
    staged2 = dataclasses.replace(signed_record("n2", N2, ID2), next_public_key=NXT)
    rot.peer.take_part({f"{C}/n2": staged2})
    word = RotationReady.from_json(store.kv[layout.rotation_ready_key(C, "n1", C, "n2")])
    verify_ready(word, f"{C}/n1", f"{C}/n2", signed_record("n1", N1, ID1))


# --- the CLI signs what it writes -------------------------------------------------------------------
@pytest.fixture
def cli_kv(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    """A signed cluster (nodes n1, n2) in a fake Consul; the operator's key in tmp_path/ca.key."""
    from wiremesh.keys import write_signing_key

    from .test_keys_rotate import FakeKV

    fake = FakeKV()
    for key, item in [kv(layout.config_key(C), config().to_json()), *NODES]:
        fake.put(key, item.value)
    write_signing_key(tmp_path / "ca.key", CA)
    monkeypatch.setenv("WIREMESH_SIGNING_KEY_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("WIREMESH_SIGNING_KEY", raising=False)
    monkeypatch.setattr("wiremesh.cli.target.ConsulStore", lambda options: fake)
    return fake


def cli(*args: str) -> Any:
    from click.testing import CliRunner

    from wiremesh.cli.main import cli as root

    return CliRunner().invoke(root, list(args), prog_name="wiremesh")


def accepted_snapshot(fake: Any) -> Any:
    items = {k: v for k, v in fake.kv.items()}
    return parse_cluster(C, 1, items, now=NOW)


def test_keys_rotate_signs_its_request_and_refuses_to_write_one_unsigned(cli_kv: Any, tmp_path: Any) -> None:
    res = cli("keys", "rotate", "n1", "--cluster", C)
    assert res.exit_code == 1 and "requires rotation requests signed" in res.stderr and "hint:" in res.stderr
    assert layout.rotation_key(C, "n1") not in cli_kv.kv
    other = tmp_path / "other.key"
    from wiremesh.keys import write_signing_key
    write_signing_key(other, SigningKey.generate())
    res = cli("keys", "rotate", "n1", "--cluster", C, "--signing-key", str(other))
    assert res.exit_code == 1 and "is not the signing key of cluster 'lab'" in res.stderr, res.stderr
    res = cli("keys", "rotate", "n1", "--cluster", C, "--signing-key", str(tmp_path / "ca.key"))
    assert res.exit_code == 0, res.stderr
    sn = accepted_snapshot(cli_kv)
    assert sn.rotations.rotations["n1"].state == "requested" and not sn.rejected


def test_service_create_signs_and_service_sign_signs_what_is_there(cli_kv: Any, tmp_path: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    res = cli("service", "create", "web", "--port", "80", "--cluster", C)
    assert res.exit_code == 1 and "requires service definitions signed" in res.stderr
    monkeypatch.setenv("WIREMESH_SIGNING_KEY", str(tmp_path / "ca.key"))
    res = cli("-o", "json", "service", "create", "web", "--port", "80", "--cluster", C)
    assert res.exit_code == 0 and json.loads(res.stdout)["result"] == "created", res.stderr
    assert set(accepted_snapshot(cli_kv).services) == {"web"}
    res = cli("-o", "json", "service", "create", "web", "--port", "80", "--cluster", C)
    assert json.loads(res.stdout)["result"] == "unchanged"
    unsigned = svc("api", "10.96.0.30")  # written before signing was required
    cli_kv.put(layout.service_key(C, "api"), unsigned.to_json())
    assert set(accepted_snapshot(cli_kv).services) == {"web"}
    res = cli("-o", "json", "service", "sign", "--all", "--cluster", C)
    assert res.exit_code == 0, res.stderr
    assert {s["service"]: s["result"] for s in json.loads(res.stdout)["services"]} == {"api": "signed",
                                                                                      "web": "unchanged"}
    assert set(accepted_snapshot(cli_kv).services) == {"web", "api"}


def test_require_signed_lists_unsigned_definitions_and_rotations_under_way(cli_kv: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("wiremesh.cli.signing_cmd.ConsulStore", lambda options: cli_kv)
    cli_kv.put(layout.config_key(C), config(signed=False).to_json())
    cli_kv.put(layout.service_key(C, "api"), svc("api", "10.96.0.30").to_json())
    cli_kv.put(layout.rotation_key(C, "n2"), dataclasses.replace(Rotation.new("n2", 1_000), state="done").to_json())
    res = cli("cluster", "require-signed", C)
    assert res.exit_code == 1 and "service sign --all" in res.stderr, res.stderr
    assert layout.service_key(C, "api") in res.stderr and layout.rotation_key(C, "n2") not in res.stderr  # history
    cli_kv.put(layout.rotation_key(C, "n1"), Rotation.new("n1", 1_000).to_json())  # under way, unsigned
    assert layout.rotation_key(C, "n1") in cli("cluster", "require-signed", C).stderr
    assert not ClusterConfig.from_json(cli_kv.get(layout.config_key(C)).value).require_signed
