"""agent.planner: records -> desired dataplane state (a pure function)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.planner import (
    MIN_MTU,
    VXLAN_OVERHEAD,
    WIREGUARD_OVERHEAD,
    DesiredState,
    Mtus,
    gateway_address,
    mtus,
    plan,
    tunnel_mtu,
)
from clustermesh import ClusterConfig, NodeRecord
from tunnels import PeerConfig, Route, VxlanSpec, vtep_mac

MakeNode = Callable[..., NodeRecord]


@pytest.fixture
def nodes(make_node: MakeNode) -> dict[str, NodeRecord]:
    return {
        "n1": make_node("n1", "10.240.1.0/24"),
        "n2": make_node("n2", "10.240.2.0/24", endpoint="192.0.2.12:51820"),
        "n3": make_node("n3", "10.240.3.0/24", endpoint="[fd00::13]:51820"),
    }


def test_every_other_node_becomes_a_peer(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    me = nodes["n1"]
    st = plan("n1", me.public_key, cluster_config, nodes, local_pod_cidr=me.pod_cidr)
    assert set(st.peers) == {nodes["n2"].public_key, nodes["n3"].public_key}
    for name in ("n2", "n3"):
        rec = nodes[name]
        assert st.peers[rec.public_key] == PeerConfig(
            public_key=rec.public_key, endpoint=rec.endpoint, allowed_ips=frozenset({rec.pod_cidr}),
            persistent_keepalive=0)
        assert st.peer_names[rec.public_key] == name
    assert st.routes == frozenset({Route("10.240.2.0/24", "wm0"), Route("10.240.3.0/24", "wm0")})
    # wireguard mode: no VXLAN device, no FDB, no neighbours, nothing skipped
    assert st.vxlan is None and st.fdb == {} and st.neighbours == {} and st.skipped == ()


def test_routes_use_the_given_wireguard_device(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr="10.240.1.0/24", wg_device="wg7")
    assert {r.ifname for r in st.routes} == {"wg7"}


def test_local_node_is_excluded(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    me = nodes["n2"]
    st = plan("n2", me.public_key, cluster_config, nodes, local_pod_cidr=me.pod_cidr)
    assert me.public_key not in st.peers
    assert "n2" not in st.peer_names.values()
    assert me.pod_cidr not in {r.dst for r in st.routes}
    assert {r.dst for r in st.routes} == {"10.240.1.0/24", "10.240.3.0/24"}


def test_local_node_excluded_by_name_even_with_another_key(cluster_config: ClusterConfig,
                                                            nodes: dict[str, NodeRecord]) -> None:
    # During rotation our record may still carry the old key: it is still us.
    st = plan("n1", "bmV3LWtleS1ub3QteWV0LXB1Ymxpc2hlZC0uLi4uLi4=", cluster_config, nodes,
              local_pod_cidr="10.240.1.0/24")
    assert nodes["n1"].public_key not in st.peers
    assert len(st.peers) == 2


def test_record_with_local_public_key_under_another_name_is_ignored(
        cluster_config: ClusterConfig, nodes: dict[str, NodeRecord], make_node: MakeNode) -> None:
    me = nodes["n1"]
    nodes["impostor"] = make_node("impostor", "10.240.9.0/24", public_key=me.public_key)
    st = plan("n1", me.public_key, cluster_config, nodes, local_pod_cidr=me.pod_cidr)
    assert me.public_key not in st.peers
    assert "impostor" not in st.peer_names.values()
    assert "10.240.9.0/24" not in {r.dst for r in st.routes}
    assert len(st.peers) == 2


def test_address_is_overlay_host_route(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr="10.240.1.0/24")
    assert st.address == "10.240.1.1/32"


def test_ipv6_address_is_slash_128() -> None:
    cfg = ClusterConfig(name="v6", id=2, pod_cidr="fd00:240::/48", node_prefix_len=64, service_cidr="fd00:96::/108")
    st = plan("a", "x", cfg, {}, local_pod_cidr="fd00:240:0:1::/64")
    assert st.address == "fd00:240:0:1::1/128"


def test_no_pod_cidr_yet_means_no_address(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr=None)
    assert st.address is None
    assert len(st.peers) == 2


def test_persistent_keepalive_passed_to_every_peer(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr=None, persistent_keepalive=25)
    assert {p.persistent_keepalive for p in st.peers.values()} == {25}


def test_alone_in_the_cluster(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan("n1", nodes["n1"].public_key, cluster_config, {"n1": nodes["n1"]}, local_pod_cidr="10.240.1.0/24")
    assert st == DesiredState(address="10.240.1.1/32", mtu=None)


def test_plan_is_deterministic(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    a = plan("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr="10.240.1.0/24", underlay_mtu=1500)
    b = plan("n1", nodes["n1"].public_key, cluster_config, dict(reversed(list(nodes.items()))),
             local_pod_cidr="10.240.1.0/24", underlay_mtu=1500)
    assert a == b


# --- MTU --------------------------------------------------------------------------------------


def test_overhead_is_80() -> None:
    assert WIREGUARD_OVERHEAD == 80


def test_config_mtu_wins() -> None:
    cfg = ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16", mtu=1380)
    assert tunnel_mtu(cfg, 9000) == 1380
    assert tunnel_mtu(cfg, None) == 1380


@pytest.mark.parametrize("underlay, expected", [(1500, 1420), (9000, 8920), (1420, 1340)])
def test_underlay_minus_overhead(cluster_config: ClusterConfig, underlay: int, expected: int) -> None:
    assert tunnel_mtu(cluster_config, underlay) == expected


@pytest.mark.parametrize("underlay", [None, 0])
def test_unknown_underlay_means_no_mtu(cluster_config: ClusterConfig, underlay: int | None) -> None:
    assert tunnel_mtu(cluster_config, underlay) is None


def test_plan_carries_the_mtu(nodes: dict[str, NodeRecord]) -> None:
    cfg = ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16")
    assert plan("n1", "k", cfg, nodes, local_pod_cidr=None, underlay_mtu=1500).mtu == 1420
    cfg = ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16", mtu=1300)
    assert plan("n1", "k", cfg, nodes, local_pod_cidr=None, underlay_mtu=1500).mtu == 1300
