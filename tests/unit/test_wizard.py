"""clustermesh.wizard: answers, static and live checks, the setup plan and its all-or-nothing apply."""

from __future__ import annotations

import base64
import ipaddress
import json
from typing import Any

import pytest

from wiremesh.clustermesh import (
    ClusterConfig,
    ConsulError,
    ConsulReason,
    ConsulUnavailable,
    KVItem,
    KVOp,
    MeshMember,
    TransactionFailed,
    TxnOpError,
    layout,
)
from wiremesh.clustermesh.wizard import (
    ClusterAnswer,
    ConsulFacts,
    SetupError,
    Write,
    agent_toml,
    apply_setup,
    check_id,
    check_live,
    check_name,
    check_pod_cidr,
    check_static,
    load_answers,
    parse_answers,
    plan_setup,
    suggest_id,
    suggest_pod_cidr,
)


def answer(name: str = "east", cid: int = 1, cidr: str = "10.240.0.0/16", **kw: Any) -> ClusterAnswer:
    return ClusterAnswer(consul=f"http://{name}:8500", name=name, id=cid, pod_cidr=cidr, **kw)


def two() -> list[ClusterAnswer]:
    return [answer("east", 1, "10.240.0.0/16"), answer("west", 2, "10.241.0.0/16")]


def doc(*clusters: dict[str, Any]) -> dict[str, Any]:
    return {"clusters": list(clusters)}


def c(name: str = "east", cid: int = 1, cidr: str = "10.240.0.0/16", **kw: Any) -> dict[str, Any]:
    return {"consul": f"http://{name}:8500", "name": name, "id": cid, "pod_cidr": cidr, **kw}


# --- parse_answers ----------------------------------------------------------------------------


def test_parse_answers_builds_cluster_answers() -> None:
    out = parse_answers(doc(c("east", 1, "10.240.0.0/16", datacenter="dc1", token="t", routing="vxlan", mtu=1400),
                            c("west", 2, "10.241.0.0/16", node_prefix_len=26)))
    assert [a.name for a in out] == ["east", "west"]
    assert (out[0].datacenter, out[0].token, out[0].routing, out[0].mtu) == ("dc1", "t", "vxlan", 1400)
    assert out[1].node_prefix_len == 26 and out[1].routing == "wireguard" and out[1].token is None


def test_optional_fields_may_be_null() -> None:
    (a,) = parse_answers(doc(c(datacenter=None, token=None, ca_file=None)))
    assert (a.datacenter, a.token, a.ca_file) == (None, None, None)


@pytest.mark.parametrize("data", [[], "clusters", None, {"clusters": [c()], "extra": 1}])
def test_document_must_be_a_mapping_with_clusters_only(data: Any) -> None:
    with pytest.raises(SetupError) as e:
        parse_answers(data, "f.yaml")
    assert e.value.field == "f.yaml"


@pytest.mark.parametrize("data", [{}, {"clusters": []}, {"clusters": {"east": {}}}])
def test_clusters_must_be_a_non_empty_list(data: Any) -> None:
    with pytest.raises(SetupError) as e:
        parse_answers(data, "f.yaml")
    assert e.value.field == "f.yaml: clusters"


def test_cluster_must_be_a_mapping() -> None:
    with pytest.raises(SetupError) as e:
        parse_answers(doc(c(), "west"))  # type: ignore[arg-type]
    assert e.value.field == "clusters[1]"


def test_unknown_field_is_named() -> None:
    with pytest.raises(SetupError) as e:
        parse_answers(doc(c(), c("west", 2, "10.241.0.0/16", vni=3)))
    assert (e.value.field, e.value.reason) == ("clusters[1].vni", "unknown field")


@pytest.mark.parametrize("missing", ["consul", "name", "id", "pod_cidr"])
def test_missing_required_field_is_named(missing: str) -> None:
    d = c()
    del d[missing]
    with pytest.raises(SetupError) as e:
        parse_answers(doc(d))
    assert (e.value.field, e.value.reason) == (f"clusters[0].{missing}", "is required")


