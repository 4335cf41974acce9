"""A record that vanished (a session lapsed while its agent restarted) keeps its node's tunnel for
a short hold (agent.departures, agent.planner.with_departed)."""

from __future__ import annotations

from collections.abc import Callable

from wiremesh.agent.departures import Departures
from wiremesh.agent.planner import plan_mesh, with_departed
from wiremesh.clustermesh import ClusterConfig, ClusterSnapshot, NodeRecord, Rejected, layout
from wiremesh.tunnels import Route

MakeNode = Callable[..., NodeRecord]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def snap(index: int, *recs: NodeRecord, rejected: tuple[str, ...] = ()) -> ClusterSnapshot:
    return ClusterSnapshot("lab", index, None, nodes={r.name: r for r in recs},
                           rejected=tuple(Rejected(layout.node_key("lab", n), "refused") for n in rejected))


def test_a_vanished_record_is_held_until_its_hold_ends(make_node: MakeNode) -> None:
    clock = Clock()
    d = Departures("lab", "n1", 4.0, clock)
    n1, n2, n3 = make_node("n1", "10.240.1.0/24"), make_node("n2", "10.240.2.0/24"), make_node("n3", "10.240.3.0/24")
    first = snap(1, n1, n2, n3)
    d.follow(None, first)
    assert d.held() == {} and d.next_end() is None
    gone = snap(2, n1, n2)
    d.follow(first, gone)
    assert d.held() == {"n3": n3} and d.next_end() == 104.0
    d.follow(gone, snap(3, n1, n2))  # still gone: the hold is not extended
    clock.t = 103.9
    assert d.held() == {"n3": n3}
    clock.t = 104.0
    assert d.held() == {} and d.next_end() is None


def test_a_record_back_within_its_hold_ends_it(make_node: MakeNode) -> None:
    d = Departures("lab", "n1", 4.0, Clock())
    n1, n3 = make_node("n1", "10.240.1.0/24"), make_node("n3", "10.240.3.0/24")
    d.follow(snap(1, n1, n3), snap(2, n1))
    assert set(d.held()) == {"n3"}
    d.follow(snap(2, n1), snap(3, n1, n3))
    assert d.held() == {}


def test_refused_records_and_this_node_are_never_held(make_node: MakeNode) -> None:
    d = Departures("lab", "n1", 4.0, Clock())
    n1, n2, n3 = make_node("n1", "10.240.1.0/24"), make_node("n2", "10.240.2.0/24"), make_node("n3", "10.240.3.0/24")
    # n3's record is still in Consul but refused now (revoked, badly signed): its tunnel goes at once.
    d.follow(snap(1, n1, n2, n3), snap(2, n2, rejected=("n3",)))
    assert d.held() == {}
    d.follow(snap(2, n1, n2), snap(3, n1))
    assert set(d.held()) == {"n2"}
    d.follow(snap(3, n1), snap(4, n1, rejected=("n2",)))  # refused while held: dropped
    assert d.held() == {}


def test_a_held_node_is_planned_as_before(cluster_config: ClusterConfig, make_node: MakeNode) -> None:
    n1, n2, n3 = make_node("n1", "10.240.1.0/24"), make_node("n2", "10.240.2.0/24"), make_node("n3", "10.240.3.0/24")
    before = plan_mesh("n1", n1.public_key, cluster_config, {"n1": n1, "n2": n2, "n3": n3}, local_pod_cidr=n1.pod_cidr)
    held = plan_mesh("n1", n1.public_key, cluster_config, with_departed({"n1": n1, "n2": n2}, {"n3": n3}),
                     local_pod_cidr=n1.pod_cidr)
    assert held.peers == before.peers and held.routes == before.routes
    assert Route("10.240.3.0/24", "wm0") in held.routes


def test_a_present_record_wins_over_a_held_one(make_node: MakeNode) -> None:
    n1, n3 = make_node("n1", "10.240.1.0/24"), make_node("n3", "10.240.3.0/24")
    # n3's CIDR leased again to n4, n3's key now n5's, n6's next key: each present record wins.
    n4 = make_node("n4", "10.240.3.0/24")
    assert with_departed({"n1": n1, "n4": n4}, {"n3": n3}) == {"n1": n1, "n4": n4}
    n5 = make_node("n5", "10.240.5.0/24", public_key=n3.public_key)
    assert with_departed({"n1": n1, "n5": n5}, {"n3": n3}) == {"n1": n1, "n5": n5}
    n6 = make_node("n6", "10.240.6.0/24", next_public_key=n3.public_key)
    assert with_departed({"n1": n1, "n6": n6}, {"n3": n3}) == {"n1": n1, "n6": n6}
    # ... and a node present again is planned from its present record.
    n3_new = make_node("n3", "10.240.3.0/24", endpoint="192.0.2.99:51820")
    assert with_departed({"n3": n3_new}, {"n3": n3}) == {"n3": n3_new}
    assert with_departed({"n1": n1}, {"n3": n3}) == {"n1": n1, "n3": n3}
