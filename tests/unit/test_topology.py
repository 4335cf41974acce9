"""lab.topology: the lab's multi-cluster topology file, validated field by field."""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path
from typing import Any

import pytest

from wiremesh.clustermesh import ClusterConfig
from wiremesh.lab.errors import LabError
from wiremesh.lab.topology import DEFAULT_TOPOLOGY, ClusterSpec, load_topology, parse_topology


def c(name: str = "east", cid: int = 1, cidr: str = "10.240.0.0/16", **kw: Any) -> dict[str, Any]:
    return {"name": name, "id": cid, "pod_cidr": cidr, **kw}


def topo(*clusters: Any) -> dict[str, Any]:
    return {"clusters": list(clusters)}


def parse_error(data: Any) -> str:
    with pytest.raises(LabError) as e:
        parse_topology(data, "t.yaml")
    return str(e.value)


def test_parse_fills_in_defaults() -> None:
    (s,) = parse_topology(topo(c()), "t.yaml")
    assert s == ClusterSpec(name="east", id=1, datacenter="east", pod_cidr="10.240.0.0/16", routing="wireguard",
                            nodes=2, node_prefix_len=24, mtu=0)
    assert s.config() == ClusterConfig(name="east", id=1, pod_cidr="10.240.0.0/16")


def test_parse_takes_every_field() -> None:
    (s,) = parse_topology(topo(c(datacenter="dc1", routing="vxlan", nodes=5, node_prefix_len=26, mtu=1400)), "t")
    assert (s.datacenter, s.routing, s.nodes, s.node_prefix_len, s.mtu) == ("dc1", "vxlan", 5, 26, 1400)
    assert s.config().routing == "vxlan" and s.config().mtu == 1400


@pytest.mark.parametrize("data", [None, [], {}, {"clusters": []}, {"clusters": "east"}, {"clusters": {"a": 1}}])
def test_must_hold_a_non_empty_cluster_list(data: Any) -> None:
    assert parse_error(data) == "t.yaml: must hold 'clusters', a non-empty list"


def test_cluster_must_be_a_mapping() -> None:
    assert parse_error(topo(c(), "west")) == "t.yaml: clusters[1]: must be a mapping"


def test_unknown_field() -> None:
    assert parse_error(topo(c(vni=3))) == "t.yaml: clusters[0].vni: unknown field"


@pytest.mark.parametrize("field, value, type_name", [
    ("id", "1", "int"), ("id", True, "int"), ("nodes", 2.0, "int"), ("name", 1, "str"),
    ("pod_cidr", ["10.240.0.0/16"], "str"), ("routing", None, "str"), ("mtu", False, "int"),
])
def test_wrong_type(field: str, value: Any, type_name: str) -> None:
    assert parse_error(topo({**c(), field: value})) == f"t.yaml: clusters[0].{field}: must be {type_name}"


@pytest.mark.parametrize("missing", ["name", "id", "pod_cidr"])
def test_missing_required(missing: str) -> None:
    d = c()
    del d[missing]
    assert parse_error(topo(d)) == f"t.yaml: clusters[0].{missing}: is required"


@pytest.mark.parametrize("over, field", [
    ({"name": "East"}, "name"), ({"id": 0}, "id"), ({"id": 256}, "id"), ({"pod_cidr": "10.240.0.1/16"}, "pod_cidr"),
    ({"routing": "ipip"}, "routing"), ({"mtu": 99}, "mtu"), ({"node_prefix_len": 8}, "node_prefix_len"),
])
def test_config_errors_name_the_field(over: dict[str, Any], field: str) -> None:
    assert parse_error(topo({**c(), **over})).startswith(f"t.yaml: clusters[0].{field}: ")


@pytest.mark.parametrize("nodes", [-1, 51])
def test_nodes_out_of_range(nodes: int) -> None:
    assert parse_error(topo(c(nodes=nodes))) == f"t.yaml: clusters[0].nodes: {nodes} is outside 0-50"


@pytest.mark.parametrize("nodes", [0, 50])
def test_nodes_bounds_accepted(nodes: int) -> None:
    assert parse_topology(topo(c(nodes=nodes)), "t")[0].nodes == nodes


