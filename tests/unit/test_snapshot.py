"""clustermesh.parse_cluster: one raw KV snapshot -> validated records, each bad one rejected alone."""

from __future__ import annotations

import json
from typing import Any

import pytest

from wiremesh.clustermesh import ClusterConfig, KVItem, Rejected, layout, overlay_address, parse_cluster
from wiremesh.keys import PrivateKey

CLUSTER = "lab"
CKEY = layout.config_key(CLUSTER)


def _pub(seed: int) -> str:
    return PrivateKey(bytes([seed]) * 32).public_key().base64


def kv(key: str, value: str | bytes, index: int = 10, session: str | None = None) -> KVItem:
    return KVItem(key=key, value=value.encode() if isinstance(value, str) else value, modify_index=index,
                  session=session)


def node_json(name: str, pod_cidr: str, *, seed: int, **over: Any) -> str:
    d: dict[str, Any] = {
        "name": name,
        "cluster": CLUSTER,
        "endpoint": f"192.0.2.{seed}:51820",
        "public_key": _pub(seed),
        "pod_cidr": pod_cidr,
        "overlay_ip": overlay_address(pod_cidr),
    }
    d.update(over)
    return json.dumps(d)


def config_json(**over: Any) -> str:
    d: dict[str, Any] = {"name": CLUSTER, "id": 1, "pod_cidr": "10.240.0.0/16", "node_prefix_len": 24}
    d.update(over)
    return json.dumps(d)


def lease(cidr: str, node: str) -> tuple[str, KVItem]:
    key = layout.ipam_key(CLUSTER, cidr)
    return key, kv(key, node)


def node(name: str, pod_cidr: str, *, seed: int, **over: Any) -> tuple[str, KVItem]:
    key = layout.node_key(CLUSTER, name)
    return key, kv(key, node_json(name, pod_cidr, seed=seed, **over), session="sess-" + name)


def base_items() -> dict[str, KVItem]:
    """A healthy cluster: a config, two nodes, their leases."""
    return dict([
        (CKEY, kv(CKEY, config_json())),
        lease("10.240.1.0/24", "n1"),
        lease("10.240.2.0/24", "n2"),
        node("n1", "10.240.1.0/24", seed=1),
        node("n2", "10.240.2.0/24", seed=2),
    ])


def rejected_for(snap: Any, key: str) -> Rejected:
    found = [r for r in snap.rejected if r.key == key]
    assert len(found) == 1, snap.rejected
    return found[0]


def test_valid_snapshot_keeps_every_node() -> None:
    snap = parse_cluster(CLUSTER, 42, base_items())
    assert snap.cluster == CLUSTER and snap.index == 42
    assert snap.config == ClusterConfig(name=CLUSTER, id=1, pod_cidr="10.240.0.0/16")
    assert sorted(snap.nodes) == ["n1", "n2"]
    assert snap.nodes["n1"].public_key == _pub(1)
    assert snap.nodes["n2"].pod_cidr == "10.240.2.0/24"
    assert snap.leases == {"10.240.1.0/24": "n1", "10.240.2.0/24": "n2"}
    assert snap.rejected == ()


def test_empty_snapshot() -> None:
    snap = parse_cluster(CLUSTER, 0, {})
    assert snap.config is None and snap.nodes == {} and snap.leases == {} and snap.rejected == ()


def test_lease_without_node_record_is_fine() -> None:
    items = base_items()
    items.update([lease("10.240.9.0/24", "n9")])
    snap = parse_cluster(CLUSTER, 1, items)
    assert snap.leases["10.240.9.0/24"] == "n9"
    assert snap.rejected == ()


