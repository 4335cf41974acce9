"""agent.planner: records -> desired dataplane state (a pure function)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from wiremesh.agent.planner import (
    MIN_MTU,
    VXLAN_OVERHEAD,
    WIREGUARD_OVERHEAD,
    DesiredState,
    Mtus,
    gateway_address,
    mtus,
    plan_mesh,
    tunnel_mtu,
)
from wiremesh.clustermesh import ClusterConfig, NodeRecord, overlay_address
from wiremesh.tunnels import PeerConfig, Route, VxlanSpec, vtep_mac

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
    st = plan_mesh("n1", me.public_key, cluster_config, nodes, local_pod_cidr=me.pod_cidr)
    assert set(st.peers) == {"lab/n2", "lab/n3"}  # peers are nodes; the public key is an attribute
    for name in ("n2", "n3"):
        rec = nodes[name]
        assert st.peers[f"lab/{name}"] == PeerConfig(
            public_key=rec.public_key, endpoint=rec.endpoint, allowed_ips=frozenset({rec.pod_cidr}),
            persistent_keepalive=0)
    assert st.routes == frozenset({Route("10.240.2.0/24", "wm0"), Route("10.240.3.0/24", "wm0")})
    # wireguard mode: no VXLAN device, no FDB, no neighbours, nothing skipped
    assert st.vxlan is None and st.fdb == {} and st.neighbours == {} and st.skipped == ()


def test_routes_use_the_given_wireguard_device(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan_mesh("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr="10.240.1.0/24", wg_device="wg7")
    assert {r.ifname for r in st.routes} == {"wg7"}


def test_local_node_is_excluded(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    me = nodes["n2"]
    st = plan_mesh("n2", me.public_key, cluster_config, nodes, local_pod_cidr=me.pod_cidr)
    assert me.public_key not in {p.public_key for p in st.peers.values()}
    assert "lab/n2" not in st.peers
    assert me.pod_cidr not in {r.dst for r in st.routes}
    assert {r.dst for r in st.routes} == {"10.240.1.0/24", "10.240.3.0/24"}


def test_local_node_excluded_by_name_even_with_another_key(cluster_config: ClusterConfig,
                                                            nodes: dict[str, NodeRecord]) -> None:
    # During rotation our record may still carry the old key: it is still us.
    st = plan_mesh("n1", "bmV3LWtleS1ub3QteWV0LXB1Ymxpc2hlZC0uLi4uLi4=", cluster_config, nodes,
              local_pod_cidr="10.240.1.0/24")
    assert "lab/n1" not in st.peers
    assert len(st.peers) == 2


def test_record_with_local_public_key_under_another_name_is_ignored(
        cluster_config: ClusterConfig, nodes: dict[str, NodeRecord], make_node: MakeNode) -> None:
    me = nodes["n1"]
    nodes["impostor"] = make_node("impostor", "10.240.9.0/24", public_key=me.public_key)
    st = plan_mesh("n1", me.public_key, cluster_config, nodes, local_pod_cidr=me.pod_cidr)
    assert me.public_key not in {p.public_key for p in st.peers.values()}
    assert "lab/impostor" not in st.peers
    assert "10.240.9.0/24" not in {r.dst for r in st.routes}
    assert len(st.peers) == 2


def test_address_is_overlay_host_route(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan_mesh("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr="10.240.1.0/24")
    assert st.address == "10.240.1.1/32"


def test_ipv6_address_is_slash_128() -> None:
    cfg = ClusterConfig(name="v6", id=2, pod_cidr="fd00:240::/48", node_prefix_len=64, service_cidr="fd00:96::/108")
    st = plan_mesh("a", "x", cfg, {}, local_pod_cidr="fd00:240:0:1::/64")
    assert st.address == "fd00:240:0:1::1/128"


def test_no_pod_cidr_yet_means_no_address(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan_mesh("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr=None)
    assert st.address is None
    assert len(st.peers) == 2


def test_persistent_keepalive_passed_to_every_peer(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan_mesh("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr=None, persistent_keepalive=25)
    assert {p.persistent_keepalive for p in st.peers.values()} == {25}


def test_alone_in_the_cluster(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan_mesh("n1", nodes["n1"].public_key, cluster_config, {"n1": nodes["n1"]}, local_pod_cidr="10.240.1.0/24")
    assert st == DesiredState(address="10.240.1.1/32", mtu=None, local_range=cluster_config.pod_cidr)


def test_plan_is_deterministic(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    a = plan_mesh("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr="10.240.1.0/24", underlay_mtu=1500)
    b = plan_mesh("n1", nodes["n1"].public_key, cluster_config, dict(reversed(list(nodes.items()))),
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
    assert plan_mesh("n1", "k", cfg, nodes, local_pod_cidr=None, underlay_mtu=1500).mtu == 1420
    cfg = ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16", mtu=1300)
    assert plan_mesh("n1", "k", cfg, nodes, local_pod_cidr=None, underlay_mtu=1500).mtu == 1300


def test_plan_carries_the_pod_mtu(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord]) -> None:
    st = plan_mesh("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr=None, underlay_mtu=1500)
    assert (st.mtu, st.pod_mtu) == (1420, 1420)


# --- mtus() -----------------------------------------------------------------------------------


def _cfg(routing: str = "wireguard", mtu: int = 0, vni: int = 1) -> ClusterConfig:
    return ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16", routing=routing, mtu=mtu, vni=vni)


def test_vxlan_overhead_is_50() -> None:
    assert VXLAN_OVERHEAD == 50


@pytest.mark.parametrize("routing, underlay, expected", [
    ("wireguard", 1500, Mtus(1420, 1420)),
    ("vxlan", 1500, Mtus(1420, 1370)),
    ("wireguard", 9000, Mtus(8920, 8920)),
    ("vxlan", 9000, Mtus(8920, 8870)),
])
def test_mtus_derived_from_the_underlay(routing: str, underlay: int, expected: Mtus) -> None:
    assert mtus(_cfg(routing), underlay) == expected


@pytest.mark.parametrize("routing", ["wireguard", "vxlan"])
def test_derived_mtus_never_leave_pods_below_the_minimum(routing: str) -> None:
    # A tiny underlay still gives pods at least IPv6's minimum MTU.
    m = mtus(_cfg(routing), 1300)
    assert m.pod == MIN_MTU
    assert m.wireguard == MIN_MTU + (VXLAN_OVERHEAD if routing == "vxlan" else 0)


@pytest.mark.parametrize("underlay", [1500, 9000, None])
def test_config_mtu_wins_in_wireguard_mode(underlay: int | None) -> None:
    assert mtus(_cfg("wireguard", mtu=1380), underlay) == Mtus(1380, 1380)


@pytest.mark.parametrize("underlay", [1500, 9000, None])
def test_config_mtu_is_the_pod_mtu_in_vxlan_mode(underlay: int | None) -> None:
    # Pods get the configured MTU; WireGuard needs room for VXLAN's 50 bytes on top.
    assert mtus(_cfg("vxlan", mtu=1380), underlay) == Mtus(1430, 1380)


@pytest.mark.parametrize("routing", ["wireguard", "vxlan"])
@pytest.mark.parametrize("underlay", [None, 0])
def test_mtus_unknown_underlay_means_none(routing: str, underlay: int | None) -> None:
    assert mtus(_cfg(routing), underlay) == Mtus(None, None)


def test_tunnel_mtu_is_the_wireguard_mtu() -> None:
    assert tunnel_mtu(_cfg("vxlan"), 1500) == 1420
    assert tunnel_mtu(_cfg("vxlan", mtu=1380), 1500) == 1430


# --- vxlan mode -------------------------------------------------------------------------------


@pytest.fixture
def vx_nodes(make_node: MakeNode) -> dict[str, NodeRecord]:
    def node(name: str, cidr: str, **kw: object) -> NodeRecord:
        return make_node(name, cidr, vtep_mac=vtep_mac(overlay_address(cidr)), **kw)

    return {
        "n1": node("n1", "10.240.1.0/24"),
        "n2": node("n2", "10.240.2.0/24"),
        "n3": node("n3", "10.240.3.0/24", endpoint="[fd00::13]:51820"),
    }


def _vx_plan(nodes: dict[str, NodeRecord], **kw: object) -> DesiredState:
    cfg = ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16", routing="vxlan", vni=42)
    args: dict[str, object] = {"local_pod_cidr": "10.240.1.0/24", "underlay_mtu": 1500}
    args.update(kw)
    return plan_mesh("n1", nodes["n1"].public_key, cfg, nodes, **args)  # type: ignore[arg-type]


def test_gateway_address_is_the_network_address() -> None:
    assert gateway_address("10.240.2.0/24") == "10.240.2.0"
    assert gateway_address("10.240.2.64/26") == "10.240.2.64"


def test_vtep_mac_is_stable_and_locally_administered() -> None:
    assert vtep_mac("10.240.2.1") == "0a:58:0a:f0:02:01"
    assert vtep_mac("10.240.2.1") == vtep_mac("10.240.2.1")
    assert vtep_mac("10.240.2.1") != vtep_mac("10.240.3.1")
    first = int(vtep_mac("10.240.2.1").split(":")[0], 16)
    assert first & 0b10 and not first & 0b01  # locally administered, unicast


def test_vtep_mac_of_an_ipv6_overlay_address() -> None:
    mac = vtep_mac("fd00:240:0:1::1")
    assert mac.startswith("0a:58:") and len(mac.split(":")) == 6
    assert mac != vtep_mac("fd00:240:0:2::1")


def test_vxlan_routes_fdb_and_neighbours(vx_nodes: dict[str, NodeRecord]) -> None:
    st = _vx_plan(vx_nodes)
    assert st.routes == frozenset({
        Route("10.240.2.1/32", "wm0"), Route("10.240.2.0/24", "wm-vxlan", "10.240.2.0"),
        Route("10.240.3.1/32", "wm0"), Route("10.240.3.0/24", "wm-vxlan", "10.240.3.0"),
    })
    assert st.fdb == {vtep_mac("10.240.2.1"): "10.240.2.1", vtep_mac("10.240.3.1"): "10.240.3.1"}
    assert st.neighbours == {"10.240.2.0": vtep_mac("10.240.2.1"), "10.240.3.0": vtep_mac("10.240.3.1")}
    assert st.skipped == ()


def test_vxlan_routes_use_the_given_devices(vx_nodes: dict[str, NodeRecord]) -> None:
    st = _vx_plan(vx_nodes, wg_device="wg7", vxlan_device="vx7")
    assert {r.ifname for r in st.routes if r.dst.endswith("/32")} == {"wg7"}
    assert {r.ifname for r in st.routes if r.dst.endswith("/24")} == {"vx7"}
    assert st.vxlan is not None and st.vxlan.name == "vx7"


def test_local_vxlan_spec(vx_nodes: dict[str, NodeRecord]) -> None:
    st = _vx_plan(vx_nodes)
    assert st.vxlan == VxlanSpec(name="wm-vxlan", vni=42, local="10.240.1.1", mac=vtep_mac("10.240.1.1"),
                                 mtu=1370, address="10.240.1.0/32")
    assert (st.mtu, st.pod_mtu) == (1420, 1370)
    assert st.address == "10.240.1.1/32"


def test_vxlan_spec_mtu_follows_config_mtu(vx_nodes: dict[str, NodeRecord]) -> None:
    cfg = ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16", routing="vxlan", mtu=1300)
    st = plan_mesh("n1", vx_nodes["n1"].public_key, cfg, vx_nodes, local_pod_cidr="10.240.1.0/24", underlay_mtu=1500)
    assert st.vxlan is not None and st.vxlan.mtu == 1300
    assert (st.mtu, st.pod_mtu) == (1350, 1300)


def test_vxlan_local_node_has_no_entries_of_its_own(vx_nodes: dict[str, NodeRecord]) -> None:
    st = _vx_plan(vx_nodes)
    assert vtep_mac("10.240.1.1") not in st.fdb
    assert "10.240.1.0" not in st.neighbours
    assert not {r for r in st.routes if r.dst in ("10.240.1.0/24", "10.240.1.1/32")}


def test_node_without_vtep_mac_is_routed_over_wireguard(vx_nodes: dict[str, NodeRecord], make_node: MakeNode) -> None:
    vx_nodes["n4"] = make_node("n4", "10.240.4.0/24")  # an older agent: no vtep_mac in its record
    st = _vx_plan(vx_nodes)
    assert Route("10.240.4.0/24", "wm0") in st.routes
    assert not {r for r in st.routes if r.dst == "10.240.4.1/32" or r.ifname == "wm-vxlan" and r.dst == "10.240.4.0/24"}
    assert "10.240.4.1" not in st.fdb.values()
    assert "10.240.4.0" not in st.neighbours
    assert len(st.skipped) == 1 and st.skipped[0].startswith("n4:")
    assert st.peers["lab/n4"].public_key == vx_nodes["n4"].public_key


def test_missing_vtep_mac_is_not_skipped_in_wireguard_mode(cluster_config: ClusterConfig,
                                                           nodes: dict[str, NodeRecord]) -> None:
    st = plan_mesh("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr="10.240.1.0/24")
    assert st.skipped == ()


def test_allowed_ips_are_the_whole_pod_cidr_in_both_modes(vx_nodes: dict[str, NodeRecord]) -> None:
    vx = _vx_plan(vx_nodes)
    wg = plan_mesh("n1", vx_nodes["n1"].public_key, ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16"),
              vx_nodes, local_pod_cidr="10.240.1.0/24", underlay_mtu=1500)
    assert vx.peers == wg.peers
    for name in ("n2", "n3"):
        rec = vx_nodes[name]
        assert vx.peers[f"lab/{name}"].allowed_ips == frozenset({rec.pod_cidr})


def test_vxlan_plan_is_deterministic(vx_nodes: dict[str, NodeRecord]) -> None:
    assert _vx_plan(vx_nodes) == _vx_plan(dict(reversed(list(vx_nodes.items()))))


def test_every_destination_has_one_route(vx_nodes: dict[str, NodeRecord], make_node: MakeNode) -> None:
    # sync_routes keys routes by destination: two routes to one destination would fight.
    vx_nodes["n4"] = make_node("n4", "10.240.4.0/24")
    st = _vx_plan(vx_nodes)
    dsts = [r.dst for r in st.routes]
    assert len(dsts) == len(set(dsts))


def test_no_route_into_a_vxlan_device_that_is_not_planned(vx_nodes: dict[str, NodeRecord]) -> None:
    st = _vx_plan(vx_nodes, local_pod_cidr=None)
    if any(r.ifname == "wm-vxlan" for r in st.routes):
        assert st.vxlan is not None
    assert not st.fdb and not st.neighbours or st.vxlan is not None


def test_a_second_local_node_with_a_taken_key_is_skipped(cluster_config: ClusterConfig, nodes: dict[str, NodeRecord],
                                                         make_node: MakeNode) -> None:
    n2 = nodes["n2"]
    nodes["n9"] = make_node("n9", "10.240.9.0/24", public_key=n2.public_key)
    st = plan_mesh("n1", nodes["n1"].public_key, cluster_config, nodes, local_pod_cidr="10.240.1.0/24")
    assert st.peers["lab/n2"].allowed_ips == frozenset({n2.pod_cidr})
    assert "lab/n9" not in st.peers
    assert st.skipped == ("lab/n9: its public key is already in use",)
