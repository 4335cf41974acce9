"""agent.reconciler: smallest-diff programming, per-peer status and backoff, no prune before first sync."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest

import agent.reconciler
from agent.planner import DesiredState
from agent.reconciler import BACKOFF_MIN, Reconciler
from keys import PrivateKey
from tunnels import DeviceState, PeerChange, PeerConfig, PeerStatus, TunnelError, WireGuardDevice


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


class Routes:
    """Stands in for tunnels.sync_routes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, frozenset[str], bool]] = []
        self.error: TunnelError | None = None

    def __call__(self, ifname: str, routes: Iterable[str], *, prune: bool) -> tuple[int, int]:
        self.calls.append((ifname, frozenset(routes), prune))
        if self.error:
            raise self.error
        return len(list(routes)), 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def routes(monkeypatch: pytest.MonkeyPatch) -> Routes:
    r = Routes()
    monkeypatch.setattr(agent.reconciler, "sync_routes", r)
    return r


@pytest.fixture
def clock() -> Clock:
    return Clock()


def peer(key: str, n: int, endpoint: str | None = None) -> PeerConfig:
    return PeerConfig(public_key=key, endpoint=endpoint or f"192.0.2.{n}:51820",
                      allowed_ips=frozenset({f"10.240.{n}.0/24"}))


def desired(*peers: PeerConfig) -> DesiredState:
    return DesiredState(
        peers={p.public_key: p for p in peers},
        routes=frozenset(cidr for p in peers for cidr in p.allowed_ips),
        peer_names={p.public_key: NAMES.get(p.public_key, "?") for p in peers},
    )


def test_adds_peers_and_routes(routes: Routes, clock: Clock) -> None:
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
    assert routes.calls == [("wm0", frozenset({"10.240.1.0/24", "10.240.2.0/24"}), False)]
    assert res.routes_added == 2


def test_second_pass_sends_nothing(routes: Routes, clock: Clock) -> None:
    dev = FakeDevice()
    rec = Reconciler(dev, clock=clock)
    want = desired(peer(K1, 1), peer(K2, 2))
    rec.reconcile(want, prune=True)
    dev.calls.clear()

    res = rec.reconcile(want, prune=True)

    assert dev.calls == []
    assert (res.added, res.updated, res.removed, res.errors, res.programmed) == (0, 0, 0, 0, 2)


def test_peer_already_on_device_is_done_without_a_write(routes: Routes, clock: Clock) -> None:
    p = peer(K1, 1)
    dev = FakeDevice(peers=[PeerStatus(public_key=K1, endpoint=p.endpoint, allowed_ips=p.allowed_ips)])
    rec = Reconciler(dev, clock=clock)
    res = rec.reconcile(desired(p), prune=False)
    assert dev.calls == []
    assert rec.status[K1].state == "done" and res.programmed == 1


def test_no_prune_before_first_sync_then_prunes(routes: Routes, clock: Clock) -> None:
    dev = FakeDevice(peers=[PeerStatus(public_key=STRAY, endpoint="192.0.2.99:51820",
                                       allowed_ips=frozenset({"10.240.99.0/24"}))])
    rec = Reconciler(dev, clock=clock)
    want = desired(peer(K1, 1))

    res = rec.reconcile(want, prune=False)
    assert STRAY in dev.peers and res.removed == 0
    assert routes.calls[-1][2] is False

    res = rec.reconcile(want, prune=True)
    assert STRAY not in dev.peers and res.removed == 1
    assert set(dev.peers) == {K1}
    assert routes.calls[-1] == ("wm0", frozenset({"10.240.1.0/24"}), True)


def test_endpoint_change_is_an_update(routes: Routes, clock: Clock) -> None:
    dev = FakeDevice()
    rec = Reconciler(dev, clock=clock)
    rec.reconcile(desired(peer(K1, 1)), prune=True)
    dev.calls.clear()

    res = rec.reconcile(desired(peer(K1, 1, endpoint="198.51.100.1:51820")), prune=True)

    assert res.updated == 1 and res.added == 0
    assert dev.calls == [[PeerChange(public_key=K1, endpoint="198.51.100.1:51820", update_only=True)]]
    assert dev.peers[K1].endpoint == "198.51.100.1:51820"


def test_failing_peer_gets_error_and_backoff_while_others_land(routes: Routes, clock: Clock) -> None:
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
    assert routes.calls  # routes still synced


def test_backoff_holds_then_retries_with_doubling_delay(routes: Routes, clock: Clock) -> None:
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


def test_changed_peer_clears_its_backoff(routes: Routes, clock: Clock) -> None:
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


def test_status_of_undesired_peer_dropped(routes: Routes, clock: Clock) -> None:
    dev = FakeDevice()
    rec = Reconciler(dev, clock=clock)
    rec.reconcile(desired(peer(K1, 1), peer(K2, 2)), prune=True)
    res = rec.reconcile(desired(peer(K1, 1)), prune=True)
    assert set(rec.status) == {K1}
    assert res.removed == 1 and res.programmed == 1
    assert set(dev.peers) == {K1}


def test_route_failure_is_counted_and_peers_still_programmed(routes: Routes, clock: Clock) -> None:
    routes.error = TunnelError("wm0: add route 10.240.1.0/24: File exists", errno.EEXIST)
    dev = FakeDevice()
    rec = Reconciler(dev, clock=clock)
    res = rec.reconcile(desired(peer(K1, 1)), prune=False)
    assert res.errors == 1 and res.programmed == 1
    assert res.failed == ["routes: wm0: add route 10.240.1.0/24: File exists"]
    assert K1 in dev.peers


def test_fake_device_is_a_real_wireguard_device() -> None:
    # The reconciler relies only on the public WireGuardDevice API (show/apply).
    dev: Any = FakeDevice()
    dev.apply([])
    assert dev.calls == []
