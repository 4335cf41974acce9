"""agent.reconciler: smallest-diff programming, per-peer status and backoff, no prune before first sync."""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import pytest

import wiremesh.agent.reconciler
from wiremesh.agent.planner import DesiredState, plan
from wiremesh.agent.reconciler import BACKOFF_MIN, Reconciler
from wiremesh.clustermesh import ClusterConfig, NodeRecord, overlay_address
from wiremesh.keys import PrivateKey
from wiremesh.tunnels import (
    DeviceNotFound,
    DeviceState,
    PeerChange,
    PeerConfig,
    PeerStatus,
    Route,
    TunnelError,
    VxlanSpec,
    WireGuardDevice,
    vtep_mac,
)


def _key(seed: int) -> str:
    return PrivateKey(bytes([seed]) * 32).public_key().base64


K1, K2, K3, STRAY = _key(1), _key(2), _key(3), _key(9)
NAMES = {K1: "n1", K2: "n2", K3: "n3"}


class FakeDevice(WireGuardDevice):
    """A WireGuard device kept in a dict; peers in `fail` are refused like a kernel error would be."""

    backend = "fake"

    def __init__(self, name: str = "wm0", peers: Iterable[PeerStatus] = ()) -> None:
        super().__init__(name)
        self.peers: dict[str, PeerStatus] = {p.public_key: p for p in peers}
        self.fail: set[str] = set()
        self.calls: list[list[PeerChange]] = []

    def exists(self) -> bool:
        return True

    def create(self) -> None:
        pass

    def show(self) -> DeviceState:
        return DeviceState(name=self.name, public_key=None, listen_port=51820, peers=dict(self.peers))

    def _set(self, private_key: PrivateKey | None, listen_port: int | None, changes: list[PeerChange]) -> None:
        self.calls.append(list(changes))
        bad = [c for c in changes if c.public_key in self.fail]
        if bad:
            raise TunnelError(f"{self.name}: configure device: errno {errno.EINVAL}", errno.EINVAL)
        for c in changes:
            if c.remove:
                self.peers.pop(c.public_key, None)
                continue
            cur = self.peers.get(c.public_key)
            if cur is None:
                if c.update_only:
                    continue
                cur = PeerStatus(public_key=c.public_key)
            self.peers[c.public_key] = replace(
                cur,
                endpoint=c.endpoint if c.endpoint is not None else cur.endpoint,
                allowed_ips=c.allowed_ips if c.allowed_ips is not None else cur.allowed_ips,
                persistent_keepalive=(c.persistent_keepalive if c.persistent_keepalive is not None
                                      else cur.persistent_keepalive),
            )

    def touched(self, key: str) -> int:
        return sum(1 for call in self.calls for c in call if c.public_key == key)


class Dataplane:
    """Stands in for every kernel-touching function the reconciler imports, recording calls in order.

    `calls` holds one tuple per call: (function name, arguments...). Set `errors[name]` to make
    that function raise; `links` are the interfaces `link_exists` reports.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.errors: dict[str, TunnelError] = {}
        self.links: set[str] = {"wm0"}
        self.vxlan_present = True  # what delete_vxlan reports
        self.mtus: dict[str, int] = {}  # what link_mtu reports (a read: not recorded in `calls`)

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        err = self.errors.get(call[0])
        if err is not None:
            raise err

    def sync_routes(self, desired: Iterable[Route], *, devices: Iterable[str], prune: bool,
                    keep: Any = None) -> tuple[int, int]:
        routes = frozenset(desired)
        self._call("sync_routes", routes, tuple(devices), prune)
        return len(routes), 0

    def ensure_vxlan(self, spec: VxlanSpec) -> bool:
        self._call("ensure_vxlan", spec)
        return True

    def sync_fdb(self, name: str, desired: Mapping[str, str], *, prune: bool) -> tuple[int, int]:
        self._call("sync_fdb", name, dict(desired), prune)
        return len(desired), 0

    def sync_neighbours(self, name: str, desired: Mapping[str, str], *, prune: bool) -> tuple[int, int]:
        self._call("sync_neighbours", name, dict(desired), prune)
        return len(desired), 0

    def delete_vxlan(self, name: str) -> bool:
        self._call("delete_vxlan", name)
        return self.vxlan_present

    def set_mtu(self, ifname: str, mtu: int) -> bool:
        self._call("set_mtu", ifname, mtu)
        self.mtus[ifname] = mtu
        return True

    def link_mtu(self, ifname: str) -> int:
        return self.mtus.get(ifname, 1280)

    def link_exists(self, ifname: str) -> bool:
        self._call("link_exists", ifname)
        return ifname in self.links

    def pod_mtu(self, mtu: int) -> None:
        """The reconciler's on_pod_mtu callback."""
        self._call("pod_mtu", mtu)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def route_calls(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == "sync_routes"]