@pytest.mark.parametrize(
    "extra, reason",
    [
        # pod CIDR outside the cluster's range (even though leased)
        ([lease("10.99.3.0/24", "bad"), node("bad", "10.99.3.0/24", seed=3)],
         "pod_cidr: 10.99.3.0/24 is outside the cluster's pod CIDR 10.240.0.0/16"),
        # an IPv6 pod CIDR in an IPv4 cluster
        ([lease("fd00:3::/64", "bad"), node("bad", "fd00:3::/64", seed=3)],
         "pod_cidr: fd00:3::/64 is outside the cluster's pod CIDR 10.240.0.0/16"),
        # no lease at all
        ([node("bad", "10.240.3.0/24", seed=3)], "pod_cidr: 10.240.3.0/24 has no IPAM lease"),
        # leased to someone else
        ([lease("10.240.3.0/24", "n9"), node("bad", "10.240.3.0/24", seed=3)],
         "pod_cidr: 10.240.3.0/24 is leased to node 'n9'"),
        # claims another live node's CIDR
        ([node("bad", "10.240.1.0/24", seed=3)], "pod_cidr: 10.240.1.0/24 is leased to node 'n1'"),
        # wrong prefix length
        ([lease("10.240.3.0/25", "bad"), node("bad", "10.240.3.0/25", seed=3)], "pod_cidr: 10.240.3.0/25 is not a /24"),
        # name in the record differs from the key
        ([(layout.node_key(CLUSTER, "bad"), kv(layout.node_key(CLUSTER, "bad"), node_json("n3", "10.240.3.0/24", seed=3))),
          lease("10.240.3.0/24", "bad")],
         "name: 'n3' does not match the key's node name 'bad'"),
        # another cluster's record under this cluster's prefix
        ([lease("10.240.3.0/24", "bad"), node("bad", "10.240.3.0/24", seed=3, cluster="other")],
         "cluster: 'other' is not this cluster ('lab')"),
        # record-level validation failures keep their field
        ([lease("10.240.3.0/24", "bad"), node("bad", "10.240.3.0/24", seed=3, endpoint="bad:1")],
         "endpoint: 'bad' is not an IP address"),
        ([(layout.node_key(CLUSTER, "bad"), kv(layout.node_key(CLUSTER, "bad"), "{not json"))], "value: not JSON"),
    ],
)
def test_bad_node_rejected_with_key_and_reason(extra: list[tuple[str, KVItem]], reason: str) -> None:
    items = base_items()
    items.update(extra)
    snap = parse_cluster(CLUSTER, 1, items)
    bad_key = layout.node_key(CLUSTER, "bad")
    r = rejected_for(snap, bad_key)
    assert r.reason.startswith(reason)
    assert not r.reason.startswith(bad_key)  # the key is its own field, not repeated
    assert "bad" not in snap.nodes
    assert sorted(snap.nodes) == ["n1", "n2"]  # everything else keeps working
    assert [x.key for x in snap.rejected] == [bad_key]


@pytest.mark.parametrize("other", ["a0", "z9"])  # sorts before / after the holder n2
def test_public_key_reused_by_another_node_keeps_only_one(other: str) -> None:
    items = base_items()
    items.update([lease("10.240.3.0/24", other), node(other, "10.240.3.0/24", seed=3, public_key=_pub(2))])
    snap = parse_cluster(CLUSTER, 1, items)
    holders = [n for n in (other, "n2") if n in snap.nodes]
    assert len(holders) == 1
    (loser,) = {other, "n2"} - set(holders)
    r = rejected_for(snap, layout.node_key(CLUSTER, loser))
    assert r.reason == f"public_key: already used by node {holders[0]!r}"
    assert "n1" in snap.nodes


def test_invalid_config_falls_back_to_last_config() -> None:
    last = ClusterConfig(name=CLUSTER, id=1, pod_cidr="10.240.0.0/16")
    items = base_items()
    items[CKEY] = kv(CKEY, config_json(id=0))
    snap = parse_cluster(CLUSTER, 2, items, last_config=last)
    assert snap.config is last
    assert rejected_for(snap, CKEY).reason == "id: 0 is outside 1-255"
    assert sorted(snap.nodes) == ["n1", "n2"]  # still checked against the last good config


def test_config_with_wrong_cluster_name_falls_back() -> None:
    last = ClusterConfig(name=CLUSTER, id=1, pod_cidr="10.240.0.0/16")
    items = base_items()
    items[CKEY] = kv(CKEY, config_json(name="other"))
    snap = parse_cluster(CLUSTER, 2, items, last_config=last)
    assert snap.config is last
    assert rejected_for(snap, CKEY).reason == "name: 'other' does not match the key's cluster 'lab'"


def test_invalid_config_without_last_config_rejects_nodes() -> None:
    items = base_items()
    items[CKEY] = kv(CKEY, b"\x00garbage")
    snap = parse_cluster(CLUSTER, 2, items)
    assert snap.config is None
    assert snap.nodes == {}
    assert rejected_for(snap, CKEY).reason.startswith("value: not JSON")
    for n in ("n1", "n2"):
        assert rejected_for(snap, layout.node_key(CLUSTER, n)).reason == (
            "pod_cidr: cluster 'lab' has no valid config to check it against")


def test_valid_config_replaces_last_config() -> None:
    last = ClusterConfig(name=CLUSTER, id=9, pod_cidr="10.240.0.0/16")
    snap = parse_cluster(CLUSTER, 2, base_items(), last_config=last)
    assert snap.config is not None and snap.config.id == 1


def test_missing_config_uses_last_config() -> None:
    last = ClusterConfig(name=CLUSTER, id=1, pod_cidr="10.240.0.0/16")
    items = base_items()
    del items[CKEY]
    snap = parse_cluster(CLUSTER, 2, items, last_config=last)
    assert snap.config is last and sorted(snap.nodes) == ["n1", "n2"] and snap.rejected == ()