@pytest.mark.parametrize("field, value, reason", [
    ("id", "1", "must be int, not str"),
    ("id", True, "must be int, not bool"),
    ("id", 1.0, "must be int, not float"),
    ("name", 5, "must be str, not int"),
    ("pod_cidr", None, "must be str, not NoneType"),
    ("mtu", False, "must be int, not bool"),
    ("token", 123, "must be str, not int"),
    ("node_prefix_len", "24", "must be int, not str"),
])
def test_wrong_type_is_named(field: str, value: Any, reason: str) -> None:
    with pytest.raises(SetupError) as e:
        parse_answers(doc(c(), {**c("west", 2, "10.241.0.0/16"), field: value}))
    assert (e.value.field, e.value.reason) == (f"clusters[1].{field}", reason)


@pytest.mark.parametrize("over, field", [
    ({"name": "East"}, "clusters[1].name"),
    ({"name": "east"}, "clusters[1].name"),
    ({"id": 1}, "clusters[1].id"),
    ({"id": 0}, "clusters[1].id"),
    ({"pod_cidr": "10.240.128.0/17"}, "clusters[1].pod_cidr"),
    ({"pod_cidr": "10.241.0.1/16"}, "clusters[1].pod_cidr"),
    ({"routing": "ipip"}, "clusters[1].routing"),
    ({"mtu": 100}, "clusters[1].mtu"),
    ({"node_prefix_len": 8}, "clusters[1].node_prefix_len"),
])
def test_static_checks_run_on_every_answer(over: dict[str, Any], field: str) -> None:
    second = {**c("west", 2, "10.241.0.0/16"), **over}
    with pytest.raises(SetupError) as e:
        parse_answers(doc(c(), second))
    assert e.value.field == field


def test_load_answers_reads_yaml(tmp_path: Any) -> None:
    p = tmp_path / "answers.yaml"
    p.write_text("clusters:\n  - {consul: 'http://a:8500', name: a, id: 1, pod_cidr: 10.240.0.0/16}\n")
    (a,) = load_answers(p)
    assert (a.name, a.id) == ("a", 1)


