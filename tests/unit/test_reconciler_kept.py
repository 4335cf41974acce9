"""agent.reconciler and DesiredState.kept: what belongs to unseen federated clusters survives pruning."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest

import wiremesh.agent.reconciler
from wiremesh.agent.planner import DesiredState
from wiremesh.agent.reconciler import Reconciler
from tests.unit.test_reconciler import (
    K1,
    K2,
    KERNEL_FUNCTIONS,
    STRAY,
    Clock,
    Dataplane,
    FakeDevice,
    _key,
    desired,
    peer,
)
from wiremesh.tunnels import PeerStatus, Route

FOREIGN = _key(20)  # a peer of another cluster (10.241.0.0/16)
FOREIGN2 = _key(21)  # a peer of a third cluster (10.242.0.0/16)
LOCAL_RANGE = "10.240.0.0/16"


class KeepDataplane(Dataplane):
    """The recording dataplane, also keeping the `keep` predicate handed to sync_routes."""

    def __init__(self) -> None:
        super().__init__()
        self.keeps: list[Any] = []

    def sync_routes(self, desired: Iterable[Route], *, devices: Iterable[str], prune: bool,
                    keep: Any = None) -> tuple[int, int]:
        self.keeps.append(keep)
        return super().sync_routes(desired, devices=devices, prune=prune, keep=keep)


@pytest.fixture
def dp(monkeypatch: pytest.MonkeyPatch) -> KeepDataplane:
    d = KeepDataplane()
    for name in KERNEL_FUNCTIONS:
        monkeypatch.setattr(wiremesh.agent.reconciler, name, getattr(d, name))
    return d


@pytest.fixture
def clock() -> Clock:
    return Clock()


def on_device(key: str, *cidrs: str) -> PeerStatus:
    return PeerStatus(public_key=key, endpoint="198.51.100.9:51820", allowed_ips=frozenset(cidrs))


def device() -> FakeDevice:
    return FakeDevice(peers=[
        on_device(STRAY, "10.240.99.0/24"),  # a stale local peer
        on_device(FOREIGN, "10.241.5.0/24"),
        on_device(FOREIGN2, "10.242.5.0/24"),
    ])


def want(**kw: Any) -> DesiredState:
    return replace(desired(peer(K1, 1)), local_range=LOCAL_RANGE, **kw)


def test_peer_inside_keep_cidrs_survives_pruning(dp: KeepDataplane, clock: Clock) -> None:
    dev = device()
    res = Reconciler(dev, clock=clock).reconcile(want(keep_cidrs=frozenset({"10.241.0.0/16"})), prune=True)
    assert set(dev.peers) == {K1, FOREIGN}
    assert res.removed == 2 and res.errors == 0


def test_keep_foreign_keeps_every_peer_outside_the_local_range(dp: KeepDataplane, clock: Clock) -> None:
    dev = device()
    res = Reconciler(dev, clock=clock).reconcile(want(keep_foreign=True), prune=True)
    assert set(dev.peers) == {K1, FOREIGN, FOREIGN2}
    assert res.removed == 1


def test_without_keep_everything_not_desired_is_pruned(dp: KeepDataplane, clock: Clock) -> None:
    dev = device()
    res = Reconciler(dev, clock=clock).reconcile(want(), prune=True)
    assert set(dev.peers) == {K1}
    assert res.removed == 3


def test_a_peer_is_kept_if_any_of_its_allowed_ips_is(dp: KeepDataplane, clock: Clock) -> None:
    dev = FakeDevice(peers=[on_device(STRAY, "10.240.99.0/24", "10.241.5.0/24")])
    Reconciler(dev, clock=clock).reconcile(want(keep_cidrs=frozenset({"10.241.0.0/16"})), prune=True)
    assert STRAY in dev.peers


def test_peer_without_allowed_ips_is_not_kept(dp: KeepDataplane, clock: Clock) -> None:
    dev = FakeDevice(peers=[on_device(STRAY)])
    Reconciler(dev, clock=clock).reconcile(want(keep_foreign=True), prune=True)
    assert STRAY not in dev.peers


def test_kept_peer_is_left_untouched_and_has_no_status(dp: KeepDataplane, clock: Clock) -> None:
    dev = device()
    rec = Reconciler(dev, clock=clock)
    rec.reconcile(want(keep_foreign=True), prune=True)
    assert dev.touched(FOREIGN) == 0 and dev.touched(FOREIGN2) == 0
    assert set(rec.status) == {K1}
    assert dev.peers[FOREIGN] == on_device(FOREIGN, "10.241.5.0/24")


def test_kept_peer_goes_once_it_is_no_longer_kept(dp: KeepDataplane, clock: Clock) -> None:
    dev = device()
    rec = Reconciler(dev, clock=clock)
    rec.reconcile(want(keep_cidrs=frozenset({"10.241.0.0/16", "10.242.0.0/16"})), prune=True)
    assert {FOREIGN, FOREIGN2} <= set(dev.peers)

    # The remote cluster 10.242/16 has been seen (and left): its peer goes, the other is still kept.
    res = rec.reconcile(want(keep_cidrs=frozenset({"10.241.0.0/16"})), prune=True)
    assert set(dev.peers) == {K1, FOREIGN} and res.removed == 1


def test_kept_peer_becomes_desired_later(dp: KeepDataplane, clock: Clock) -> None:
    dev = device()
    rec = Reconciler(dev, clock=clock)
    rec.reconcile(want(keep_foreign=True), prune=True)
    remote = replace(peer(FOREIGN, 5), allowed_ips=frozenset({"10.241.5.0/24"}))
    d = replace(desired(peer(K1, 1), remote), local_range=LOCAL_RANGE)

    res = rec.reconcile(d, prune=True)

    assert set(dev.peers) == {K1, FOREIGN}  # FOREIGN2 is no longer kept
    assert res.updated == 1 and res.removed == 1
    assert dev.peers[FOREIGN].endpoint == "192.0.2.5:51820"
    assert rec.status[FOREIGN].state == "done"


def test_no_prune_keeps_everything_anyway(dp: KeepDataplane, clock: Clock) -> None:
    dev = device()
    res = Reconciler(dev, clock=clock).reconcile(want(), prune=False)
    assert set(dev.peers) == {K1, STRAY, FOREIGN, FOREIGN2} and res.removed == 0


def test_routes_are_synced_with_the_keep_predicate(dp: KeepDataplane, clock: Clock) -> None:
    d = want(keep_cidrs=frozenset({"10.241.0.0/16"}))
    Reconciler(device(), clock=clock).reconcile(d, prune=True)
    assert len(dp.keeps) == 1
    keep = dp.keeps[0]
    assert keep("10.241.5.0/24") and not keep("10.242.5.0/24") and not keep("10.240.99.0/24")


@pytest.mark.parametrize("change", [{"keep_cidrs": frozenset({"10.242.0.0/16"})}, {"keep_foreign": False}])
def test_a_change_of_what_is_kept_resyncs_routes(dp: KeepDataplane, clock: Clock, change: dict[str, Any]) -> None:
    # Once a remote is seen (or the mesh known), its routes may be pruned: the overlay must be re-read.
    d = want(keep_cidrs=frozenset({"10.241.0.0/16"}), keep_foreign=True)
    rec = Reconciler(device(), clock=clock)
    rec.reconcile(d, prune=True)
    rec.reconcile(d, prune=True)
    assert len(dp.route_calls()) == 1

    rec.reconcile(replace(d, **change), prune=True)
    assert len(dp.route_calls()) == 2


def test_other_tests_fake_device_still_prunes_as_before(dp: KeepDataplane, clock: Clock) -> None:
    # The plain `desired` helper has no local range and keeps nothing.
    dev = FakeDevice(peers=[on_device(FOREIGN, "10.241.5.0/24")])
    Reconciler(dev, clock=clock).reconcile(desired(peer(K2, 2)), prune=True)
    assert set(dev.peers) == {K2}
