"""agent.reconciler and DesiredState.kept: what belongs to unseen federated clusters survives pruning."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tests.unit.test_reconciler import (
    K1,
    K2,
    N1,
    STRAY,
    Clock,
    Dataplane,
    FakeDevice,
    _key,
    desired,
    make_dataplane,
    peer,
)
from wiremesh.agent.planner import DesiredState
from wiremesh.tunnels import PeerStatus, Route

FOREIGN = _key(20)  # a peer of another cluster (10.241.0.0/16)
FOREIGN2 = _key(21)  # a peer of a third cluster (10.242.0.0/16)
LOCAL_RANGE = "10.240.0.0/16"


@pytest.fixture
def dp(monkeypatch: pytest.MonkeyPatch) -> Dataplane:
    return make_dataplane(monkeypatch)


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


def routes_on_the_kernel(dp: Dataplane) -> None:
    """The routes of `device()`'s peers, as an earlier agent left them."""
    for cidr in ("10.240.99.0/24", "10.241.5.0/24", "10.242.5.0/24"):
        dp.routes.have[cidr] = Route(cidr, "wm0")


def want(**kw: Any) -> DesiredState:
    return replace(desired(peer(K1, 1)), local_range=LOCAL_RANGE, **kw)


def test_peer_inside_keep_cidrs_survives_pruning(dp: Dataplane, clock: Clock) -> None:
    dev = device()
    res = dp.reconciler(dev, clock).reconcile(want(keep_cidrs=frozenset({"10.241.0.0/16"})), prune=True)
    assert set(dev.peers) == {K1, FOREIGN}
    assert res.removed == 2 and res.errors == 0


def test_keep_foreign_keeps_every_peer_outside_the_local_range(dp: Dataplane, clock: Clock) -> None:
    dev = device()
    res = dp.reconciler(dev, clock).reconcile(want(keep_foreign=True), prune=True)
    assert set(dev.peers) == {K1, FOREIGN, FOREIGN2}
    assert res.removed == 1


def test_without_keep_everything_not_desired_is_pruned(dp: Dataplane, clock: Clock) -> None:
    dev = device()
    res = dp.reconciler(dev, clock).reconcile(want(), prune=True)
    assert set(dev.peers) == {K1}
    assert res.removed == 3