def test_load_answers_errors_name_the_file(tmp_path: Any) -> None:
    with pytest.raises(SetupError) as e:
        load_answers(tmp_path / "nope.yaml")
    assert e.value.field == str(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("clusters: [\n")
    with pytest.raises(SetupError) as e:
        load_answers(p)
    assert e.value.field == str(p) and e.value.reason.startswith("not YAML/JSON")
    p.write_text("clusters: []\n")
    with pytest.raises(SetupError) as e:
        load_answers(p)
    assert e.value.field == f"{p}: clusters"


# --- check_name / check_id / check_pod_cidr ---------------------------------------------------


def test_check_name() -> None:
    assert check_name("north", two()) == "north"
    with pytest.raises(SetupError) as e:
        check_name("east", two(), "clusters[2].name")
    assert e.value.field == "clusters[2].name" and "already in this setup" in e.value.reason
    with pytest.raises(SetupError) as e:
        check_name("Bad_Name", [])
    assert e.value.field == "name" and e.value.hint is not None and "lowercase" in e.value.hint


def test_check_id_duplicate_gives_a_hint() -> None:
    with pytest.raises(SetupError) as e:
        check_id(2, two())
    assert "taken by cluster 'west'" in e.value.reason
    assert e.value.hint == "try 3"


def test_check_id_taken_in_the_mesh() -> None:
    taken = {3: "north"}
    with pytest.raises(SetupError) as e:
        check_id(3, two(), taken, name="south")
    assert "'north' in the mesh" in e.value.reason and e.value.hint == "try 4"
    # The same cluster keeping its own id is fine.
    assert check_id(3, two(), taken, name="north") == 3


@pytest.mark.parametrize("cid", [0, 256, -5])
def test_check_id_out_of_range(cid: int) -> None:
    with pytest.raises(SetupError) as e:
        check_id(cid, [], field="clusters[0].id")
    assert e.value.field == "clusters[0].id" and "1-255" in e.value.reason


def test_check_pod_cidr_overlap_gives_a_hint() -> None:
    with pytest.raises(SetupError) as e:
        check_pod_cidr("10.241.4.0/24", two())
    assert "overlaps cluster 'west'" in e.value.reason
    assert e.value.hint == "try 10.242.0.0/16"


def test_check_pod_cidr_not_a_network() -> None:
    for bad in ("10.240.0.1/16", "nonsense", "10.240.0.0/40"):
        with pytest.raises(SetupError) as e:
            check_pod_cidr(bad, [])
        assert e.value.field == "pod_cidr"


def test_check_pod_cidr_returns_canonical_text_and_ignores_other_families() -> None:
    assert check_pod_cidr("FD00:0240::/48", two()) == "fd00:240::/48"


def test_check_static_names_the_field_of_the_config() -> None:
    with pytest.raises(SetupError) as e:
        check_static(answer(node_prefix_len=12), [], "clusters[0]")
    assert e.value.field == "clusters[0].node_prefix_len"


# --- suggestions ------------------------------------------------------------------------------


def test_suggest_id_skips_used_ids() -> None:
    assert suggest_id([]) == 1
    assert suggest_id(two()) == 3
    assert suggest_id(two(), {3: "x", 4: "y"}) == 5
    assert suggest_id([answer(cid=2)], {1: "x"}) == 3


def test_suggest_pod_cidr_skips_overlapping_16s() -> None:
    assert suggest_pod_cidr([]) == "10.240.0.0/16"
    assert suggest_pod_cidr(two()) == "10.242.0.0/16"
    assert suggest_pod_cidr([answer(cidr="10.240.7.0/24")]) == "10.241.0.0/16"
    assert suggest_pod_cidr([], ["10.240.0.0/15", "10.242.0.0/16"]) == "10.243.0.0/16"
    assert suggest_pod_cidr([answer(cidr="fd00::/8")]) == "10.240.0.0/16"  # other families do not count


def test_suggest_pod_cidr_stays_inside_10_240_0_0_12() -> None:
    used = [f"10.{240 + i}.0.0/16" for i in range(15)]
    s = suggest_pod_cidr([], used)
    assert s == "10.255.0.0/16"
    assert ipaddress.ip_network(s).subnet_of(ipaddress.ip_network("10.240.0.0/12"))


def test_suggestion_never_overlaps_a_used_cidr() -> None:
    used = [ipaddress.ip_network(f"10.{240 + i}.0.0/16") for i in range(16)]
    s = ipaddress.ip_network(suggest_pod_cidr([], [str(u) for u in used]))
    assert not any(u.overlaps(s) for u in used)


# --- check_live -------------------------------------------------------------------------------


def facts(dc: str, dcs: list[str] | None = None, **kw: Any) -> ConsulFacts:
    return ConsulFacts(datacenter=dc, datacenters=dcs if dcs is not None else ["dc-east", "dc-west"], **kw)


def test_check_live_passes_and_fills_in_the_datacenter() -> None:
    a = two()
    check_live(a, [facts("dc-east"), facts("dc-west")])
    assert [x.datacenter for x in a] == ["dc-east", "dc-west"]


def test_check_live_duplicate_datacenter() -> None:
    with pytest.raises(SetupError) as e:
        check_live(two(), [facts("dc-east"), facts("dc-east")])
    assert e.value.field == "clusters[1].consul"
    assert "'dc-east' is taken by cluster 'east'" in e.value.reason


def test_check_live_missing_wan_federation_names_the_datacenter() -> None:
    with pytest.raises(SetupError) as e:
        check_live(two(), [facts("dc-east"), facts("dc-west", ["dc-west"])])
    assert e.value.field == "clusters[1].consul"
    assert "'dc-west' is not WAN-federated with 'dc-east'" in e.value.reason
    assert e.value.hint is not None and "consul join -wan" in e.value.hint


def test_check_live_missing_federation_lists_only_the_missing_ones() -> None:
    a = [*two(), answer("north", 3, "10.242.0.0/16")]
    all_dcs = ["dc-east", "dc-west", "dc-north"]
    with pytest.raises(SetupError) as e:
        check_live(a, [facts("dc-east", all_dcs), facts("dc-west", ["dc-west", "dc-east"]), facts("dc-north", all_dcs)])
    assert e.value.reason.endswith("with 'dc-north'")


def test_check_live_id_taken_by_a_member_outside_this_setup() -> None:
    north = MeshMember("north", 2, "dc-north", "10.250.0.0/16")
    with pytest.raises(SetupError) as e:
        check_live(two(), [facts("dc-east", mesh={"north": north}), facts("dc-west")])
    assert e.value.field == "clusters[1].id" and "'north'" in e.value.reason


def test_check_live_cidr_taken_by_a_member_outside_this_setup() -> None:
    north = MeshMember("north", 9, "dc-north", "10.240.128.0/17")
    with pytest.raises(SetupError) as e:
        check_live(two(), [facts("dc-east"), facts("dc-west", mesh={"north": north})])
    assert e.value.field == "clusters[0].pod_cidr" and "'north'" in e.value.reason


def test_check_live_members_of_this_setup_may_change() -> None:
    # The mesh already holds east with other settings: this setup re-defines it.
    old_east = MeshMember("east", 2, "dc-east", "10.241.0.0/16")
    check_live(two(), [facts("dc-east", mesh={"east": old_east}), facts("dc-west")])


def test_check_live_other_family_member_does_not_overlap() -> None:
    v6 = MeshMember("v6", 9, "dc-v6", "fd00::/8")
    check_live(two(), [facts("dc-east", mesh={"v6": v6}), facts("dc-west")])


def test_check_live_datacenter_taken_by_a_member_outside_this_setup() -> None:
    old = MeshMember("old-east", 9, "dc-east", "10.250.0.0/16")
    with pytest.raises(SetupError):
        check_live(two(), [facts("dc-east", mesh={"old-east": old}), facts("dc-west", mesh={"old-east": old})])


def test_check_live_pod_cidr_change_refused_while_leases_exist() -> None:
    cfg = ClusterConfig(name="east", id=1, pod_cidr="10.250.0.0/16")
    with pytest.raises(SetupError) as e:
        check_live(two(), [facts("dc-east", config=cfg, leases=3), facts("dc-west")])
    assert e.value.field == "clusters[0].pod_cidr"
    assert "10.250.0.0/16" in e.value.reason and "3 node lease(s)" in e.value.reason


def test_check_live_node_prefix_change_refused_while_leases_exist() -> None:
    cfg = ClusterConfig(name="east", id=1, pod_cidr="10.240.0.0/16", node_prefix_len=26)
    with pytest.raises(SetupError) as e:
        check_live(two(), [facts("dc-east", config=cfg, leases=1), facts("dc-west")])
    assert e.value.field == "clusters[0].pod_cidr"


def test_check_live_pod_cidr_change_allowed_without_leases() -> None:
    cfg = ClusterConfig(name="east", id=1, pod_cidr="10.250.0.0/16")
    check_live(two(), [facts("dc-east", config=cfg, leases=0), facts("dc-west")])


def test_check_live_unchanged_pod_cidr_allowed_with_leases() -> None:
    cfg = ClusterConfig(name="east", id=1, pod_cidr="10.240.0.0/16", mtu=1400)  # other settings may change
    check_live(two(), [facts("dc-east", config=cfg, leases=5), facts("dc-west")])


# --- plan_setup -------------------------------------------------------------------------------


class FakeStore:
    """Just enough of a ConsulStore: `get` from a dict; `txn` records transactions (as Consul's JSON)."""

    def __init__(self, items: dict[str, KVItem] | None = None, fail: bool | str = False) -> None:
        self.items = dict(items or {})
        self.fail = fail  # True: Consul refuses the transaction; "raise": Consul is unreachable; "denied": ACLs
        self.txns: list[list[dict[str, Any]]] = []

    def get(self, key: str) -> KVItem | None:
        return self.items.get(key)

    def txn(self, ops: list[KVOp]) -> tuple[KVItem, ...]:
        self.txns.append([op.to_json() for op in ops])
        if self.fail == "raise":
            raise ConsulUnavailable("transaction: Consul unreachable", None, ConsulReason.UNREACHABLE)
        if self.fail == "denied":
            raise TransactionFailed("transaction: permission denied", (TxnOpError(0, "Permission denied"),),
                                    409, ConsulReason.PERMISSION_DENIED)
        if self.fail:
            raise TransactionFailed("transaction: conflict", (TxnOpError(0, "index is stale"),))
        return ()


def item(key: str, value: str, index: int) -> KVItem:
    return KVItem(key, value.encode(), index)


def members_of(answers: list[ClusterAnswer], dcs: list[str]) -> dict[str, MeshMember]:
    return {a.name: MeshMember(a.name, a.id, dc, a.pod_cidr) for a, dc in zip(answers, dcs)}


def live_world(answers: list[ClusterAnswer], dcs: list[str]) -> tuple[list[ConsulFacts], list[FakeStore]]:
    """Both Consuls already hold exactly this setup: configs and mesh records, with their indexes."""
    mesh = members_of(answers, dcs)
    fs, stores = [], []
    for n, (a, dc) in enumerate(zip(answers, dcs)):
        idx = {m: 100 * (n + 1) + i for i, m in enumerate(mesh)}
        items = {layout.mesh_key(m.name): item(layout.mesh_key(m.name), m.to_json(), idx[m.name])
                 for m in mesh.values()}
        items[layout.config_key(a.name)] = item(layout.config_key(a.name), a.config().to_json(), 7 + n)
        fs.append(ConsulFacts(dc, dcs, dict(mesh), a.config(), 7 + n, 0, idx))
        stores.append(FakeStore(items))
    return fs, stores


def test_unchanged_setup_plans_no_writes() -> None:
    a = two()
    fs, stores = live_world(a, ["dc-east", "dc-west"])
    p = plan_setup(a, fs, stores)  # type: ignore[arg-type]
    assert p.writes == {"dc-east": [], "dc-west": []}
    assert p.changes == 0
    assert [s["changes"] for s in p.summary()] == [0, 0]


def test_fresh_setup_writes_config_and_every_member_with_cas_0() -> None:
    a = two()
    fs = [ConsulFacts("dc-east", ["dc-east", "dc-west"]), ConsulFacts("dc-west", ["dc-east", "dc-west"])]
    p = plan_setup(a, fs, [FakeStore(), FakeStore()])  # type: ignore[list-item]
    east = p.writes["dc-east"]
    assert east == [
        Write(layout.config_key("east"), a[0].config().to_json(), 0, None),
        Write(layout.mesh_key("east"), MeshMember("east", 1, "dc-east", "10.240.0.0/16").to_json(), 0, None),
        Write(layout.mesh_key("west"), MeshMember("west", 2, "dc-west", "10.241.0.0/16").to_json(), 0, None),
    ]
    assert [w.key for w in p.writes["dc-west"]] == [layout.config_key("west"), layout.mesh_key("east"),
                                                    layout.mesh_key("west")]
    assert p.changes == 6
    assert [s["changes"] for s in p.summary()] == [3, 3]


def test_changed_config_is_written_with_its_cas_index_and_old_value() -> None:
    a = two()
    fs, stores = live_world(a, ["dc-east", "dc-west"])
    old_json = a[1].config().to_json()
    a[1].mtu = 1400
    p = plan_setup(a, fs, stores)  # type: ignore[arg-type]
    assert p.writes["dc-east"] == []
    assert p.writes["dc-west"] == [Write(layout.config_key("west"), a[1].config().to_json(), 8, old_json)]
    assert json.loads(p.writes["dc-west"][0].value or "")["mtu"] == 1400


def test_changed_member_is_written_everywhere_with_each_datacenters_index() -> None:
    a = two()
    fs, stores = live_world(a, ["dc-east", "dc-west"])
    old = MeshMember("west", 2, "dc-west", "10.241.0.0/16").to_json()
    a[1].id = 3  # the config changes too
    p = plan_setup(a, fs, stores)  # type: ignore[arg-type]
    new = MeshMember("west", 3, "dc-west", "10.241.0.0/16").to_json()
    assert p.writes["dc-east"] == [Write(layout.mesh_key("west"), new, 101, old)]
    old_config = stores[1].items[layout.config_key("west")].value.decode()
    assert json.loads(old_config)["id"] == 2
    assert p.writes["dc-west"] == [
        Write(layout.config_key("west"), a[1].config().to_json(), 8, old_config),
        Write(layout.mesh_key("west"), new, 201, old),
    ]


def test_new_member_is_written_with_cas_0_to_every_datacenter() -> None:
    a = two()
    fs, stores = live_world(a, ["dc-east", "dc-west"])
    north = answer("north", 3, "10.242.0.0/16")
    fs.append(ConsulFacts("dc-north", ["dc-east", "dc-west", "dc-north"]))
    stores.append(FakeStore())
    p = plan_setup([*a, north], fs, stores)  # type: ignore[arg-type]
    north_rec = MeshMember("north", 3, "dc-north", "10.242.0.0/16").to_json()
    assert p.writes["dc-east"] == [Write(layout.mesh_key("north"), north_rec, 0, None)]
    assert p.writes["dc-west"] == [Write(layout.mesh_key("north"), north_rec, 0, None)]
    assert len(p.writes["dc-north"]) == 4


def test_invalid_stored_mesh_record_is_overwritten_with_its_index() -> None:
    a = two()
    fs, stores = live_world(a, ["dc-east", "dc-west"])
    # probe() records the index of a record it could not parse, but not the member.
    del fs[0].mesh["west"]
    fs[0].mesh_index["west"] = 55
    stores[0].items[layout.mesh_key("west")] = item(layout.mesh_key("west"), "garbage", 55)
    p = plan_setup(a, fs, stores)  # type: ignore[arg-type]
    assert p.writes["dc-east"] == [Write(layout.mesh_key("west"), MeshMember("west", 2, "dc-west",
                                                                              "10.241.0.0/16").to_json(), 55, "garbage")]


def test_non_canonical_ipv6_pod_cidr_is_stored_canonically() -> None:
    a = [answer("east", 1, "FD00:240::/48", node_prefix_len=64)]
    fs = [ConsulFacts("dc-east", ["dc-east"])]
    p = plan_setup(a, fs, [FakeStore()])  # type: ignore[list-item]
    by_key = {w.key: w.value or "" for w in p.writes["dc-east"]}
    mesh = MeshMember.from_json(by_key[layout.mesh_key("east")])
    cfg = ClusterConfig.from_json(by_key[layout.config_key("east")])
    assert cfg.pod_cidr == mesh.pod_cidr
    # Run again against what was written: nothing to change.
    fs = [ConsulFacts("dc-east", ["dc-east"], {"east": mesh}, cfg, 5, 0, {"east": 6})]
    assert plan_setup(a, fs, [FakeStore()]).changes == 0  # type: ignore[list-item]


# --- apply_setup ------------------------------------------------------------------------------


def _decoded(op: dict[str, Any]) -> dict[str, Any]:
    kv = dict(op["KV"])
    if "Value" in kv:
        kv["Value"] = base64.b64decode(kv["Value"]).decode()
    return kv


def fresh_plan() -> tuple[Any, list[FakeStore]]:
    a = two()
    fs, stores = live_world(a, ["dc-east", "dc-west"])
    a[0].mtu = 1400  # east's config changes (dc-east only)
    a[1].pod_cidr = "10.242.0.0/16"  # west's config and mesh record change (both datacenters)
    return plan_setup(a, fs, stores), stores  # type: ignore[arg-type]


def test_apply_writes_one_cas_transaction_per_datacenter() -> None:
    p, stores = fresh_plan()
    progress: list[str] = []
    result = apply_setup(p, stores, progress.append)  # type: ignore[arg-type]
    assert result == {"east": "2 change(s)", "west": "2 change(s)"}
    assert [len(s.txns) for s in stores] == [1, 1]
    east = [_decoded(op) for op in stores[0].txns[0]]
    assert east == [
        {"Verb": "cas", "Key": layout.config_key("east"), "Index": 7, "Value": p.answers[0].config().to_json()},
        {"Verb": "cas", "Key": layout.mesh_key("west"), "Index": 101,
         "Value": MeshMember("west", 2, "dc-west", "10.242.0.0/16").to_json()},
    ]
    west = [_decoded(op) for op in stores[1].txns[0]]
    assert [(op["Verb"], op["Key"], op["Index"]) for op in west] == [
        ("cas", layout.config_key("west"), 8), ("cas", layout.mesh_key("west"), 201)]
    assert progress == ["writing 2 key(s) to datacenter dc-east", "writing 2 key(s) to datacenter dc-west"]


def test_apply_skips_unchanged_datacenters() -> None:
    a = two()
    fs, stores = live_world(a, ["dc-east", "dc-west"])
    a[1].mtu = 1400
    p = plan_setup(a, fs, stores)  # type: ignore[arg-type]
    assert apply_setup(p, stores) == {"east": "unchanged", "west": "1 change(s)"}  # type: ignore[arg-type]
    assert stores[0].txns == [] and len(stores[1].txns) == 1


def test_nothing_to_do_writes_nothing() -> None:
    a = two()
    fs, stores = live_world(a, ["dc-east", "dc-west"])
    p = plan_setup(a, fs, stores)  # type: ignore[arg-type]
    assert apply_setup(p, stores) == {"east": "unchanged", "west": "unchanged"}  # type: ignore[arg-type]
    assert [s.txns for s in stores] == [[], []]


@pytest.mark.parametrize("failure", [True, "raise"])
def test_failure_in_second_datacenter_rolls_back_the_first(failure: bool | str) -> None:
    p, stores = fresh_plan()
    stores[1].fail = failure
    with pytest.raises(SetupError) as e:
        apply_setup(p, stores)  # type: ignore[arg-type]
    assert e.value.field == "apply" and "rolled back" in e.value.reason
    assert e.value.hint is not None
    assert len(stores[1].txns) == 1  # tried once, no undo there: nothing was written
    assert len(stores[0].txns) == 2
    undo = [_decoded(op) for op in stores[0].txns[1]]
    assert undo == [
        {"Verb": "set", "Key": layout.config_key("east"),
         "Value": stores[0].items[layout.config_key("east")].value.decode()},
        {"Verb": "set", "Key": layout.mesh_key("west"),
         "Value": MeshMember("west", 2, "dc-west", "10.241.0.0/16").to_json()},
    ]


@pytest.mark.parametrize(("failure", "hint"), [
    ("denied", "the token lacks key:write on wiremesh/v1/"),
    (True, "someone changed the same keys meanwhile: run setup again"),
    ("raise", "Consul went away, or someone changed the same keys meanwhile: run setup again"),
])
def test_apply_hint_follows_the_reason_not_the_text(failure: bool | str, hint: str) -> None:
    p, stores = fresh_plan()
    stores[1].fail = failure
    with pytest.raises(SetupError) as e:
        apply_setup(p, stores)  # type: ignore[arg-type]
    assert e.value.hint == hint
    assert isinstance(e.value.__cause__, ConsulError)  # the cause is kept


def test_rollback_deletes_keys_that_did_not_exist() -> None:
    a = two()
    fs = [ConsulFacts("dc-east", ["dc-east", "dc-west"]), ConsulFacts("dc-west", ["dc-east", "dc-west"])]
    stores = [FakeStore(), FakeStore(fail=True)]
    p = plan_setup(a, fs, stores)  # type: ignore[arg-type]
    with pytest.raises(SetupError):
        apply_setup(p, stores)  # type: ignore[arg-type]
    undo = [_decoded(op) for op in stores[0].txns[1]]
    assert undo == [{"Verb": "delete", "Key": w.key} for w in p.writes["dc-east"]]


def test_failure_in_the_first_datacenter_undoes_nothing() -> None:
    p, stores = fresh_plan()
    stores[0].fail = True
    with pytest.raises(SetupError):
        apply_setup(p, stores)  # type: ignore[arg-type]
    assert len(stores[0].txns) == 1 and stores[1].txns == []


def test_failed_rollback_still_raises_the_setup_error() -> None:
    p, stores = fresh_plan()
    stores[1].fail = True

    calls = {"n": 0}
    orig = stores[0].txn

    def txn_then_fail(ops: list[KVOp]) -> tuple[KVItem, ...]:
        calls["n"] += 1
        if calls["n"] == 2:
            stores[0].txns.append([op.to_json() for op in ops])
            raise ConsulError("gone")
        return orig(ops)

    stores[0].txn = txn_then_fail  # type: ignore[method-assign]
    with pytest.raises(SetupError):
        apply_setup(p, stores)  # type: ignore[arg-type]
    assert len(stores[0].txns) == 2


# --- agent_toml and the answer's repr ---------------------------------------------------------


def test_agent_toml_without_token() -> None:
    import tomllib

    text = agent_toml(answer("east"), "dc-east")
    assert text.startswith("# agent.toml for a node of cluster east (datacenter dc-east)\n")
    d = tomllib.loads(text)
    assert d == {"node": "NODE-NAME", "cluster": "east", "underlay_address": "NODE-IP",
                 "consul": {"address": "http://east:8500"}}


def test_agent_toml_with_token_points_at_a_token_file_never_the_token() -> None:
    import tomllib

    text = agent_toml(answer("east", token="s3cr3t-token"), "dc-east")
    assert "s3cr3t-token" not in text
    assert tomllib.loads(text)["consul"] == {"address": "http://east:8500",
                                             "token_file": "/etc/wiremesh/consul-token"}


def test_answer_repr_hides_the_token() -> None:
    a = answer("east", token="s3cr3t-token", datacenter="dc-east")
    assert "s3cr3t-token" not in repr(a) and "s3cr3t-token" not in str(a)
    assert repr(a) == "ClusterAnswer(name='east', consul='http://east:8500', datacenter='dc-east')"
    assert "s3cr3t-token" not in repr([a])
    assert "s3cr3t-token" not in repr(a.options())


def test_answer_options_and_config() -> None:
    a = answer("east", token="", ca_file="", routing="vxlan", mtu=1400, node_prefix_len=26)
    o = a.options()
    assert (o.address, o.token, o.ca_file) == ("http://east:8500", None, None)
    assert a.config() == ClusterConfig(name="east", id=1, pod_cidr="10.240.0.0/16", node_prefix_len=26,
                                       routing="vxlan", mtu=1400)