def test_bad_ipam_leases_reported() -> None:
    items = base_items()
    bad_owner = layout.ipam_key(CLUSTER, "10.240.7.0/24")
    bad_cidr = layout.ipam_key(CLUSTER, "10.240.8.5/24")
    items[bad_owner] = kv(bad_owner, "Not A Node")
    items[bad_cidr] = kv(bad_cidr, "n8")
    snap = parse_cluster(CLUSTER, 1, items)
    assert rejected_for(snap, bad_owner).reason.startswith("bad IPAM lease (")
    assert "is not a node name" in rejected_for(snap, bad_owner).reason
    assert rejected_for(snap, bad_cidr).reason.startswith("bad IPAM lease (")
    assert "10.240.7.0/24" not in snap.leases and "10.240.8.5/24" not in snap.leases
    assert sorted(snap.nodes) == ["n1", "n2"]


def test_unknown_keys_under_the_prefix_are_reported() -> None:
    items = base_items()
    pfx = layout.cluster_prefix(CLUSTER)
    junk = [pfx + "junk", pfx + "config/extra", pfx + "nodez/n1"]
    for k in junk:
        items[k] = kv(k, "x")
    # Known sub-trees are not "unknown" (a bad service definition is refused as a service).
    for k in (pfx + "rotations/n1", pfx + "services/web"):
        items[k] = kv(k, "{}")
    snap = parse_cluster(CLUSTER, 1, items)
    assert sorted(r.key for r in snap.rejected) == sorted([*junk, pfx + "services/web", pfx + "rotations/n1"])
    assert rejected_for(snap, pfx + "services/web").reason.startswith("name:")
    assert rejected_for(snap, pfx + "rotations/n1").reason.startswith("node:")
    for k in junk:
        assert rejected_for(snap, k).reason == "unknown key in the cluster's prefix"
    assert sorted(snap.nodes) == ["n1", "n2"]


@pytest.mark.parametrize("value", [node_json("bad", "10.240.3.0/24", seed=3, endpoint="192.0.2.3:²"), "[" * 10000])
def test_unexpected_validation_failure_rejects_only_that_record(value: str) -> None:
    items = base_items()
    bad_key = layout.node_key(CLUSTER, "bad")
    items.update([lease("10.240.3.0/24", "bad"), (bad_key, kv(bad_key, value))])
    snap = parse_cluster(CLUSTER, 1, items)
    assert sorted(snap.nodes) == ["n1", "n2"]
    rejected_for(snap, bad_key)


# --- forward compatibility ------------------------------------------------------------------


def test_records_with_unknown_fields_are_used_and_equal_to_plain_ones() -> None:
    plain = parse_cluster(CLUSTER, 5, base_items())
    items = base_items()
    items.update([node("n2", "10.240.2.0/24", seed=2, schema="1.3", next_public_key=_pub(9),
                       signature="c2lnbmF0dXJl", cert={"not_after": 1767225600})])
    items[CKEY] = kv(CKEY, config_json(schema="1.1", audit_level=True))
    snap = parse_cluster(CLUSTER, 5, items)
    assert snap.rejected == ()
    assert snap.config == plain.config and snap.config is not None
    assert snap.config.extra == {"audit_level": True}
    n2 = snap.nodes["n2"]
    assert n2.next_public_key == _pub(9) and n2.extra == {"signature": "c2lnbmF0dXJl", "cert": {"not_after": 1767225600}}
    # Only the new known field makes it a different record; the unknown ones never do.
    assert n2 != plain.nodes["n2"]
    items.update([node("n2", "10.240.2.0/24", seed=2, schema="1.3", signature="other")])
    assert parse_cluster(CLUSTER, 6, items).nodes == plain.nodes


def test_newer_major_node_is_skipped_with_the_reason_and_the_rest_stand() -> None:
    items = base_items()
    items.update([lease("10.240.3.0/24", "n3"), node("n3", "10.240.3.0/24", seed=3, schema="2.0")])
    snap = parse_cluster(CLUSTER, 5, items)
    assert sorted(snap.nodes) == ["n1", "n2"]
    assert snap.rejected == (Rejected(layout.node_key(CLUSTER, "n3"),
                                      "schema: schema version 2.0 is newer than this agent's 1.0; upgrade the agent"),)


def test_newer_major_config_falls_back_to_last_config() -> None:
    last = ClusterConfig(name=CLUSTER, id=1, pod_cidr="10.240.0.0/16")
    items = base_items()
    items[CKEY] = kv(CKEY, config_json(schema="2.0", pod_cidr={"v4": "10.240.0.0/16"}))
    snap = parse_cluster(CLUSTER, 5, items, last)
    assert snap.config is last and sorted(snap.nodes) == ["n1", "n2"]
    assert rejected_for(snap, CKEY).reason == "schema: schema version 2.0 is newer than this agent's 1.0; upgrade the agent"
