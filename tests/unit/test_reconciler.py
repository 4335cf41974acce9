"""agent.reconciler: every dataplane object on its own status and backoff, smallest diffs, mode-switch order.

The kernel is replaced by in-memory fake targets, one per object kind, which record every call
into one shared, ordered log (so the order across kinds can be checked) and can be told to
refuse a key the way the kernel would. The WireGuard device is a FakeDevice kept in a dict.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import pytest

import wiremesh.agent.reconciler
import wiremesh.tunnels.targets
from wiremesh.agent.objects import BACKOFF_MAX, BACKOFF_MIN
from wiremesh.agent.planner import DesiredState, plan_mesh
from wiremesh.agent.reconciler import LINGER_S, Reconciler
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


K1, K2, K3, K4, STRAY = _key(1), _key(2), _key(3), _key(4), _key(9)
N1, N2, N3 = "lab/n1", "lab/n2", "lab/n3"
NODES = {K1: N1, K2: N2, K3: N3}  # who holds which key, unless a test says otherwise


class FakeDevice(WireGuardDevice):
    """A WireGuard device kept in a dict; peers in `fail` are refused like a kernel error would be.

    Models what the reconciler relies on: one `apply` is one transaction (all or nothing), an
    allowed IP belongs to one peer (giving it to a peer takes it from the others), and a change
    with `replaces` leaves the old key without allowed IPs (removed later, LINGER_S). `steps` holds the keys listed after
    each change, to check that no moment lists a node twice.
    """

    backend = "fake"

    def __init__(self, name: str = "wm0", peers: Iterable[PeerStatus] = ()) -> None:
        super().__init__(name)
        self.peers: dict[str, PeerStatus] = {p.public_key: p for p in peers}
        self.fail: set[str] = set()
        self.calls: list[list[PeerChange]] = []
        self.steps: list[frozenset[str]] = []
        self.shows = 0

    def exists(self) -> bool:
        return True

    def create(self) -> None:
        pass

    def show(self) -> DeviceState:
        self.shows += 1
        return DeviceState(name=self.name, public_key=None, listen_port=51820, peers=dict(self.peers))

    def _set(self, private_key: PrivateKey | None, listen_port: int | None, changes: list[PeerChange]) -> None:
        self.calls.append(list(changes))
        if any(c.public_key in self.fail for c in changes):
            raise TunnelError(f"{self.name}: configure device: errno {errno.EINVAL}", errno.EINVAL)
        peers = dict(self.peers)
        for c in changes:
            self._one(peers, c)
            self.steps.append(frozenset(peers))
        self.peers = peers

    @staticmethod
    def _one(peers: dict[str, PeerStatus], c: PeerChange) -> None:
        if c.remove:
            peers.pop(c.public_key, None)
            return
        cur = peers.get(c.public_key)
        if cur is None:
            if c.update_only:
                return
            cur = PeerStatus(public_key=c.public_key)
        if c.allowed_ips is not None:
            for k, p in list(peers.items()):
                if k != c.public_key and p.allowed_ips & c.allowed_ips:
                    peers[k] = replace(p, allowed_ips=p.allowed_ips - c.allowed_ips)
        peers[c.public_key] = replace(
            cur,
            endpoint=c.endpoint if c.endpoint is not None else cur.endpoint,
            allowed_ips=c.allowed_ips if c.allowed_ips is not None else cur.allowed_ips,
            persistent_keepalive=(c.persistent_keepalive if c.persistent_keepalive is not None
                                  else cur.persistent_keepalive),
        )
        # (with `replaces`, the old peer stays: its allowed IPs moved above; removed later)

    def touched(self, key: str) -> int:
        return sum(1 for call in self.calls for c in call if c.public_key == key)


# --- the fake kernel: one target per object kind, one shared log ---------------------------------


class FakeTarget:
    """Objects of one kind in a dict. Calls go to the shared log: (kind, "read"),
    (kind, "update", key, value), (kind, "delete", key). `refuse(key)` makes update and delete
    of that key raise TunnelError until `allow(key)`."""

    def __init__(self, dp: Dataplane, kind: str) -> None:
        self.dp = dp
        self.kind = kind
        self.have: dict[str, Any] = {}
        self.refused: dict[str, str] = {}

    def refuse(self, key: str, message: str | None = None) -> None:
        self.refused[key] = message or f"{self.kind} {key}: Invalid argument"

    def allow(self, key: str) -> None:
        self.refused.pop(key, None)

    def _check(self, key: str) -> None:
        if key in self.refused:
            raise TunnelError(self.refused[key], errno.EINVAL)

    def read(self) -> dict[str, Any]:
        self.dp.log.append((self.kind, "read"))
        return dict(self.have)

    def update(self, key: str, want: Any) -> None:
        self.dp.log.append((self.kind, "update", key, want))
        self._check(key)
        self.have[key] = want

    def delete(self, key: str, have: Any) -> None:
        self.dp.log.append((self.kind, "delete", key))
        self._check(key)
        self.have.pop(key, None)


class FakeRoutes(FakeTarget):
    def update(self, key: str, want: Route) -> None:
        if not self.dp.exists(want.ifname):
            self.dp.log.append((self.kind, "update", key, want))
            raise DeviceNotFound(f"{want.ifname}: no such interface")
        super().update(key, want)


class FakeVxlanEntries(FakeTarget):
    """FDB or neighbour entries of the VXLAN device: they need the device."""

    def update(self, key: str, want: Any) -> None:
        if not self.dp.exists(self.dp.vxlan_name):
            self.dp.log.append((self.kind, "update", key, want))
            raise DeviceNotFound(f"{self.dp.vxlan_name}: no such interface")
        super().update(key, want)


class FakeVxlan(FakeTarget):
    def delete(self, key: str, have: Any) -> None:
        super().delete(key, have)
        # The device's FDB and neighbour entries and the routes through it go with it.
        self.dp.fdb.have.clear()
        self.dp.neighbours.have.clear()
        for dst, rt in list(self.dp.routes.have.items()):
            if rt.ifname == key:
                del self.dp.routes.have[dst]


class FakeMtu(FakeTarget):
    def read(self) -> dict[str, Any]:
        self.dp.log.append((self.kind, "read"))
        return {n: m for n, m in self.have.items() if n in self.dp.links}


class Dataplane:
    """The fake kernel: targets, the interfaces that exist and the pod MTU callback."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.links: set[str] = set()  # interfaces other than the VXLAN device (which is `vxlan.have`)
        self.vxlan_name = "wm-vxlan"
        self.routes = FakeRoutes(self, "route")
        self.vxlan = FakeVxlan(self, "vxlan")
        self.fdb = FakeVxlanEntries(self, "fdb")
        self.neighbours = FakeVxlanEntries(self, "neighbour")
        self.mtu = FakeMtu(self, "mtu")
        self.pod_mtu_error: TunnelError | None = None

    def exists(self, name: str) -> bool:
        return name in self.links or name in self.vxlan.have

    # The two kernel functions the reconciler still imports.
    def link_exists(self, name: str) -> bool:
        self.log.append(("link_exists", name))
        return self.exists(name)

    def link_mtu(self, name: str) -> int:
        return int(self.mtu.have[name])

    def pod_mtu(self, mtu: int) -> None:
        """What the reconciler's pod MTU target does (every pod gets `mtu`)."""
        self.log.append(("pod-mtu", "update", "pods", mtu))
        if self.pod_mtu_error is not None:
            raise self.pod_mtu_error

    def reconciler(self, dev: WireGuardDevice | None = None, clock: Any = None, *, pod_mtu: bool = False,
                   **kw: Any) -> Reconciler:
        """A Reconciler whose kernel targets are this dataplane's fakes."""
        dev = dev if dev is not None else FakeDevice()
        rec = Reconciler(dev, clock=clock or Clock(), pods=(lambda: []) if pod_mtu else None, **kw)
        if pod_mtu:
            rec.pod_mtu = _PodMtu(self.pod_mtu)  # type: ignore[assignment]
        self.links.add(dev.name)
        self.mtu.have.setdefault(dev.name, 1280)
        self.vxlan_name = rec.vxlan_device
        r: Any = rec  # the fakes take the real targets' places
        r.routes, r.vxlan, r.fdb, r.neighbours, r.mtu = self.routes, self.vxlan, self.fdb, self.neighbours, self.mtu
        return rec

    def writes(self, kind: str | None = None) -> list[tuple[Any, ...]]:
        return [c for c in self.log if len(c) > 2 and (kind is None or c[0] == kind)]

    def order(self, ignore: Iterable[str] = ()) -> list[tuple[str, str]]:
        """(kind, op) of every write, runs of the same collapsed: the order across kinds."""
        out: list[tuple[str, str]] = []
        for c in self.writes():
            if c[0] in ignore:
                continue
            if not out or out[-1] != c[:2]:
                out.append(c[:2])
        return out

    def reads(self, kind: str) -> int:
        return sum(1 for c in self.log if c == (kind, "read"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _no_kernel(*a: Any, **kw: Any) -> Any:
    raise AssertionError("a unit test reached the kernel (netlink)")


class _PodMtu:
    """The pod MTU target, its update handed to the fake dataplane."""

    kind = "pod-mtu"
    changed = 0

    def __init__(self, apply: Any) -> None:
        self.apply = apply

    def read(self) -> dict[str, int]:
        return {}

    def update(self, key: str, want: int) -> None:
        self.apply(want)

    def delete(self, key: str, have: int) -> None:
        pass


def make_dataplane(monkeypatch: pytest.MonkeyPatch) -> Dataplane:
    d = Dataplane()
    monkeypatch.setattr(wiremesh.agent.reconciler, "link_exists", d.link_exists)
    monkeypatch.setattr(wiremesh.agent.reconciler, "link_mtu", d.link_mtu)
    monkeypatch.setattr(wiremesh.tunnels.targets, "IPRoute", _no_kernel)
    return d


@pytest.fixture
def dp(monkeypatch: pytest.MonkeyPatch) -> Dataplane:
    return make_dataplane(monkeypatch)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def peer(key: str, n: int, endpoint: str | None = None) -> PeerConfig:
    return PeerConfig(public_key=key, endpoint=endpoint or f"192.0.2.{n}:51820",
                      allowed_ips=frozenset({f"10.240.{n}.0/24"}))


def desired(*peers: PeerConfig, nodes: Mapping[str, PeerConfig] | None = None, **kw: Any) -> DesiredState:
    """Peers by node (NODES, or `nodes` as given), each pod CIDR routed into wm0."""
    by_node = {NODES[p.public_key]: p for p in peers}
    by_node.update(nodes or {})
    return DesiredState(peers=by_node, routes=frozenset(Route(c, "wm0") for p in by_node.values()
                                                        for c in p.allowed_ips), **kw)


def errors(rec: Reconciler) -> list[tuple[str, str, str]]:
    return [(o.kind, o.key, o.message) for o in rec.objects() if o.state == "error"]


# --- peers ---------------------------------------------------------------------------------------


def test_adds_peers_and_routes(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    want = desired(peer(K1, 1), peer(K2, 2))

    res = rec.reconcile(want, prune=False)

    assert (res.added, res.updated, res.removed, res.errors) == (2, 0, 0, 0)
    assert res.programmed == 2
    assert dev.peers[K1].endpoint == "192.0.2.1:51820"
    assert dev.peers[K2].allowed_ips == frozenset({"10.240.2.0/24"})
    assert len(dev.calls) == 1 and {c.name for c in dev.calls[0]} == {N1, N2}  # one update for all
    assert {k: st.state for k, st in rec.snapshot().items()} == {N1: "done", N2: "done"}
    assert dp.routes.have == {"10.240.1.0/24": Route("10.240.1.0/24", "wm0"),
                              "10.240.2.0/24": Route("10.240.2.0/24", "wm0")}
    assert res.routes_added == 2
    assert {(o.kind, o.key, o.state) for o in rec.objects() if o.kind == "route"} == {
        ("route", "10.240.1.0/24", "done"), ("route", "10.240.2.0/24", "done")}


def test_peers_added_are_told_to_the_rotation_stage_once(dp: Dataplane, clock: Clock) -> None:
    """Added peers (not updated, not replaced) are events: the pass starts their handshakes."""
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    rec.reconcile(desired(peer(K1, 1), peer(K2, 2)), prune=True)
    assert rec.take_events() == (False, [], [N1, N2])
    assert rec.take_events() == (False, [], [])
    rec.reconcile(desired(peer(K1, 1, "192.0.2.99:51820")), prune=True)  # an update, a removal: no event
    assert rec.take_events() == (False, [], [])
    rec.reconcile(desired(peer(K1, 1, "192.0.2.99:51820"), peer(K2, 2)), prune=True)  # back: added again
    assert rec.take_events() == (False, [], [N2])


def test_second_pass_sends_nothing_and_reads_nothing(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    want = desired(peer(K1, 1), peer(K2, 2))
    rec.reconcile(want, prune=True)
    dev.calls.clear()
    dp.log.clear()
    shows = dev.shows

    res = rec.reconcile(want, prune=True)

    assert dev.calls == []
    assert dev.shows == shows  # compared against what it programmed: O(changes), not O(peers)
    assert dp.log == []  # the overlay did not change: not even read
    assert (res.added, res.updated, res.removed, res.errors, res.programmed) == (0, 0, 0, 0, 2)


def test_full_pass_reads_the_device_and_repairs_only_the_drift(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    want = desired(peer(K1, 1), peer(K2, 2), peer(K3, 3))
    rec.reconcile(want, prune=True)
    del dev.peers[K2]  # `wg set wm0 peer K2 remove` by hand: no event announces it
    dev.calls.clear()

    rec.reconcile(want, prune=True)
    assert dev.calls == []  # a plain pass trusts its memory

    shows = dev.shows
    res = rec.reconcile(want, prune=True, full=True)
    assert dev.shows == shows + 1
    assert [[c.name for c in call] for call in dev.calls] == [[N2]]
    assert set(dev.peers) == {K1, K2, K3} and res.added == 1


def test_peer_already_on_device_is_done_without_a_write(dp: Dataplane, clock: Clock) -> None:
    p = peer(K1, 1)
    dev = FakeDevice(peers=[PeerStatus(public_key=K1, endpoint=p.endpoint, allowed_ips=p.allowed_ips)])
    rec = dp.reconciler(dev, clock)
    res = rec.reconcile(desired(p), prune=False)
    assert dev.calls == []
    assert rec.snapshot()[N1].state == "done" and res.programmed == 1


def _stray() -> PeerStatus:
    return PeerStatus(public_key=STRAY, endpoint="192.0.2.99:51820", allowed_ips=frozenset({"10.240.99.0/24"}))


def test_no_prune_before_first_sync_then_prunes_routes(dp: Dataplane, clock: Clock) -> None:
    dp.routes.have["10.240.99.0/24"] = Route("10.240.99.0/24", "wm0")  # left by a node that went
    dev = FakeDevice(peers=[_stray()])
    rec = dp.reconciler(dev, clock)
    want = desired(peer(K1, 1))

    res = rec.reconcile(want, prune=False)
    assert STRAY in dev.peers and res.removed == 0
    assert "10.240.99.0/24" in dp.routes.have and dp.writes("route") == [
        ("route", "update", "10.240.1.0/24", Route("10.240.1.0/24", "wm0"))]

    res = rec.reconcile(want, prune=True)
    assert set(dp.routes.have) == {"10.240.1.0/24"} and res.routes_removed == 1


def test_stale_peer_is_pruned_on_the_first_sync_after_a_restart(dp: Dataplane, clock: Clock) -> None:
    # A restarted agent (cached config) runs a pass before Consul's first sync: it must not
    # prune then, but the first pass that may prune removes what nobody wants, not 30 s later.
    dev = FakeDevice(peers=[_stray()])
    rec = dp.reconciler(dev, clock)
    want = desired(peer(K1, 1))
    rec.reconcile(want, prune=False)
    assert STRAY in dev.peers

    res = rec.reconcile(want, prune=True)

    assert set(dev.peers) == {K1} and res.removed == 1


def test_stale_peer_is_pruned_by_a_full_pass(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice(peers=[_stray()])
    rec = dp.reconciler(dev, clock)
    want = desired(peer(K1, 1))
    rec.reconcile(want, prune=False)
    res = rec.reconcile(want, prune=True, full=True)
    assert set(dev.peers) == {K1} and res.removed == 1


def test_endpoint_change_is_an_update(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    rec.reconcile(desired(peer(K1, 1)), prune=True)
    dev.calls.clear()

    res = rec.reconcile(desired(peer(K1, 1, endpoint="198.51.100.1:51820")), prune=True)

    assert res.updated == 1 and res.added == 0
    assert dev.calls == [[PeerChange(public_key=K1, endpoint="198.51.100.1:51820", update_only=True, name=N1)]]
    assert dev.peers[K1].endpoint == "198.51.100.1:51820"


def test_failing_peer_gets_error_and_backoff_while_others_land(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    dev.fail = {K2}
    rec = dp.reconciler(dev, clock)

    res = rec.reconcile(desired(peer(K1, 1), peer(K2, 2), peer(K3, 3)), prune=False)

    assert set(dev.peers) == {K1, K3}
    assert res.added == 2 and res.errors == 1 and res.programmed == 2
    assert len(res.failed) == 1 and res.failed[0].startswith(f"{N2}: ")
    st = rec.snapshot()[N2]
    assert (st.kind, st.state) == ("peer", "error")
    assert "errno" in st.message
    assert st.attempts == 1
    assert st.retry_at == clock.now + BACKOFF_MIN
    assert rec.next_retry() == st.retry_at
    assert rec.snapshot()[N1].state == rec.snapshot()[N3].state == "done"
    assert set(dp.routes.have) == {"10.240.1.0/24", "10.240.2.0/24", "10.240.3.0/24"}  # routes still synced


def test_backoff_holds_then_retries_with_doubling_delay(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    dev.fail = {K2}
    rec = dp.reconciler(dev, clock)
    want = desired(peer(K1, 1), peer(K2, 2))
    rec.reconcile(want, prune=False)
    tries = dev.touched(K2)

    # Before retry_at: the failing peer is left alone.
    res = rec.reconcile(want, prune=False)
    assert dev.touched(K2) == tries
    assert rec.snapshot()[N2].state == "error" and res.errors == 0

    # After retry_at: tried again, still failing -> attempts 2, delay doubled.
    clock.now += BACKOFF_MIN + 0.01
    res = rec.reconcile(want, prune=False)
    assert dev.touched(K2) > tries
    assert res.errors == 1
    assert rec.snapshot()[N2].attempts == 2
    assert rec.snapshot()[N2].retry_at == pytest.approx(clock.now + 2 * BACKOFF_MIN)

    # The device accepts it now: done, backoff cleared.
    dev.fail.clear()
    clock.now += 10
    res = rec.reconcile(want, prune=False)
    assert K2 in dev.peers
    st = rec.snapshot()[N2]
    assert (st.state, st.message, st.attempts, st.retry_at) == ("done", "", 0, 0.0)
    assert res.programmed == 2 and rec.next_retry() is None


def test_changed_peer_clears_its_backoff(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    dev.fail = {K2}
    rec = dp.reconciler(dev, clock)
    rec.reconcile(desired(peer(K1, 1), peer(K2, 2)), prune=False)
    tries = dev.touched(K2)
    dev.fail.clear()

    # Same instant, but the desired peer changed: no waiting for the old backoff.
    res = rec.reconcile(desired(peer(K1, 1), peer(K2, 2, endpoint="198.51.100.2:51820")), prune=False)

    assert dev.touched(K2) > tries
    assert rec.snapshot()[N2].state == "done" and res.added == 1
    assert dev.peers[K2].endpoint == "198.51.100.2:51820"


def test_status_of_undesired_peer_dropped(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    rec.reconcile(desired(peer(K1, 1), peer(K2, 2)), prune=True)
    res = rec.reconcile(desired(peer(K1, 1)), prune=True)
    assert set(rec.snapshot()) == {N1}
    assert res.removed == 1 and res.programmed == 1
    assert set(dev.peers) == {K1}
    assert set(dp.routes.have) == {"10.240.1.0/24"}


def test_fake_device_is_a_real_wireguard_device() -> None:
    # The reconciler relies only on the public WireGuardDevice API (show/apply).
    dev: Any = FakeDevice()
    dev.apply([])
    assert dev.calls == []


# --- key rotation: a peer is a node, its key an attribute -----------------------------------------


@pytest.mark.parametrize("full", [False, True])
def test_key_change_is_one_update_replacing_the_old_key(dp: Dataplane, clock: Clock, full: bool) -> None:
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    rec.reconcile(desired(peer(K1, 1), peer(K2, 2)), prune=True)
    dev.calls.clear()
    dev.steps.clear()

    res = rec.reconcile(desired(peer(K2, 2), nodes={N1: peer(K4, 1)}), prune=True, full=full)

    assert dev.calls == [[PeerChange(public_key=K4, endpoint="192.0.2.1:51820",
                                     allowed_ips=frozenset({"10.240.1.0/24"}), replaces=K1, name=N1)]]
    assert set(dev.peers) == {K4, K2, K1}
    assert dev.peers[K4].allowed_ips == frozenset({"10.240.1.0/24"})
    assert dev.peers[K4].endpoint == "192.0.2.1:51820"
    assert dev.peers[K1].allowed_ips == frozenset()  # kept a moment for what it still holds, routing nothing
    assert res.errors == 0 and res.removed == 0
    assert rec.snapshot()[N1].state == "done"

    dev.calls.clear()
    rec.reconcile(desired(peer(K2, 2), nodes={N1: peer(K4, 1)}), prune=True, full=full)
    assert dev.calls == [] and K1 in dev.peers  # not before LINGER_S, even on a full pass
    assert rec.next_retry() == clock.now + LINGER_S
    clock.now += LINGER_S
    res = rec.reconcile(desired(peer(K2, 2), nodes={N1: peer(K4, 1)}), prune=True, full=full)
    assert dev.calls == [[PeerChange(public_key=K1, remove=True)]] and set(dev.peers) == {K4, K2}
    assert res.removed == 1 and rec.next_retry() is None


def test_refused_new_key_leaves_the_old_peer_in_place_then_replaces_it(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    rec.reconcile(desired(peer(K1, 1)), prune=True)
    dev.fail = {K4}
    rotated = desired(nodes={N1: peer(K4, 1)})

    res = rec.reconcile(rotated, prune=True)
    assert res.errors == 1 and rec.snapshot()[N1].state == "error"
    assert dev.peers[K1].allowed_ips == frozenset({"10.240.1.0/24"})  # the allowed IPs never disappear

    rec.reconcile(rotated, prune=True)  # before its retry: the old peer is not pruned meanwhile
    assert K1 in dev.peers

    dev.fail.clear()
    clock.now = rec.next_retry() or 0.0
    dev.calls.clear()
    rec.reconcile(rotated, prune=True)  # the retry: a plain pass
    assert [[(c.public_key, c.replaces) for c in call] for call in dev.calls] == [[(K4, K1)]]
    assert rec.snapshot()[N1].state == "done"
    clock.now += LINGER_S
    rec.reconcile(rotated, prune=True)
    assert set(dev.peers) == {K4}  # K1 gone once it had lingered


@pytest.mark.parametrize("prune", [False, True])
def test_restart_replaces_the_old_key_instead_of_adding_a_second_peer(dp: Dataplane, clock: Clock,
                                                                      prune: bool) -> None:
    # The device still holds the node under its old key; this process has no memory of it.
    dev = FakeDevice(peers=[PeerStatus(public_key=K1, endpoint="192.0.2.1:51820",
                                       allowed_ips=frozenset({"10.240.1.0/24"}))])
    rec = dp.reconciler(dev, clock)

    rec.reconcile(desired(nodes={N1: peer(K4, 1)}), prune=prune)

    assert dev.calls == [[PeerChange(public_key=K4, endpoint="192.0.2.1:51820",
                                     allowed_ips=frozenset({"10.240.1.0/24"}), replaces=K1, name=N1)]]
    clock.now += LINGER_S
    rec.reconcile(desired(nodes={N1: peer(K4, 1)}), prune=prune)
    assert set(dev.peers) == {K4}


# --- roaming: WireGuard moves an endpoint to where the peer's packets come from ---------------------


@pytest.mark.parametrize("full", [False, True])
def test_roamed_endpoint_survives_passes_until_the_record_moves(dp: Dataplane, clock: Clock, full: bool) -> None:
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    want = desired(peer(K1, 1), peer(K2, 2))
    rec.reconcile(want, prune=True)
    dev.peers[K1] = replace(dev.peers[K1], endpoint="203.0.113.7:40000")  # `wg set ... endpoint` / a roam
    dev.calls.clear()

    rec.reconcile(want, prune=True, full=True)
    rec.reconcile(want, prune=True)
    assert dev.calls == []
    assert dev.peers[K1].endpoint == "203.0.113.7:40000"

    # The node's record moved: that is written, on any pass.
    res = rec.reconcile(desired(peer(K1, 1, endpoint="198.51.100.1:51820"), peer(K2, 2)), prune=True, full=full)
    assert dev.calls == [[PeerChange(public_key=K1, endpoint="198.51.100.1:51820", update_only=True, name=N1)]]
    assert dev.peers[K1].endpoint == "198.51.100.1:51820" and res.updated == 1


def test_allowed_ips_change_of_a_roamed_peer_leaves_its_endpoint(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    rec.reconcile(desired(peer(K1, 1)), prune=True)
    dev.peers[K1] = replace(dev.peers[K1], endpoint="203.0.113.7:40000")
    dev.calls.clear()

    wider = replace(peer(K1, 1), allowed_ips=frozenset({"10.240.1.0/24", "10.250.0.0/16"}))
    rec.reconcile(desired(wider), prune=True, full=True)

    assert dev.calls == [[PeerChange(public_key=K1, allowed_ips=wider.allowed_ips, update_only=True, name=N1)]]
    assert dev.peers[K1].endpoint == "203.0.113.7:40000"


def test_restart_keeps_a_roamed_endpoint(dp: Dataplane, clock: Clock) -> None:
    # No memory of what was applied: a peer that has an endpoint keeps it.
    dev = FakeDevice(peers=[PeerStatus(public_key=K1, endpoint="203.0.113.7:40000",
                                       allowed_ips=frozenset({"10.240.1.0/24"}))])
    rec = dp.reconciler(dev, clock)
    res = rec.reconcile(desired(peer(K1, 1)), prune=True)
    assert dev.calls == [] and res.programmed == 1
    assert dev.peers[K1].endpoint == "203.0.113.7:40000"


# --- routes and the other overlay objects: each on its own ---------------------------------------


def test_failed_route_is_an_error_object_and_is_retried_on_its_own_backoff(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    dp.routes.refuse("10.240.2.0/24", "wm0: route 10.240.2.0/24: Network is unreachable")
    rec = dp.reconciler(dev, clock)
    want = desired(peer(K1, 1), peer(K2, 2), peer(K3, 3))

    res = rec.reconcile(want, prune=True)

    # The others are programmed; the refused route is an error object with the kernel's message.
    assert set(dev.peers) == {K1, K2, K3} and res.programmed == 3
    assert set(dp.routes.have) == {"10.240.1.0/24", "10.240.3.0/24"}
    assert res.errors == 1 and res.routes_added == 2
    assert errors(rec) == [("route", "10.240.2.0/24", "wm0: route 10.240.2.0/24: Network is unreachable")]
    st = next(o for o in rec.objects() if o.kind == "route" and o.key == "10.240.2.0/24")
    assert st.attempts == 1 and st.as_dict()["state"] == "error"
    t0 = clock.now
    assert rec.next_retry() == t0 + BACKOFF_MIN  # wakes the loop: no waiting for a full pass
    device_calls = len(dev.calls)

    # Before its retry: left alone.
    dp.log.clear()
    clock.now = t0 + BACKOFF_MIN / 2
    rec.reconcile(want, prune=True)
    assert dp.writes("route") == []

    # Due: retried on a plain pass with nothing changed; still refused, so the delay doubles.
    clock.now = t0 + BACKOFF_MIN
    rec.reconcile(want, prune=True)
    assert dp.writes("route") == [("route", "update", "10.240.2.0/24", Route("10.240.2.0/24", "wm0"))]
    assert rec.next_retry() == pytest.approx(clock.now + 2 * BACKOFF_MIN)

    # However often it fails, it is retried at least every BACKOFF_MAX.
    for _ in range(6):
        clock.now = rec.next_retry() or 0.0
        rec.reconcile(want, prune=True)
    assert (rec.next_retry() or 0.0) - clock.now == pytest.approx(BACKOFF_MAX)

    # The obstacle goes: programmed at its next retry, then quiet again.
    dp.routes.allow("10.240.2.0/24")
    clock.now = rec.next_retry() or 0.0
    res = rec.reconcile(want, prune=True)
    assert dp.routes.have["10.240.2.0/24"] == Route("10.240.2.0/24", "wm0")
    assert res.errors == 0 and errors(rec) == [] and rec.next_retry() is None
    assert len(dev.calls) == device_calls  # the peers were never touched by the route's retries
    dp.log.clear()
    rec.reconcile(want, prune=True)
    assert dp.log == []


def test_failed_route_delete_is_retried_until_done(dp: Dataplane, clock: Clock) -> None:
    dp.routes.have["10.240.99.0/24"] = Route("10.240.99.0/24", "wm0")
    dp.routes.refuse("10.240.99.0/24", "wm0: delete route 10.240.99.0/24: Device or resource busy")
    rec = dp.reconciler(FakeDevice(), clock)
    want = desired(peer(K1, 1))

    res = rec.reconcile(want, prune=True)
    assert res.errors == 1
    (st,) = [o for o in rec.objects() if o.state == "error"]
    assert (st.kind, st.key, st.op) == ("route", "10.240.99.0/24", "delete")

    dp.routes.allow("10.240.99.0/24")
    clock.now = rec.next_retry() or 0.0
    res = rec.reconcile(want, prune=True)
    assert "10.240.99.0/24" not in dp.routes.have and res.routes_removed == 1
    assert errors(rec) == [] and rec.next_retry() is None
    assert [o.key for o in rec.objects() if o.kind == "route"] == ["10.240.1.0/24"]


def test_failed_route_delete_is_forgotten_once_the_route_is_gone(dp: Dataplane, clock: Clock) -> None:
    # Someone removed it by hand (or its device went): there is nothing left to retry. An error
    # entry kept for it would keep next_retry() in the past: the loop would spin on it forever.
    dp.routes.have["10.240.99.0/24"] = Route("10.240.99.0/24", "wm0")
    dp.routes.refuse("10.240.99.0/24")
    rec = dp.reconciler(FakeDevice(), clock)
    want = desired(peer(K1, 1))
    rec.reconcile(want, prune=True)
    del dp.routes.have["10.240.99.0/24"]

    clock.now += 10
    rec.reconcile(want, prune=True, full=True)

    assert errors(rec) == []
    assert rec.next_retry() is None


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
    return plan_mesh("n1", records["n1"].public_key, cfg, records, local_pod_cidr="10.240.1.0/24",
                underlay_mtu=underlay_mtu)


def overlay_only(d: DesiredState, **kw: Any) -> DesiredState:
    """`d` without peers (the peer half of a pass is not what these tests look at), fields replaced."""
    return replace(d, peers={}, **kw)


def test_fake_targets_stand_in_for_every_kernel_call(dp: Dataplane, clock: Clock) -> None:
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    r: Any = rec
    assert (r.routes, r.vxlan, r.fdb, r.neighbours, r.mtu) == (dp.routes, dp.vxlan, dp.fdb, dp.neighbours, dp.mtu)
    module = vars(wiremesh.agent.reconciler)
    assert module["link_exists"] == dp.link_exists
    assert module["link_mtu"] == dp.link_mtu
    # The kernel functions of the old all-or-nothing model are not used any more.
    old = {"ensure_vxlan", "delete_vxlan", "set_mtu", "read_vxlan"}
    assert not old & set(module)
    with pytest.raises(AssertionError):
        vars(wiremesh.tunnels.targets)["IPRoute"]()


def test_targets_follow_the_device_names() -> None:
    # The real targets: building them touches nothing.
    rec = Reconciler(FakeDevice("wg7"), clock=Clock(), vxlan_device="vx7")
    assert rec.routes.devices == ("wg7", "vx7")  # wiremesh's routes are searched on both
    assert (rec.vxlan.name, rec.fdb.device, rec.neighbours.device) == ("vx7", "vx7", "vx7")
    assert rec.mtu.ifnames == ("wg7",)
    assert rec.pod_mtu is None


def test_custom_vxlan_device_name_is_deleted(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord]) -> None:
    dp.vxlan.have["vx7"] = VxlanSpec(name="vx7", vni=1, local="10.240.1.1", mac="0a:58:0a:f0:01:01", mtu=1370,
                                     address="10.240.1.0/32")
    rec = dp.reconciler(FakeDevice("wg7"), clock, vxlan_device="vx7")
    rec.reconcile(replace(desired(peer(K1, 1)), routes=frozenset({Route("10.240.1.0/24", "wg7")})), prune=True)
    assert dp.writes()[-1] == ("vxlan", "delete", "vx7")
    assert dp.vxlan.have == {}


def test_vxlan_device_and_entries_before_routes(dp: Dataplane, clock: Clock,
                                               records: dict[str, NodeRecord]) -> None:
    want = overlay_only(planned(records, "vxlan"))
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)

    res = rec.reconcile(want, prune=True)

    assert res.errors == 0
    assert dp.log[0] == ("link_exists", "wm0")
    assert dp.order() == [("mtu", "update"), ("vxlan", "update"), ("fdb", "update"), ("neighbour", "update"),
                          ("pod-mtu", "update"), ("route", "update")]
    assert dp.writes("mtu") == [("mtu", "update", "wm0", 1420)]  # grows before traffic moves into VXLAN
    assert dp.vxlan.have == {"wm-vxlan": want.vxlan}
    assert dp.fdb.have == dict(want.fdb) and dp.neighbours.have == dict(want.neighbours)
    assert dp.writes("pod-mtu") == [("pod-mtu", "update", "pods", 1370)]
    assert set(dp.routes.have.values()) == want.routes
    assert res.routes_added == len(want.routes)
    assert {o.kind for o in rec.objects() if o.state == "done"} == {"mtu", "vxlan", "fdb", "neighbour",
                                                                    "pod-mtu", "route"}


def test_vxlan_entries_are_not_pruned_before_first_sync(dp: Dataplane, clock: Clock,
                                                        records: dict[str, NodeRecord]) -> None:
    want = overlay_only(planned(records, "vxlan"))
    assert want.vxlan is not None
    dp.vxlan.have["wm-vxlan"] = want.vxlan
    dp.fdb.have["0a:58:0a:f0:09:01"] = "10.240.9.1"
    dp.neighbours.have["10.240.9.0"] = "0a:58:0a:f0:09:01"
    dp.routes.have["10.240.9.0/24"] = Route("10.240.9.0/24", "wm-vxlan", "10.240.9.0")
    rec = dp.reconciler(FakeDevice(), clock)

    rec.reconcile(want, prune=False)
    assert [c for c in dp.writes() if c[1] == "delete"] == []

    rec.reconcile(want, prune=True)
    assert sorted(c[:3] for c in dp.writes() if c[1] == "delete") == [
        ("fdb", "delete", "0a:58:0a:f0:09:01"), ("neighbour", "delete", "10.240.9.0"),
        ("route", "delete", "10.240.9.0/24")]


def test_wireguard_mode_deletes_vxlan_device_after_routes(dp: Dataplane, clock: Clock,
                                                          records: dict[str, NodeRecord]) -> None:
    vx = planned(records, "vxlan").vxlan
    assert vx is not None
    dp.vxlan.have["wm-vxlan"] = vx  # left from vxlan mode, with a route through it
    dp.routes.have["10.240.2.0/24"] = Route("10.240.2.0/24", "wm-vxlan", "10.240.2.0")
    want = overlay_only(planned(records))
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)

    rec.reconcile(want, prune=True)

    assert dp.order() == [
        ("mtu", "update"),
        ("pod-mtu", "update"),  # the first pod MTU ever: before the routes
        ("route", "update"),
        ("vxlan", "delete"),  # only once no route uses it
    ]
    assert dp.writes("pod-mtu") == [("pod-mtu", "update", "pods", 1420)]
    assert set(dp.routes.have.values()) == want.routes and dp.vxlan.have == {}


def test_vxlan_device_is_kept_before_first_sync(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord]) -> None:
    # Deleting it is a prune: an agent restart must not tear down the overlay before it knows the mode.
    vx = planned(records, "vxlan").vxlan
    dp.vxlan.have["wm-vxlan"] = vx
    rec = dp.reconciler(FakeDevice(), clock)
    rec.reconcile(overlay_only(planned(records)), prune=False)
    assert dp.writes("vxlan") == []
    assert dp.vxlan.have == {"wm-vxlan": vx}


def test_switch_to_vxlan_lowers_pod_mtu_before_routes(dp: Dataplane, clock: Clock,
                                                     records: dict[str, NodeRecord]) -> None:
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    rec.reconcile(overlay_only(planned(records)), prune=True)
    dp.log.clear()

    want = overlay_only(planned(records, "vxlan"))
    rec.reconcile(want, prune=True)

    assert dp.order() == [("vxlan", "update"), ("fdb", "update"), ("neighbour", "update"), ("pod-mtu", "update"),
                          ("route", "update")]  # each /24 moved in one step, the VTEP /32s added
    assert dp.writes("pod-mtu") == [("pod-mtu", "update", "pods", 1370)]
    assert set(dp.routes.have.values()) == want.routes


def test_switch_to_wireguard_raises_pod_mtu_and_deletes_vxlan_after_routes(
        dp: Dataplane, clock: Clock, records: dict[str, NodeRecord]) -> None:
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    rec.reconcile(overlay_only(planned(records, "vxlan")), prune=True)
    dp.log.clear()

    want = overlay_only(planned(records))
    rec.reconcile(want, prune=True)

    assert dp.log[0] == ("link_exists", "wm0")
    assert dp.writes("mtu") == []  # the WireGuard MTU is already 1420: read, not written
    assert dp.order() == [("route", "update"), ("route", "delete"), ("vxlan", "delete"),
                          ("pod-mtu", "update")]  # raised only once traffic has left VXLAN
    assert dp.writes("pod-mtu") == [("pod-mtu", "update", "pods", 1420)]
    assert set(dp.routes.have.values()) == want.routes


def test_switch_to_vxlan_grows_wireguard_mtu_before_anything(dp: Dataplane, clock: Clock,
                                                             records: dict[str, NodeRecord]) -> None:
    # With a fixed pod MTU, VXLAN needs a WireGuard MTU 50 bytes larger: it grows first.
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    rec.reconcile(overlay_only(planned(records, mtu=1400)), prune=True)
    assert dp.mtu.have["wm0"] == 1400
    dp.log.clear()

    rec.reconcile(overlay_only(planned(records, "vxlan", mtu=1400)), prune=True)

    assert dp.order()[:2] == [("mtu", "update"), ("vxlan", "update")]
    assert dp.writes("mtu") == [("mtu", "update", "wm0", 1450)]
    assert all(w[3] == 1400 for w in dp.writes("pod-mtu"))  # 1400 in both modes


def test_switch_to_wireguard_shrinks_wireguard_mtu_after_routes(dp: Dataplane, clock: Clock,
                                                                records: dict[str, NodeRecord]) -> None:
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    rec.reconcile(overlay_only(planned(records, "vxlan", mtu=1400)), prune=True)
    dp.log.clear()

    rec.reconcile(overlay_only(planned(records, mtu=1400)), prune=True)

    assert dp.order(ignore=["pod-mtu"]) == [("route", "update"), ("route", "delete"), ("vxlan", "delete"),
                                            ("mtu", "update")]
    assert dp.writes("mtu") == [("mtu", "update", "wm0", 1400)]


@pytest.mark.parametrize("full", [False, True])
def test_unchanged_pod_mtu_is_still_applied_after_routes(dp: Dataplane, clock: Clock,
                                                         records: dict[str, NodeRecord], full: bool) -> None:
    # Same pod MTU, other routes (or a full pass): it is handed on again, since pods may have
    # appeared (or drifted) since; after the routes.
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    want = overlay_only(planned(records))
    rec.reconcile(want, prune=True)
    dp.log.clear()

    if full:
        rec.reconcile(want, prune=True, full=True)
        assert dp.reads("route") == 1
    else:
        rec.reconcile(replace(want, routes=want.routes - {Route("10.240.3.0/24", "wm0")}), prune=True)
        assert dp.writes("route") == [("route", "delete", "10.240.3.0/24")]

    assert dp.writes("pod-mtu") == [("pod-mtu", "update", "pods", 1420)]
    assert dp.log.index(("route", "read")) < dp.log.index(("pod-mtu", "update", "pods", 1420))


def test_no_pod_mtu_callback_means_no_pod_mtu(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord]) -> None:
    rec = dp.reconciler(FakeDevice(), clock)
    res = rec.reconcile(overlay_only(planned(records, "vxlan")), prune=True)
    assert res.errors == 0 and dp.writes("pod-mtu") == []
    assert "pod-mtu" not in {o.kind for o in rec.objects()}


def test_refused_pod_mtu_is_an_error_object_and_routes_still_land(dp: Dataplane, clock: Clock,
                                                                  records: dict[str, NodeRecord]) -> None:
    dp.pod_mtu_error = TunnelError("pod MTU: Operation not permitted", errno.EPERM)
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    want = overlay_only(planned(records))
    res = rec.reconcile(want, prune=True)
    assert res.errors == 1 and errors(rec) == [("pod-mtu", "pods", "pod MTU: Operation not permitted")]
    assert set(dp.routes.have.values()) == want.routes

    dp.pod_mtu_error = None
    clock.now = rec.next_retry() or 0.0
    rec.reconcile(want, prune=True)
    assert errors(rec) == [] and dp.writes("pod-mtu")[-1] == ("pod-mtu", "update", "pods", 1420)


def test_wireguard_mtu_only_when_known_and_device_exists(dp: Dataplane, clock: Clock,
                                                         records: dict[str, NodeRecord]) -> None:
    rec = dp.reconciler(FakeDevice(), clock)
    rec.reconcile(overlay_only(planned(records, underlay_mtu=None)), prune=False)
    assert dp.writes("mtu") == [] and ("link_exists", "wm0") not in dp.log

    dp.log.clear()
    dp.links.clear()
    rec.reconcile(overlay_only(planned(records)), prune=False)
    assert dp.log[0] == ("link_exists", "wm0") and dp.writes("mtu") == []


def test_refused_vxlan_device_keeps_routes_where_they_are(dp: Dataplane, clock: Clock,
                                                          records: dict[str, NodeRecord]) -> None:
    # Routes must not move into a VXLAN device that is not there; its entries wait for it too.
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    rec.reconcile(overlay_only(planned(records)), prune=True)
    dp.vxlan.refuse("wm-vxlan", "wm-vxlan: add vxlan: Address already in use")
    dp.log.clear()

    want = overlay_only(planned(records, "vxlan"))
    res = rec.reconcile(want, prune=True)

    assert res.errors >= 1
    assert ("vxlan", "wm-vxlan", "wm-vxlan: add vxlan: Address already in use") in errors(rec)
    assert dp.fdb.have == {} and dp.neighbours.have == {}
    assert dp.routes.have["10.240.2.0/24"] == Route("10.240.2.0/24", "wm0")
    assert dp.routes.have["10.240.3.0/24"] == Route("10.240.3.0/24", "wm0")

    # At the retry the device comes, then its entries, then the routes move: in one pass.
    dp.vxlan.allow("wm-vxlan")
    clock.now = rec.next_retry() or 0.0
    dp.log.clear()
    res = rec.reconcile(want, prune=True)
    assert res.errors == 0 and errors(rec) == []
    order = dp.order()
    assert order.index(("vxlan", "update")) < order.index(("fdb", "update")) < order.index(("route", "update"))
    assert order.index(("neighbour", "update")) < order.index(("route", "update"))
    assert set(dp.routes.have.values()) == want.routes


@pytest.mark.parametrize("kind", ["fdb", "neighbour"])
def test_failing_vxlan_entry_does_not_block_routes(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord],
                                                   kind: str) -> None:
    want = overlay_only(planned(records, "vxlan"))
    target = dp.fdb if kind == "fdb" else dp.neighbours
    entries = dict(want.fdb if kind == "fdb" else want.neighbours)
    bad = min(entries)
    target.refuse(bad, f"wm-vxlan: {kind} {bad}: Operation not permitted")
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)

    res = rec.reconcile(want, prune=True)

    assert res.errors == 1
    assert errors(rec) == [(kind, bad, f"wm-vxlan: {kind} {bad}: Operation not permitted")]
    assert set(dp.routes.have.values()) == want.routes  # every route programmed
    assert target.have == {k: v for k, v in entries.items() if k != bad}  # and the other entries

    target.allow(bad)
    clock.now = rec.next_retry() or 0.0
    res = rec.reconcile(want, prune=True)
    assert res.errors == 0 and target.have == entries


def test_route_failure_leaves_vxlan_device_and_raised_pod_mtu_alone(dp: Dataplane, clock: Clock,
                                                                    records: dict[str, NodeRecord]) -> None:
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    rec.reconcile(overlay_only(planned(records, "vxlan")), prune=True)
    dp.log.clear()
    dp.routes.refuse("10.240.2.0/24", "wm0: route 10.240.2.0/24: Invalid argument")

    res = rec.reconcile(overlay_only(planned(records)), prune=True)

    assert res.errors == 1
    assert "wm-vxlan" in dp.vxlan.have  # a route may still point into it, so the device stays
    assert dp.routes.have["10.240.2.0/24"].ifname == "wm-vxlan"  # and so does that route
    assert dp.writes("pod-mtu") == []  # and pods stay small while traffic may still be in VXLAN


def test_fdb_error_is_dropped_when_leaving_vxlan_mode(dp: Dataplane, clock: Clock,
                                                      records: dict[str, NodeRecord]) -> None:
    # The VXLAN device went, and its entries with it: an FDB entry that failed before is not
    # wanted any more. Kept in error, it would keep next_retry() in the past: the loop would spin.
    want = overlay_only(planned(records, "vxlan"))
    bad = min(want.fdb)
    dp.fdb.refuse(bad)
    rec = dp.reconciler(FakeDevice(), clock)
    rec.reconcile(want, prune=True)
    assert [e[0] for e in errors(rec)] == ["fdb"]

    clock.now += 10
    rec.reconcile(overlay_only(planned(records)), prune=True)

    assert dp.vxlan.have == {}
    assert errors(rec) == []
    assert rec.next_retry() is None
    assert not {o.kind for o in rec.objects()} & {"fdb", "neighbour", "vxlan"}


# --- when the overlay is synced --------------------------------------------------------------


def test_unchanged_overlay_is_skipped_then_full_pass_reads_it(dp: Dataplane, clock: Clock,
                                                              records: dict[str, NodeRecord]) -> None:
    want = planned(records, "vxlan")
    rec = dp.reconciler(FakeDevice(), clock)  # the pod MTU on full passes: test_unchanged_pod_mtu_...
    rec.reconcile(want, prune=True)
    dp.log.clear()

    rec.reconcile(want, prune=True)
    assert dp.log == []

    rec.reconcile(want, prune=True, full=True)  # catches drift nobody announced
    assert {c[0] for c in dp.log if c[1:] == ("read",)} == {"mtu", "vxlan", "fdb", "neighbour", "route"}
    assert dp.writes() == []  # nothing drifted: nothing written
    dp.log.clear()

    rec.reconcile(want, prune=True)
    assert dp.log == []

    del dp.routes.have["10.240.3.0/24"]  # `ip route del` by hand
    del dp.fdb.have[min(want.fdb)]
    rec.reconcile(want, prune=True)
    assert dp.log == []
    rec.reconcile(want, prune=True, full=True)
    assert sorted(c[:3] for c in dp.writes()) == [("fdb", "update", min(want.fdb)),
                                                  ("route", "update", "10.240.3.0/24")]


def test_unchanged_overlay_is_skipped_while_removals_are_held(dp: Dataplane, clock: Clock,
                                                              records: dict[str, NodeRecord]) -> None:
    """Before the first sync or after an outage (no pruning), an unchanged overlay is not read
    again on every pass (with a 10-node rotation that made passes of 100-200 ms)."""
    want = planned(records, "vxlan")
    dp.routes.have["10.240.9.0/24"] = Route("10.240.9.0/24", "wm0")
    rec = dp.reconciler(FakeDevice(), clock)
    rec.reconcile(want, prune=False)
    rec.reconcile(want, prune=False)
    assert dp.reads("route") == 1

    # The first pass that may prune syncs, even though the desired overlay did not change.
    rec.reconcile(want, prune=True)
    assert dp.reads("route") == 2
    assert dp.writes("route")[-1] == ("route", "delete", "10.240.9.0/24")


@pytest.mark.parametrize("change", ["routes", "vxlan", "fdb", "neighbours", "mtu", "pod_mtu"])
def test_any_overlay_change_is_synced(dp: Dataplane, clock: Clock, records: dict[str, NodeRecord],
                                      change: str) -> None:
    want = planned(records, "vxlan")
    assert want.vxlan is not None
    options: dict[str, dict[str, Any]] = {
        "routes": {"routes": want.routes - {Route("10.240.3.1/32", "wm0")}},
        "vxlan": {"vxlan": replace(want.vxlan, vni=7)},
        "fdb": {"fdb": {**want.fdb, "0a:58:0a:f0:09:01": "10.240.9.1"}},
        "neighbours": {"neighbours": {**want.neighbours, "10.240.9.0": "0a:58:0a:f0:09:01"}},
        "mtu": {"mtu": 1400},
        "pod_mtu": {"pod_mtu": 1350},
    }
    changed = options[change]
    written: tuple[Any, ...] = {
        "routes": ("route", "delete", "10.240.3.1/32"),
        "vxlan": ("vxlan", "update", "wm-vxlan", replace(want.vxlan, vni=7)),
        "fdb": ("fdb", "update", "0a:58:0a:f0:09:01", "10.240.9.1"),
        "neighbours": ("neighbour", "update", "10.240.9.0", "0a:58:0a:f0:09:01"),
        "mtu": ("mtu", "update", "wm0", 1400),
        "pod_mtu": ("pod-mtu", "update", "pods", 1350),
    }[change]
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    rec.reconcile(want, prune=True)
    dp.log.clear()

    rec.reconcile(replace(want, **changed), prune=True)

    assert dp.reads("route") == 1
    assert written in dp.writes()
    assert [w for w in dp.writes() if w != written and w[0] != "pod-mtu"] == []  # only what changed


def test_peer_change_alone_does_not_resync_overlay(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    rec.reconcile(desired(peer(K1, 1)), prune=True)
    dp.log.clear()

    res = rec.reconcile(desired(peer(K1, 1, endpoint="198.51.100.1:51820")), prune=True)

    assert res.updated == 1
    assert dp.log == []


def test_failed_overlay_is_retried_although_unchanged(dp: Dataplane, clock: Clock,
                                                      records: dict[str, NodeRecord]) -> None:
    want = planned(records, "vxlan")
    bad = min(want.fdb)
    dp.fdb.refuse(bad, "wm-vxlan: fdb: Operation not permitted")
    rec = dp.reconciler(FakeDevice(), clock)
    assert rec.reconcile(want, prune=True).errors == 1

    dp.fdb.allow(bad)
    clock.now = rec.next_retry() or 0.0  # the loop wakes for it: neither a change nor a full pass
    dp.log.clear()
    res = rec.reconcile(want, prune=True)
    assert res.errors == 0 and dp.writes() == [("fdb", "update", bad, want.fdb[bad])]

    dp.log.clear()
    rec.reconcile(want, prune=True)
    assert dp.log == []


def test_forget_overlay_makes_next_pass_read_everything(dp: Dataplane, clock: Clock,
                                                        records: dict[str, NodeRecord]) -> None:
    want = planned(records, "vxlan")
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    rec.reconcile(want, prune=True)
    dp.log.clear()
    # The device was created again (empty), and the VXLAN device with its routes went with it.
    dev.peers.clear()
    dp.vxlan.delete("wm-vxlan", want.vxlan)
    dp.log.clear()
    shows = dev.shows

    rec.forget_overlay()
    rec.reconcile(want, prune=True)

    assert dev.shows == shows + 1
    assert {p.public_key for p in want.peers.values()} == set(dev.peers)
    assert ("vxlan", "update", "wm-vxlan", want.vxlan) in dp.writes()
    assert set(dp.routes.have.values()) == want.routes


def test_objects_cover_every_kind_and_snapshot_only_peers(dp: Dataplane, clock: Clock,
                                                          records: dict[str, NodeRecord]) -> None:
    want = planned(records, "vxlan")
    rec = dp.reconciler(FakeDevice(), clock, pod_mtu=True)
    rec.reconcile(want, prune=True)
    assert {o.kind for o in rec.objects()} == {"peer", "route", "vxlan", "fdb", "neighbour", "mtu", "pod-mtu"}
    assert all(o.state == "done" for o in rec.objects())
    assert set(rec.snapshot()) == set(want.peers) == {N2, N3}


def test_a_node_gone_while_pruning_is_held_comes_back_without_a_device_write(dp: Dataplane, clock: Clock) -> None:
    """A remote cluster's Consul back without its records for a moment: its nodes leave the
    desired state and come back as they were. The device keeps them (pruning held), and the
    reconciler remembers them as they are there: their return writes nothing."""
    dev = FakeDevice()
    rec = dp.reconciler(dev, clock)
    rec.reconcile(desired(peer(K1, 1), peer(K2, 2)), prune=True)
    rec.reconcile(desired(peer(K1, 1)), prune=False)  # K2's node gone, pruning held: kept
    assert K2 in dev.peers
    dev.calls.clear()
    res = rec.reconcile(desired(peer(K1, 1), peer(K2, 2)), prune=False)
    assert dev.calls == [] and (res.added, res.updated, res.removed) == (0, 0, 0)
    rec.reconcile(desired(peer(K1, 1)), prune=True)  # gone for good, pruning allowed: removed
    assert K2 not in dev.peers