KERNEL_FUNCTIONS = ("sync_routes", "ensure_vxlan", "sync_fdb", "sync_neighbours", "delete_vxlan", "set_mtu",
                    "link_exists", "link_mtu")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dp(monkeypatch: pytest.MonkeyPatch) -> Dataplane:
    d = Dataplane()
    for name in KERNEL_FUNCTIONS:
        monkeypatch.setattr(wiremesh.agent.reconciler, name, getattr(d, name))
    return d


@pytest.fixture
def clock() -> Clock:
    return Clock()


def peer(key: str, n: int, endpoint: str | None = None) -> PeerConfig:
    return PeerConfig(public_key=key, endpoint=endpoint or f"192.0.2.{n}:51820",
                      allowed_ips=frozenset({f"10.240.{n}.0/24"}))


def desired(*peers: PeerConfig) -> DesiredState:
    return DesiredState(
        peers={p.public_key: p for p in peers},
        routes=frozenset(Route(cidr, "wm0") for p in peers for cidr in p.allowed_ips),
        peer_names={p.public_key: NAMES.get(p.public_key, "?") for p in peers},
    )


def test_adds_peers_and_routes(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = Reconciler(dev, clock=clock)
    want = desired(peer(K1, 1), peer(K2, 2))

    res = rec.reconcile(want, prune=False)

    assert (res.added, res.updated, res.removed, res.errors) == (2, 0, 0, 0)
    assert res.programmed == 2
    assert dev.peers[K1].endpoint == "192.0.2.1:51820"
    assert dev.peers[K2].allowed_ips == frozenset({"10.240.2.0/24"})
    assert len(dev.calls) == 1  # one update for all
    assert {k: st.state for k, st in rec.status.items()} == {K1: "done", K2: "done"}
    routes = frozenset({Route("10.240.1.0/24", "wm0"), Route("10.240.2.0/24", "wm0")})
    assert dp.route_calls() == [("sync_routes", routes, ("wm0", "wm-vxlan"), False)]
    assert res.routes_added == 2


def test_second_pass_sends_nothing(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = Reconciler(dev, clock=clock)
    want = desired(peer(K1, 1), peer(K2, 2))
    rec.reconcile(want, prune=True)
    dev.calls.clear()
    dp.calls.clear()

    res = rec.reconcile(want, prune=True)

    assert dev.calls == []
    assert dp.calls == []  # the overlay did not change: not even read
    assert (res.added, res.updated, res.removed, res.errors, res.programmed) == (0, 0, 0, 0, 2)


def test_peer_already_on_device_is_done_without_a_write(dp: Dataplane, clock: Clock) -> None:
    p = peer(K1, 1)
    dev = FakeDevice(peers=[PeerStatus(public_key=K1, endpoint=p.endpoint, allowed_ips=p.allowed_ips)])
    rec = Reconciler(dev, clock=clock)
    res = rec.reconcile(desired(p), prune=False)
    assert dev.calls == []
    assert rec.status[K1].state == "done" and res.programmed == 1


def test_no_prune_before_first_sync_then_prunes(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice(peers=[PeerStatus(public_key=STRAY, endpoint="192.0.2.99:51820",
                                       allowed_ips=frozenset({"10.240.99.0/24"}))])
    rec = Reconciler(dev, clock=clock)
    want = desired(peer(K1, 1))

    res = rec.reconcile(want, prune=False)
    assert STRAY in dev.peers and res.removed == 0
    assert dp.route_calls()[-1][3] is False

    res = rec.reconcile(want, prune=True)
    assert STRAY not in dev.peers and res.removed == 1
    assert set(dev.peers) == {K1}
    routes = frozenset({Route("10.240.1.0/24", "wm0")})
    assert dp.route_calls()[-1] == ("sync_routes", routes, ("wm0", "wm-vxlan"), True)


def test_endpoint_change_is_an_update(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = Reconciler(dev, clock=clock)
    rec.reconcile(desired(peer(K1, 1)), prune=True)
    dev.calls.clear()

    res = rec.reconcile(desired(peer(K1, 1, endpoint="198.51.100.1:51820")), prune=True)

    assert res.updated == 1 and res.added == 0
    assert dev.calls == [[PeerChange(public_key=K1, endpoint="198.51.100.1:51820", update_only=True)]]
    assert dev.peers[K1].endpoint == "198.51.100.1:51820"


def test_failing_peer_gets_error_and_backoff_while_others_land(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    dev.fail = {K2}
    rec = Reconciler(dev, clock=clock)

    res = rec.reconcile(desired(peer(K1, 1), peer(K2, 2), peer(K3, 3)), prune=False)

    assert set(dev.peers) == {K1, K3}
    assert res.added == 2 and res.errors == 1 and res.programmed == 2
    assert len(res.failed) == 1 and res.failed[0].startswith("n2: ")
    st = rec.status[K2]
    assert st.state == "error"
    assert "errno" in st.message
    assert st.attempts == 1
    assert st.retry_at == clock.now + BACKOFF_MIN
    assert rec.next_retry() == st.retry_at
    assert rec.status[K1].state == rec.status[K3].state == "done"
    assert dp.route_calls()  # routes still synced


def test_backoff_holds_then_retries_with_doubling_delay(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    dev.fail = {K2}
    rec = Reconciler(dev, clock=clock)
    want = desired(peer(K1, 1), peer(K2, 2))
    rec.reconcile(want, prune=False)
    tries = dev.touched(K2)

    # Before retry_at: the failing peer is left alone.
    res = rec.reconcile(want, prune=False)
    assert dev.touched(K2) == tries
    assert rec.status[K2].state == "error" and res.errors == 0

    # After retry_at: tried again, still failing -> attempts 2, delay doubled.
    clock.now += BACKOFF_MIN + 0.01
    res = rec.reconcile(want, prune=False)
    assert dev.touched(K2) > tries
    assert res.errors == 1
    assert rec.status[K2].attempts == 2
    assert rec.status[K2].retry_at == pytest.approx(clock.now + 2 * BACKOFF_MIN)

    # The device accepts it now: done, backoff cleared.
    dev.fail.clear()
    clock.now += 10
    res = rec.reconcile(want, prune=False)
    assert K2 in dev.peers
    st = rec.status[K2]
    assert (st.state, st.message, st.attempts, st.retry_at) == ("done", "", 0, 0.0)
    assert res.programmed == 2 and rec.next_retry() is None


def test_changed_peer_clears_its_backoff(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    dev.fail = {K2}
    rec = Reconciler(dev, clock=clock)
    rec.reconcile(desired(peer(K1, 1), peer(K2, 2)), prune=False)
    tries = dev.touched(K2)
    dev.fail.clear()

    # Same instant, but the desired peer changed: no waiting for the old backoff.
    res = rec.reconcile(desired(peer(K1, 1), peer(K2, 2, endpoint="198.51.100.2:51820")), prune=False)

    assert dev.touched(K2) > tries
    assert rec.status[K2].state == "done" and res.added == 1
    assert dev.peers[K2].endpoint == "198.51.100.2:51820"


def test_status_of_undesired_peer_dropped(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = Reconciler(dev, clock=clock)
    rec.reconcile(desired(peer(K1, 1), peer(K2, 2)), prune=True)
    res = rec.reconcile(desired(peer(K1, 1)), prune=True)
    assert set(rec.status) == {K1}
    assert res.removed == 1 and res.programmed == 1
    assert set(dev.peers) == {K1}


def test_route_failure_is_counted_and_peers_still_programmed(dp: Dataplane, clock: Clock) -> None:
    dp.errors["sync_routes"] = TunnelError("wm0: add route 10.240.1.0/24: File exists", errno.EEXIST)
    dev = FakeDevice()
    rec = Reconciler(dev, clock=clock)
    res = rec.reconcile(desired(peer(K1, 1)), prune=False)
    assert res.errors == 1 and res.programmed == 1
    assert res.failed == ["overlay: wm0: add route 10.240.1.0/24: File exists"]
    assert K1 in dev.peers


def test_fake_device_is_a_real_wireguard_device() -> None:
    # The reconciler relies only on the public WireGuardDevice API (show/apply).
    dev: Any = FakeDevice()
    dev.apply([])
    assert dev.calls == []


# --- the overlay: routes, VXLAN, FDB, neighbours, MTUs ------------------------------------------


@pytest.fixture
def records(make_node: Any) -> dict[str, NodeRecord]:
    out = {}
    for n in (1, 2, 3):
        cidr = f"10.240.{n}.0/24"
        out[f"n{n}"] = make_node(f"n{n}", cidr, vtep_mac=vtep_mac(overlay_address(cidr)))
    return out


def planned(records: dict[str, NodeRecord], routing: str = "wireguard", underlay_mtu: int | None = 1500,
            mtu: int = 0) -> DesiredState:
    cfg = ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16", routing=routing, mtu=mtu)
    return plan("n1", records["n1"].public_key, cfg, records, local_pod_cidr="10.240.1.0/24",
                underlay_mtu=underlay_mtu)


def overlay_only(d: DesiredState, **kw: Any) -> DesiredState:
    """`d` without peers (the peer half of a pass is not what these tests look at), fields replaced."""
    return replace(d, peers={}, peer_names={}, **kw)


def test_every_kernel_function_of_the_reconciler_is_patched(dp: Dataplane) -> None:
    for name in KERNEL_FUNCTIONS:
        assert getattr(wiremesh.agent.reconciler, name) == getattr(dp, name)


def test_vxlan_device_and_entries_before_routes(dp: Dataplane, clock: Clock,
                                               records: dict[str, NodeRecord]) -> None:
    want = overlay_only(planned(records, "vxlan"))
    rec = Reconciler(FakeDevice(), clock=clock, on_pod_mtu=dp.pod_mtu)

    res = rec.reconcile(want, prune=True)

    assert res.errors == 0
    assert dp.calls == [
        ("link_exists", "wm0"),
        ("set_mtu", "wm0", 1420),
        ("ensure_vxlan", want.vxlan),
        ("sync_fdb", "wm-vxlan", dict(want.fdb), True),
        ("sync_neighbours", "wm-vxlan", dict(want.neighbours), True),
        ("pod_mtu", 1370),
        ("sync_routes", want.routes, ("wm0", "wm-vxlan"), True),
    ]
    assert res.routes_added == len(want.routes)


def test_vxlan_entries_are_not_pruned_before_first_sync(dp: Dataplane, clock: Clock,
                                                        records: dict[str, NodeRecord]) -> None:
    rec = Reconciler(FakeDevice(), clock=clock)
    rec.reconcile(overlay_only(planned(records, "vxlan")), prune=False)
    assert [c[-1] for c in dp.calls if c[0] in ("sync_fdb", "sync_neighbours", "sync_routes")] == [False] * 3


def test_wireguard_mode_deletes_vxlan_device_after_routes(dp: Dataplane, clock: Clock,
                                                          records: dict[str, NodeRecord]) -> None:
    want = overlay_only(planned(records))
    rec = Reconciler(FakeDevice(), clock=clock, on_pod_mtu=dp.pod_mtu)

    rec.reconcile(want, prune=True)

    assert dp.calls == [
        ("link_exists", "wm0"),
        ("set_mtu", "wm0", 1420),
        ("pod_mtu", 1420),  # the first pod MTU ever: before the routes
        ("sync_routes", want.routes, ("wm0", "wm-vxlan"), True),
        ("delete_vxlan", "wm-vxlan"),
    ]


def test_vxlan_device_is_kept_before_first_sync(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord]) -> None:
    # Deleting it is a prune: an agent restart must not tear down the overlay before it knows the mode.
    rec = Reconciler(FakeDevice(), clock=clock)
    rec.reconcile(overlay_only(planned(records)), prune=False)
    assert "delete_vxlan" not in dp.names()
    assert "ensure_vxlan" not in dp.names()


def test_switch_to_vxlan_lowers_pod_mtu_before_routes(dp: Dataplane, clock: Clock,
                                                     records: dict[str, NodeRecord]) -> None:
    rec = Reconciler(FakeDevice(), clock=clock, on_pod_mtu=dp.pod_mtu)
    rec.reconcile(overlay_only(planned(records)), prune=True)
    dp.calls.clear()

    want = overlay_only(planned(records, "vxlan"))
    rec.reconcile(want, prune=True)

    names = dp.names()
    assert names.index("ensure_vxlan") < names.index("sync_fdb") < names.index("sync_routes")
    assert names.index("sync_neighbours") < names.index("sync_routes")
    assert names.index("pod_mtu") < names.index("sync_routes")
    assert ("pod_mtu", 1370) in dp.calls
    assert "delete_vxlan" not in names


def test_switch_to_wireguard_raises_pod_mtu_and_deletes_vxlan_after_routes(
        dp: Dataplane, clock: Clock, records: dict[str, NodeRecord]) -> None:
    rec = Reconciler(FakeDevice(), clock=clock, on_pod_mtu=dp.pod_mtu)
    rec.reconcile(overlay_only(planned(records, "vxlan")), prune=True)
    dp.calls.clear()

    want = overlay_only(planned(records))
    rec.reconcile(want, prune=True)

    assert dp.calls == [
        ("link_exists", "wm0"),  # the WireGuard MTU is already 1420: not written again
        ("sync_routes", want.routes, ("wm0", "wm-vxlan"), True),
        ("delete_vxlan", "wm-vxlan"),
        ("pod_mtu", 1420),  # raised only once traffic has left VXLAN
    ]


def test_unchanged_pod_mtu_is_still_applied_after_routes(dp: Dataplane, clock: Clock,
                                                         records: dict[str, NodeRecord]) -> None:
    # Same pod MTU, other routes: it is handed on (new pods may have appeared), after the routes.
    rec = Reconciler(FakeDevice(), clock=clock, on_pod_mtu=dp.pod_mtu)
    want = overlay_only(planned(records))
    rec.reconcile(want, prune=True)
    dp.calls.clear()

    rec.reconcile(replace(want, routes=want.routes - {Route("10.240.3.0/24", "wm0")}), prune=True)

    names = dp.names()
    assert names.index("sync_routes") < names.index("pod_mtu")
    assert ("pod_mtu", 1420) in dp.calls


def test_no_pod_mtu_callback_means_no_pod_mtu(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord]) -> None:
    rec = Reconciler(FakeDevice(), clock=clock)
    res = rec.reconcile(overlay_only(planned(records, "vxlan")), prune=True)
    assert res.errors == 0 and "pod_mtu" not in dp.names()


def test_wireguard_mtu_only_when_known_and_device_exists(dp: Dataplane, clock: Clock,
                                                         records: dict[str, NodeRecord]) -> None:
    rec = Reconciler(FakeDevice(), clock=clock)
    rec.reconcile(overlay_only(planned(records, underlay_mtu=None)), prune=False)
    assert "set_mtu" not in dp.names() and "link_exists" not in dp.names()

    dp.calls.clear()
    dp.links.clear()
    rec.reconcile(overlay_only(planned(records)), prune=False)
    assert dp.names()[0] == "link_exists" and "set_mtu" not in dp.names()


def test_custom_vxlan_device_name_is_searched_for_routes_and_deleted(dp: Dataplane, clock: Clock) -> None:
    rec = Reconciler(FakeDevice("wg7"), clock=clock, vxlan_device="vx7")
    rec.reconcile(desired(peer(K1, 1)), prune=True)
    assert dp.route_calls()[0][2] == ("wg7", "vx7")
    assert dp.calls[-1] == ("delete_vxlan", "vx7")


@pytest.mark.parametrize("failing", ["ensure_vxlan", "sync_fdb", "sync_neighbours"])
def test_vxlan_failure_keeps_routes_where_they_are(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord],
                                                   failing: str) -> None:
    # Routes must not move into a VXLAN device that is not ready.
    dp.errors[failing] = DeviceNotFound("wm-vxlan: no such interface")
    rec = Reconciler(FakeDevice(), clock=clock, on_pod_mtu=dp.pod_mtu)
    res = rec.reconcile(overlay_only(planned(records, "vxlan")), prune=True)
    assert "sync_routes" not in dp.names()
    assert res.errors == 1 and res.failed == ["overlay: wm-vxlan: no such interface"]


def test_route_failure_leaves_vxlan_device_and_raised_pod_mtu_alone(dp: Dataplane, clock: Clock,
                                                                    records: dict[str, NodeRecord]) -> None:
    rec = Reconciler(FakeDevice(), clock=clock, on_pod_mtu=dp.pod_mtu)
    rec.reconcile(overlay_only(planned(records, "vxlan")), prune=True)
    dp.calls.clear()
    dp.errors["sync_routes"] = TunnelError("wm0: route 10.240.2.0/24: Invalid argument", errno.EINVAL)

    res = rec.reconcile(overlay_only(planned(records)), prune=True)

    assert res.errors == 1
    assert "delete_vxlan" not in dp.names()  # routes may still point into it
    assert "pod_mtu" not in dp.names()  # pods stay small while traffic may still be in VXLAN


# --- when the overlay is synced --------------------------------------------------------------


def test_unchanged_overlay_is_skipped_then_full_pass_syncs_it(dp: Dataplane, clock: Clock,
                                                              records: dict[str, NodeRecord]) -> None:
    want = planned(records, "vxlan")
    rec = Reconciler(FakeDevice(), clock=clock, on_pod_mtu=dp.pod_mtu)
    rec.reconcile(want, prune=True)
    first = list(dp.calls)
    dp.calls.clear()

    rec.reconcile(want, prune=True)
    assert dp.calls == []

    rec.reconcile(want, prune=True, full=True)  # catches drift nobody announced
    again = [c for c in first if c[0] != "set_mtu"]  # the MTU already matches: read, not written
    assert sorted(dp.calls, key=repr) == sorted(again, key=repr)  # everything else again
    dp.calls.clear()

    rec.reconcile(want, prune=True)
    assert dp.calls == []


def test_overlay_always_synced_before_first_sync(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord]) -> None:
    want = planned(records, "vxlan")
    rec = Reconciler(FakeDevice(), clock=clock)
    rec.reconcile(want, prune=False)
    rec.reconcile(want, prune=False)
    assert len(dp.route_calls()) == 2

    # The first pass that may prune syncs, even though the desired overlay did not change.
    rec.reconcile(want, prune=True)
    assert len(dp.route_calls()) == 3 and dp.route_calls()[-1][3] is True


@pytest.mark.parametrize("change", ["routes", "vxlan", "fdb", "neighbours", "mtu", "pod_mtu"])
def test_any_overlay_change_is_synced(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord],
                                      change: str) -> None:
    want = planned(records, "vxlan")
    assert want.vxlan is not None
    changed = {
        "routes": {"routes": want.routes - {Route("10.240.3.1/32", "wm0")}},
        "vxlan": {"vxlan": replace(want.vxlan, vni=7)},
        "fdb": {"fdb": {**want.fdb, "0a:58:0a:f0:09:01": "10.240.9.1"}},
        "neighbours": {"neighbours": {**want.neighbours, "10.240.9.0": "0a:58:0a:f0:09:01"}},
        "mtu": {"mtu": 1400},
        "pod_mtu": {"pod_mtu": 1350},
    }[change]
    rec = Reconciler(FakeDevice(), clock=clock, on_pod_mtu=dp.pod_mtu)
    rec.reconcile(want, prune=True)
    dp.calls.clear()

    rec.reconcile(replace(want, **changed), prune=True)

    assert "sync_routes" in dp.names()


def test_peer_change_alone_does_not_resync_overlay(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = Reconciler(dev, clock=clock)
    rec.reconcile(desired(peer(K1, 1)), prune=True)
    dp.calls.clear()

    res = rec.reconcile(desired(peer(K1, 1, endpoint="198.51.100.1:51820")), prune=True)

    assert res.updated == 1
    assert dp.calls == []


def test_failed_overlay_is_retried_although_unchanged(dp: Dataplane, clock: Clock,
                                                      records: dict[str, NodeRecord]) -> None:
    want = planned(records, "vxlan")
    dp.errors["sync_fdb"] = TunnelError("wm-vxlan: fdb: Operation not permitted", errno.EPERM)
    rec = Reconciler(FakeDevice(), clock=clock)
    assert rec.reconcile(want, prune=True).errors == 1

    del dp.errors["sync_fdb"]
    dp.calls.clear()
    res = rec.reconcile(want, prune=True)
    assert res.errors == 0 and "sync_routes" in dp.names()

    dp.calls.clear()
    rec.reconcile(want, prune=True)
    assert dp.calls == []


def test_forget_overlay_makes_next_pass_sync(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord]) -> None:
    want = planned(records, "vxlan")
    rec = Reconciler(FakeDevice(), clock=clock)
    rec.reconcile(want, prune=True)
    dp.calls.clear()

    rec.forget_overlay()
    rec.reconcile(want, prune=True)

    assert "ensure_vxlan" in dp.names() and "sync_routes" in dp.names()