def test_a_peer_is_kept_if_any_of_its_allowed_ips_is(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice(peers=[on_device(STRAY, "10.240.99.0/24", "10.241.5.0/24")])
    dp.reconciler(dev, clock).reconcile(want(keep_cidrs=frozenset({"10.241.0.0/16"})), prune=True)
    assert STRAY in dev.peers


def test_peer_without_allowed_ips_is_not_kept(dp: Dataplane, clock: Clock) -> None:
    dev = FakeDevice(peers=[on_device(STRAY)])
    dp.reconciler(dev, clock).reconcile(want(keep_foreign=True), prune=True)
    assert STRAY not in dev.peers


def test_kept_peer_is_left_untouched_and_has_no_status(dp: Dataplane, clock: Clock) -> None:
    dev = device()
    routes_on_the_kernel(dp)
    rec = dp.reconciler(dev, clock)
    rec.reconcile(want(keep_foreign=True), prune=True)
    assert dev.touched(FOREIGN) == 0 and dev.touched(FOREIGN2) == 0
    assert set(rec.snapshot()) == {N1}
    assert dev.peers[FOREIGN] == on_device(FOREIGN, "10.241.5.0/24")
    assert {o.key for o in rec.objects() if o.kind == "route"} == {"10.240.1.0/24"}  # kept routes: no status
    assert {"10.241.5.0/24", "10.242.5.0/24"} <= set(dp.routes.have)


@pytest.mark.parametrize("full", [False, True])
def test_kept_peer_goes_once_it_is_no_longer_kept(dp: Dataplane, clock: Clock, full: bool) -> None:
    dev = device()
    routes_on_the_kernel(dp)
    rec = dp.reconciler(dev, clock)
    rec.reconcile(want(keep_cidrs=frozenset({"10.241.0.0/16", "10.242.0.0/16"})), prune=True)
    assert {FOREIGN, FOREIGN2} <= set(dev.peers)

    # The remote cluster 10.242/16 has been seen (and left): its peer and route go, the others
    # are still kept. Federation only wakes the loop: this need not be a full pass.
    res = rec.reconcile(want(keep_cidrs=frozenset({"10.241.0.0/16"})), prune=True, full=full)
    assert set(dp.routes.have) == {"10.240.1.0/24", "10.241.5.0/24"}
    assert set(dev.peers) == {K1, FOREIGN} and res.removed == 1


@pytest.mark.parametrize("full", [False, True])
def test_kept_peer_becomes_desired_later(dp: Dataplane, clock: Clock, full: bool) -> None:
    dev = device()
    rec = dp.reconciler(dev, clock)
    rec.reconcile(want(keep_foreign=True), prune=True)
    remote = replace(peer(FOREIGN, 5), allowed_ips=frozenset({"10.241.5.0/24"}))
    d = replace(desired(peer(K1, 1), nodes={"other/n5": remote}), local_range=LOCAL_RANGE)

    res = rec.reconcile(d, prune=True, full=full)

    assert set(dev.peers) == {K1, FOREIGN}  # FOREIGN2 is no longer kept
    assert res.removed == 1
    # The peer is already there as it should be; its endpoint is the one it has (it may have
    # roamed, and nothing remembers another), as after a restart: adopted without a write.
    assert dev.touched(FOREIGN) == 0 and res.added == res.updated == 0
    assert dev.peers[FOREIGN].endpoint == "198.51.100.9:51820"
    assert rec.snapshot()["other/n5"].state == "done"


def test_no_prune_keeps_everything_anyway(dp: Dataplane, clock: Clock) -> None:
    dev = device()
    routes_on_the_kernel(dp)
    res = dp.reconciler(dev, clock).reconcile(want(), prune=False)
    assert set(dev.peers) == {K1, STRAY, FOREIGN, FOREIGN2} and res.removed == 0
    assert {"10.240.99.0/24", "10.241.5.0/24", "10.242.5.0/24"} <= set(dp.routes.have)


def test_routes_are_pruned_except_kept_ones(dp: Dataplane, clock: Clock) -> None:
    routes_on_the_kernel(dp)
    d = want(keep_cidrs=frozenset({"10.241.0.0/16"}))
    res = dp.reconciler(device(), clock).reconcile(d, prune=True)
    assert set(dp.routes.have) == {"10.240.1.0/24", "10.241.5.0/24"}
    assert res.routes_removed == 2
    assert sorted(c[2] for c in dp.writes("route") if c[1] == "delete") == ["10.240.99.0/24", "10.242.5.0/24"]


@pytest.mark.parametrize(("before", "after", "gone"), [
    ({"keep_cidrs": frozenset({"10.241.0.0/16", "10.242.0.0/16"})}, {"keep_cidrs": frozenset({"10.241.0.0/16"})},
     {"10.242.5.0/24"}),
    ({"keep_foreign": True}, {"keep_foreign": False}, {"10.241.5.0/24", "10.242.5.0/24"}),
])
def test_a_change_of_what_is_kept_resyncs_routes(dp: Dataplane, clock: Clock, before: dict[str, Any],
                                                 after: dict[str, Any], gone: set[str]) -> None:
    # Once a remote is seen (or the mesh known), its routes may be pruned: the overlay must be re-read.
    routes_on_the_kernel(dp)
    d = want(**before)
    rec = dp.reconciler(device(), clock)
    rec.reconcile(d, prune=True)
    rec.reconcile(d, prune=True)
    assert dp.reads("route") == 1
    assert gone <= set(dp.routes.have)

    rec.reconcile(want(**after), prune=True)
    assert dp.reads("route") == 2
    assert not gone & set(dp.routes.have)


def test_other_tests_fake_device_still_prunes_as_before(dp: Dataplane, clock: Clock) -> None:
    # The plain `desired` helper has no local range and keeps nothing.
    dev = FakeDevice(peers=[on_device(FOREIGN, "10.241.5.0/24")])
    dp.reconciler(dev, clock).reconcile(desired(peer(K2, 2)), prune=True)
    assert set(dev.peers) == {K2}