@pytest.mark.parametrize("second", [
    c("east", 2, "10.241.0.0/16", datacenter="dc2"),  # same name
    c("west", 1, "10.241.0.0/16"),  # same id
    c("west", 2, "10.241.0.0/16", datacenter="east"),  # same datacenter (the first's defaults to its name)
])
def test_duplicate_name_id_or_datacenter(second: dict[str, Any]) -> None:
    msg = parse_error(topo(c(), second))
    assert msg == "t.yaml: clusters[1]: name, id and datacenter must differ from cluster 'east''s"


def test_overlapping_pod_cidrs() -> None:
    msg = parse_error(topo(c(), c("west", 2, "10.240.128.0/17")))
    assert msg == "t.yaml: clusters[1].pod_cidr: 10.240.128.0/17 overlaps cluster 'east''s 10.240.0.0/16"


def test_ipv4_and_ipv6_pod_cidrs_do_not_overlap() -> None:
    specs = parse_topology(topo(c(), c("v6", 2, "fd00::/48", node_prefix_len=64)), "t")
    assert [s.name for s in specs] == ["east", "v6"]


def test_at_most_nine_clusters() -> None:
    ten = [c(f"c{i}", i + 1, f"10.{240 + i}.0.0/16") for i in range(10)]
    assert parse_error(topo(*ten)) == "t.yaml: at most 9 clusters"
    assert len(parse_topology(topo(*ten[:9]), "t")) == 9


# --- load_topology ----------------------------------------------------------------------------


def test_shipped_default_topology() -> None:
    specs = load_topology()
    assert specs == [
        ClusterSpec(name="east", id=1, datacenter="east", pod_cidr="10.240.0.0/16", routing="wireguard", nodes=2),
        ClusterSpec(name="west", id=2, datacenter="west", pod_cidr="10.241.0.0/16", routing="wireguard", nodes=2),
    ]
    assert DEFAULT_TOPOLOGY.name == "default.yaml" and DEFAULT_TOPOLOGY.parent.name == "topologies"


def test_trim_to_one_cluster() -> None:
    assert [s.name for s in load_topology(clusters=1)] == ["east"]


def test_nodes_override_every_cluster() -> None:
    assert [(s.name, s.nodes) for s in load_topology(nodes=4)] == [("east", 4), ("west", 4)]
    assert [(s.name, s.nodes) for s in load_topology(clusters=1, nodes=1)] == [("east", 1)]


def _disjoint(specs: list[ClusterSpec]) -> bool:
    nets = [ipaddress.ip_network(s.pod_cidr) for s in specs]
    return not any(a.overlaps(b) for a, b in itertools.combinations(nets, 2))  # type: ignore[arg-type]


def test_extend_to_three_clusters() -> None:
    specs = load_topology(clusters=3)
    assert [s.name for s in specs] == ["east", "west", "cluster3"]
    third = specs[2]
    assert (third.id, third.datacenter, third.pod_cidr) == (3, "cluster3", "10.242.0.0/16")
    assert _disjoint(specs)
    assert len({s.id for s in specs}) == len({s.datacenter for s in specs}) == 3
    third.config()  # a valid cluster config


def test_extend_to_nine_clusters_with_nodes() -> None:
    specs = load_topology(clusters=9, nodes=1)
    assert len(specs) == 9 and _disjoint(specs)
    assert {s.nodes for s in specs} == {1}
    assert len({s.name for s in specs}) == len({s.id for s in specs}) == len({s.datacenter for s in specs}) == 9
    for s in specs:
        s.config()


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(LabError) as e:
        load_topology(tmp_path / "missing.yaml")
    assert str(e.value).startswith(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: [\n")
    with pytest.raises(LabError) as e:
        load_topology(bad)
    assert str(e.value).startswith(f"{bad}: not YAML")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(LabError) as e:
        load_topology(empty)
    assert str(e.value) == f"{empty}: must hold 'clusters', a non-empty list"


def test_extended_clusters_never_clash_with_the_files(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("clusters:\n  - {name: cluster2, id: 1, pod_cidr: 10.241.0.0/16}\n")
    try:
        specs = load_topology(p, clusters=2)
    except LabError:
        return  # refusing is fine too
    assert _disjoint(specs)
    assert len({s.name for s in specs}) == len({s.datacenter for s in specs}) == 2
