"""clustermesh.federation: mesh membership records and which members are accepted (pure)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from wiremesh.clustermesh import InvalidRecord, KVItem, MeshMember, Rejected, check_members, layout, parse_mesh


def member_json(name: str = "east", **over: Any) -> str:
    d: dict[str, Any] = {"name": name, "id": 1, "datacenter": name, "pod_cidr": "10.240.0.0/16"}
    d.update(over)
    return json.dumps(d)


def kv(key: str, value: str | bytes, index: int = 10) -> KVItem:
    return KVItem(key=key, value=value.encode() if isinstance(value, str) else value, modify_index=index)


def rec(name: str, **over: Any) -> tuple[str, KVItem]:
    key = layout.mesh_key(name)
    return key, kv(key, member_json(name, **over))


def mem(name: str, cid: int, cidr: str, dc: str | None = None) -> tuple[str, MeshMember]:
    return layout.mesh_key(name), MeshMember(name, cid, dc or name, cidr)


# --- MeshMember.from_json ---------------------------------------------------------------------


def test_valid_record_round_trips() -> None:
    m = MeshMember.from_json(member_json("east", id=7, datacenter="dc-East_1", pod_cidr="10.240.0.0/16"))
    assert m == MeshMember("east", 7, "dc-East_1", "10.240.0.0/16")
    assert MeshMember.from_json(m.to_json()) == m
    assert json.loads(m.to_json()) == {"name": "east", "id": 7, "datacenter": "dc-East_1", "pod_cidr": "10.240.0.0/16"}


def test_pod_network_property() -> None:
    assert str(MeshMember("a", 1, "a", "10.240.0.0/16").pod_network) == "10.240.0.0/16"


def test_ipv6_pod_cidr_is_canonicalised() -> None:
    m = MeshMember.from_json(member_json(pod_cidr="FD00:0240::/48"))
    assert m.pod_cidr == "fd00:240::/48"


@pytest.mark.parametrize("name", ["", "East", "-east", "east-", "e_st", "a" * 33, "e.st", 5, None])
def test_bad_name_is_refused(name: object) -> None:
    with pytest.raises(InvalidRecord) as e:
        MeshMember.from_json(member_json(name=name), key="k")  # type: ignore[arg-type]
    assert e.value.field == "name" and e.value.key == "k"


@pytest.mark.parametrize("name", ["a", "e1", "east-2", "a" * 32, "0"])
def test_good_names(name: str) -> None:
    assert MeshMember.from_json(member_json(name=name, datacenter="dc")).name == name


@pytest.mark.parametrize("cid", [0, 256, -1, 1000])
def test_id_outside_1_255_is_refused(cid: int) -> None:
    with pytest.raises(InvalidRecord) as e:
        MeshMember.from_json(member_json(id=cid))
    assert e.value.field == "id" and "1-255" in e.value.reason


@pytest.mark.parametrize("cid", [1, 255])
def test_id_bounds_accepted(cid: int) -> None:
    assert MeshMember.from_json(member_json(id=cid)).id == cid


@pytest.mark.parametrize("cid", ["1", 1.0, True, None])
def test_id_of_wrong_type_is_refused(cid: object) -> None:
    with pytest.raises(InvalidRecord) as e:
        MeshMember.from_json(member_json(id=cid))
    assert e.value.field == "id"


@pytest.mark.parametrize("dc", ["", "dc 1", "dc/1", "dc.1", "d" * 65, "dé"])
def test_bad_datacenter_is_refused(dc: str) -> None:
    with pytest.raises(InvalidRecord) as e:
        MeshMember.from_json(member_json(datacenter=dc))
    assert e.value.field == "datacenter"


@pytest.mark.parametrize("dc", [1, None, ["east"]])
def test_datacenter_of_wrong_type_is_refused(dc: object) -> None:
    with pytest.raises(InvalidRecord) as e:
        MeshMember.from_json(member_json(datacenter=dc))
    assert e.value.field == "datacenter"


def test_datacenter_of_64_characters_is_accepted() -> None:
    assert MeshMember.from_json(member_json(datacenter="d" * 64)).datacenter == "d" * 64


@pytest.mark.parametrize("cidr", ["10.240.0.1/16", "10.240.0.0/33", "banana", "", 10, None])
def test_bad_pod_cidr_is_refused(cidr: object) -> None:
    with pytest.raises(InvalidRecord) as e:
        MeshMember.from_json(member_json(pod_cidr=cidr))
    assert e.value.field == "pod_cidr"


def test_unknown_field_is_ignored_and_kept() -> None:
    m = MeshMember.from_json(member_json(vni=4, schema="1.2", signature={"by": "east"}))
    assert m == MeshMember("east", 1, "east", "10.240.0.0/16")
    assert (m.schema, m.extra) == ("1.2", {"vni": 4, "signature": {"by": "east"}})
    assert json.loads(m.to_json()) == json.loads(member_json(vni=4, schema="1.2", signature={"by": "east"}))
    assert "schema" not in json.loads(MeshMember("east", 1, "east", "10.240.0.0/16").to_json())


def test_newer_major_version_is_refused() -> None:
    with pytest.raises(InvalidRecord) as e:
        MeshMember.from_json(member_json(schema="2.0"), key="k")
    assert (e.value.field, e.value.reason) == ("schema", "schema version 2.0 is newer than this agent's 1.0; "
                                                         "upgrade the agent")


def test_parse_mesh_skips_a_newer_major_and_keeps_its_last_valid_version() -> None:
    key, good = rec("west", id=2, pod_cidr="10.241.0.0/16")
    last = {key: MeshMember.from_json(good.value)}
    items = dict([rec("east"), rec("west", id=2, pod_cidr="10.241.0.0/16", schema="2.0")])
    m = parse_mesh(items, "east", last_good=last)
    assert sorted(m.members) == ["east", "west"]
    assert m.refused == (Rejected(key, "schema: schema version 2.0 is newer than this agent's 1.0; upgrade the "
                                       "agent; its last valid version is kept"),)


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b"\xff\xfe", b"x" * 20000])
def test_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRecord) as e:
        MeshMember.from_json(raw)
    assert e.value.field == "value"


# --- parse_mesh -------------------------------------------------------------------------------


def test_parse_mesh_accepts_valid_members() -> None:
    items = dict([rec("east"), rec("west", id=2, pod_cidr="10.241.0.0/16")])
    m = parse_mesh(items, "east")
    assert m.members == {"east": MeshMember("east", 1, "east", "10.240.0.0/16"),
                         "west": MeshMember("west", 2, "west", "10.241.0.0/16")}
    assert m.refused == ()


def test_parse_mesh_ignores_keys_outside_the_mesh_prefix() -> None:
    other = layout.config_key("east")
    items = dict([rec("east"), (other, kv(other, "whatever"))])
    m = parse_mesh(items, "east")
    assert set(m.members) == {"east"} and m.refused == ()


def test_key_and_name_mismatch_is_refused() -> None:
    key = layout.mesh_key("west")
    m = parse_mesh({key: kv(key, member_json("east"))}, None)
    assert m.members == {}
    assert len(m.refused) == 1
    r = m.refused[0]
    assert r.key == key
    assert r.reason.startswith("name: ") and "'east'" in r.reason
    assert not r.reason.startswith(key)  # the key is the Rejected's key, not repeated in the reason


def test_invalid_records_are_refused_with_key_and_reason_and_the_rest_stand() -> None:
    bad_id = rec("west", id=0, pod_cidr="10.241.0.0/16")
    garbage_key = layout.mesh_key("north")
    items = dict([rec("east"), bad_id, (garbage_key, kv(garbage_key, b"{"))])
    m = parse_mesh(items, "east")
    assert set(m.members) == {"east"}
    by_key = {r.key: r.reason for r in m.refused}
    assert set(by_key) == {bad_id[0], garbage_key}
    assert by_key[bad_id[0]].startswith("id: ") and "1-255" in by_key[bad_id[0]]
    assert by_key[garbage_key].startswith("value: not JSON")


def test_parse_mesh_of_nothing() -> None:
    m = parse_mesh({}, "east")
    assert m.members == {} and m.refused == ()


# --- check_members ----------------------------------------------------------------------------


def test_duplicate_id_refused_lower_name_wins() -> None:
    m = check_members([mem("b", 3, "10.241.0.0/16"), mem("a", 3, "10.240.0.0/16")], None)
    assert set(m.members) == {"a"}
    assert m.refused == (Rejected(layout.mesh_key("b"), "cluster id 3 is already cluster 'a''s"),)


def test_local_cluster_is_taken_first() -> None:
    # Same id: the local cluster wins although 'a' sorts first.
    m = check_members([mem("a", 3, "10.240.0.0/16"), mem("z", 3, "10.241.0.0/16")], "z")
    assert set(m.members) == {"z"}
    assert [r.key for r in m.refused] == [layout.mesh_key("a")]


def test_lower_id_is_taken_first() -> None:
    m = check_members([mem("a", 9, "10.240.0.0/16"), mem("b", 2, "10.240.0.0/16")], None)
    assert set(m.members) == {"b"}
    assert m.refused[0].key == layout.mesh_key("a")
    assert "overlaps cluster 'b'" in m.refused[0].reason


def test_overlapping_pod_cidr_refused() -> None:
    m = check_members([mem("a", 1, "10.240.0.0/16"), mem("b", 2, "10.240.128.0/17")], None)
    assert set(m.members) == {"a"}
    assert m.refused == (Rejected(layout.mesh_key("b"),
                                  "pod_cidr 10.240.128.0/17 overlaps cluster 'a''s 10.240.0.0/16"),)


def test_a_supernet_overlaps_too() -> None:
    m = check_members([mem("a", 1, "10.240.0.0/16"), mem("b", 2, "10.0.0.0/8")], None)
    assert set(m.members) == {"a"}


def test_ipv4_and_ipv6_never_overlap() -> None:
    m = check_members([mem("a", 1, "10.240.0.0/16"), mem("b", 2, "::/0")], None)
    assert set(m.members) == {"a", "b"} and m.refused == ()


def test_duplicate_datacenter_refused() -> None:
    m = check_members([mem("a", 1, "10.240.0.0/16", "dc1"), mem("b", 2, "10.241.0.0/16", "dc1")], None)
    assert set(m.members) == {"a"}
    assert m.refused == (Rejected(layout.mesh_key("b"), "datacenter 'dc1' is already cluster 'a''s"),)


def test_refused_member_does_not_block_others() -> None:
    # b is refused (id of a); its CIDR must not count against c.
    m = check_members([mem("a", 1, "10.240.0.0/16"), mem("b", 1, "10.241.0.0/16"),
                       mem("c", 3, "10.241.0.0/16")], None)
    assert set(m.members) == {"a", "c"}


def test_earlier_refusals_are_kept() -> None:
    earlier = [Rejected("k", "bad")]
    m = check_members([mem("a", 1, "10.240.0.0/16")], None, earlier)
    assert m.refused == (Rejected("k", "bad"),)
    assert earlier == [Rejected("k", "bad")]  # the caller's list is not changed


def test_same_decision_whatever_the_input_order() -> None:
    found = [
        mem("east", 1, "10.240.0.0/16"),
        mem("west", 2, "10.241.0.0/16"),
        mem("dup-id", 2, "10.242.0.0/16"),
        mem("overlap", 3, "10.241.128.0/17"),
        mem("same-dc", 4, "10.243.0.0/16", "east"),
        mem("north", 5, "10.244.0.0/16"),
    ]
    for local in (None, "west", "north"):
        results = {(tuple(sorted(m.members.items())), tuple(sorted(m.refused, key=lambda r: r.key)))
                   for m in (check_members(list(p), local) for p in itertools.permutations(found))}
        assert len(results) == 1


def test_parse_mesh_same_decision_whatever_the_key_order() -> None:
    items = [rec("east"), rec("west", id=1, pod_cidr="10.241.0.0/16"), rec("south", id=3, pod_cidr="10.240.0.0/17")]
    outcomes = {(tuple(sorted(parse_mesh(dict(p), "west").members)),
                 tuple(sorted(r.key for r in parse_mesh(dict(p), "west").refused)))
                for p in itertools.permutations(items)}
    # west is local: it keeps id 1; east loses its id; south then overlaps nobody accepted.
    assert outcomes == {(("south", "west"), (layout.mesh_key("east"),))}
