"""agent.planner with federated clusters: remote peers, and what pruning must leave alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from wiremesh.agent.planner import DesiredState, plan_mesh
from wiremesh.clustermesh import ClusterConfig, NodeRecord, overlay_address
from wiremesh.tunnels import PeerConfig, Route, vtep_mac

MakeNode = Callable[..., NodeRecord]

LOCAL = ClusterConfig(name="east", id=1, pod_cidr="10.240.0.0/16")
LOCAL_VX = ClusterConfig(name="east", id=1, pod_cidr="10.240.0.0/16", routing="vxlan")


@pytest.fixture
def local_nodes(make_node: MakeNode) -> dict[str, NodeRecord]:
    def node(name: str, cidr: str) -> NodeRecord:
        return make_node(name, cidr, cluster="east", vtep_mac=vtep_mac(overlay_address(cidr)))

    return {"n1": node("n1", "10.240.1.0/24"), "n2": node("n2", "10.240.2.0/24")}


@pytest.fixture
def remotes(make_node: MakeNode) -> dict[str, dict[str, NodeRecord]]:
    return {
        "west": {"w1": make_node("w1", "10.241.1.0/24", cluster="west"),
                 "w2": make_node("w2", "10.241.2.0/24", cluster="west", endpoint="198.51.100.2:51820")},
        "north": {"n1": make_node("n1", "10.242.1.0/24", cluster="north")},  # same node name as a local one
    }


def _plan(local_nodes: dict[str, NodeRecord], config: ClusterConfig = LOCAL, **kw: object) -> DesiredState:
    return plan_mesh("n1", local_nodes["n1"].public_key, config, local_nodes, local_pod_cidr="10.240.1.0/24",
                **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("config", [LOCAL, LOCAL_VX], ids=["wireguard", "vxlan"])
def test_remote_nodes_become_peers_routed_into_wireguard(local_nodes: dict[str, NodeRecord],
                                                          remotes: dict[str, dict[str, NodeRecord]],
                                                          config: ClusterConfig) -> None:
    st = _plan(local_nodes, config, remotes=remotes, persistent_keepalive=25)
    for cluster, nodes in remotes.items():
        for name, rec in nodes.items():
            assert st.peers[f"{cluster}/{name}"] == PeerConfig(public_key=rec.public_key, endpoint=rec.endpoint,
                                                               allowed_ips=frozenset({rec.pod_cidr}),
                                                               persistent_keepalive=25)
            # Even in vxlan mode: VXLAN stays inside a cluster.
            assert Route(rec.pod_cidr, "wm0") in st.routes
            assert not [r for r in st.routes if r.dst == f"{rec.overlay_ip}/32"]
            assert rec.overlay_ip not in st.fdb.values()
    assert len(st.peers) == 1 + 3
    assert st.skipped == ()
    dsts = [r.dst for r in st.routes]
    assert len(dsts) == len(set(dsts))


def test_remote_routes_use_the_given_wireguard_device(local_nodes: dict[str, NodeRecord],
                                                      remotes: dict[str, dict[str, NodeRecord]]) -> None:
    st = _plan(local_nodes, LOCAL_VX, remotes=remotes, wg_device="wg7", vxlan_device="vx7")
    remote_cidrs = {rec.pod_cidr for nodes in remotes.values() for rec in nodes.values()}
    assert {r.ifname for r in st.routes if r.dst in remote_cidrs} == {"wg7"}


def test_no_remotes_is_the_same_as_empty_remotes(local_nodes: dict[str, NodeRecord]) -> None:
    assert _plan(local_nodes) == _plan(local_nodes, remotes={}) == _plan(local_nodes, remotes={"west": {}})


def test_remote_reusing_the_local_public_key_is_skipped(local_nodes: dict[str, NodeRecord],
                                                        make_node: MakeNode) -> None:
    me = local_nodes["n1"]
    thief = make_node("w9", "10.241.9.0/24", cluster="west", public_key=me.public_key)
    st = _plan(local_nodes, remotes={"west": {"w9": thief}})
    assert "west/w9" not in st.peers
    assert st.skipped == ("west/w9: its public key is already in use",)
    assert "10.241.9.0/24" not in {r.dst for r in st.routes}


def test_remote_reusing_a_local_peers_key_is_skipped(local_nodes: dict[str, NodeRecord], make_node: MakeNode) -> None:
    n2 = local_nodes["n2"]
    thief = make_node("w9", "10.241.9.0/24", cluster="west", public_key=n2.public_key)
    st = _plan(local_nodes, remotes={"west": {"w9": thief}})
    # The local peer keeps its identity and its allowed IPs.
    assert st.peers["east/n2"].allowed_ips == frozenset({n2.pod_cidr})
    assert st.peers["east/n2"].public_key == n2.public_key
    assert "west/w9" not in st.peers
    assert st.skipped == ("west/w9: its public key is already in use",)
    assert "10.241.9.0/24" not in {r.dst for r in st.routes}


def test_two_remotes_with_one_key_first_cluster_by_name_wins(local_nodes: dict[str, NodeRecord],
                                                             make_node: MakeNode) -> None:
    a = make_node("a1", "10.242.1.0/24", cluster="alpha")
    b = make_node("b1", "10.243.1.0/24", cluster="beta", public_key=a.public_key)
    for remotes in ({"alpha": {"a1": a}, "beta": {"b1": b}}, {"beta": {"b1": b}, "alpha": {"a1": a}}):
        st = _plan(local_nodes, remotes=remotes)
        assert st.peers["alpha/a1"].public_key == a.public_key
        assert "beta/b1" not in st.peers
        assert st.peers["alpha/a1"].allowed_ips == frozenset({"10.242.1.0/24"})
        assert st.skipped == ("beta/b1: its public key is already in use",)


def test_plan_with_remotes_is_deterministic(local_nodes: dict[str, NodeRecord],
                                            remotes: dict[str, dict[str, NodeRecord]]) -> None:
    shuffled = {c: dict(reversed(list(n.items()))) for c, n in reversed(list(remotes.items()))}
    assert _plan(local_nodes, remotes=remotes) == _plan(local_nodes, remotes=shuffled)


def test_plan_carries_keep_settings(local_nodes: dict[str, NodeRecord]) -> None:
    st = _plan(local_nodes, keep_cidrs=frozenset({"10.241.0.0/16"}), keep_foreign=True)
    assert st.keep_cidrs == frozenset({"10.241.0.0/16"})
    assert st.keep_foreign is True
    assert st.local_range == "10.240.0.0/16"


# --- DesiredState.kept ------------------------------------------------------------------------


def test_nothing_kept_by_default() -> None:
    st = DesiredState(local_range="10.240.0.0/16")
    for cidr in ("10.241.1.0/24", "10.240.1.0/24", "fd00::/64"):
        assert not st.kept(cidr)


@pytest.mark.parametrize("cidr, kept", [
    ("10.241.0.0/16", True),
    ("10.241.7.0/24", True),
    ("10.241.7.1/32", True),
    ("10.241.7.1", True),  # a bare address is a /32
    ("10.241.7.1/24", True),  # host bits are tolerated
    ("10.0.0.0/8", False),  # a supernet is not inside
    ("10.242.1.0/24", False),
    ("10.240.1.0/24", False),
    ("fd00:241::/64", True),
    ("fd00:242::/64", False),
])
def test_cidrs_inside_keep_cidrs_are_kept(cidr: str, kept: bool) -> None:
    st = DesiredState(keep_cidrs=frozenset({"10.241.0.0/16", "fd00:241::/48"}), local_range="10.240.0.0/16")
    assert st.kept(cidr) is kept


@pytest.mark.parametrize("cidr, kept", [
    ("10.241.1.0/24", True),
    ("192.168.0.0/16", True),
    ("10.0.0.0/8", True),  # not inside the local range: foreign
    ("fd00::/64", True),  # another family is never inside
    ("10.240.1.0/24", False),
    ("10.240.0.0/16", False),
    ("10.240.9.1/32", False),
])
def test_keep_foreign_keeps_everything_outside_the_local_range(cidr: str, kept: bool) -> None:
    st = DesiredState(keep_foreign=True, local_range="10.240.0.0/16")
    assert st.kept(cidr) is kept


def test_keep_foreign_without_a_local_range_keeps_nothing() -> None:
    assert not DesiredState(keep_foreign=True).kept("10.241.0.0/16")


def test_keep_cidrs_and_keep_foreign_together() -> None:
    st = DesiredState(keep_cidrs=frozenset({"10.240.9.0/24"}), keep_foreign=True, local_range="10.240.0.0/16")
    assert st.kept("10.240.9.0/24")  # inside the local range, but explicitly kept
    assert st.kept("10.241.0.0/24")
    assert not st.kept("10.240.8.0/24")


def test_planned_state_keeps_what_it_was_told(local_nodes: dict[str, NodeRecord]) -> None:
    st = _plan(local_nodes, keep_cidrs=frozenset({"10.241.0.0/16"}))
    assert st.kept("10.241.3.0/24") and not st.kept("10.242.3.0/24") and not st.kept("10.240.3.0/24")
    st = _plan(local_nodes, keep_foreign=True)
    assert st.kept("10.242.3.0/24") and not st.kept("10.240.3.0/24")
