"""agent.federation: mesh membership -> remote clusters, their snapshots -> what the planner sees."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from wiremesh.agent.federation import Federation, Remote
from wiremesh.agent.metrics import AgentMetrics
from wiremesh.clustermesh import KVItem, Membership, MeshMember, layout, overlay_address, parse_cluster, parse_mesh
from wiremesh.clustermesh.snapshot import ClusterSnapshot
from wiremesh.keys import PrivateKey

LOCAL = "east"


class BlockingStore:
    """A store whose watches yield nothing and block until told to stop, so watch threads idle."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.watches: list[tuple[str, str | None]] = []
        self.watching = threading.Condition(self.lock)

    def watch(self, prefix: str, stop: Any, wait_s: int = 30, dc: str | None = None) -> Iterator[tuple[int, dict[str, KVItem]]]:
        with self.lock:
            self.watches.append((prefix, dc))
            self.watching.notify_all()
        while not stop.is_set():
            stop.wait(0.05)
        return
        yield  # a generator, as ConsulStore.watch is

    def wait_for_watch(self, prefix: str, dc: str | None, timeout: float = 10.0) -> bool:
        with self.lock:
            return self.watching.wait_for(lambda: (prefix, dc) in self.watches, timeout)


class Env:
    def __init__(self, local: str = LOCAL) -> None:
        self.store = BlockingStore()
        self.stop = threading.Event()
        self.changes = 0
        self.metrics = AgentMetrics()
        self.fed = Federation(self.store, local, self.stop, self._changed, self.metrics)  # type: ignore[arg-type]

    def _changed(self) -> None:
        self.changes += 1

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def env() -> Iterator[Env]:
    before = set(threading.enumerate())
    e = Env()
    yield e
    e.stop.set()
    e.fed.close()
    started = [t for t in threading.enumerate() if t not in before and t.name.startswith(("watch-", "mesh-"))]
    for t in started:
        t.join(timeout=10)
    assert not [t.name for t in started if t.is_alive()]


# --- building records -------------------------------------------------------------------------


def mesh_item(name: str, cid: int, cidr: str, dc: str | None = None) -> tuple[str, KVItem]:
    key = layout.mesh_key(name)
    value = json.dumps({"name": name, "id": cid, "datacenter": dc or f"dc-{name}", "pod_cidr": cidr})
    return key, KVItem(key, value.encode(), 5)


def mesh(*records: tuple[str, KVItem], local: str = LOCAL) -> Membership:
    return parse_mesh(dict(records), local)


EAST = mesh_item("east", 1, "10.240.0.0/16")
WEST = mesh_item("west", 2, "10.241.0.0/16")
NORTH = mesh_item("north", 3, "10.242.0.0/16")


def snapshot(cluster: str, pod_cidr: str, nodes: dict[str, str], *, config_cidr: str | None = None,
             index: int = 42, config: bool = True) -> ClusterSnapshot:
    """parse_cluster over hand-made KV items: a config, and per node a lease and a record."""
    items: dict[str, KVItem] = {}
    if config:
        ckey = layout.config_key(cluster)
        items[ckey] = KVItem(ckey, json.dumps({"name": cluster, "id": 9, "pod_cidr": config_cidr or pod_cidr,
                                               "node_prefix_len": 24}).encode(), 3)
    for i, (name, cidr) in enumerate(sorted(nodes.items()), start=1):
        lkey = layout.ipam_key(cluster, cidr)
        items[lkey] = KVItem(lkey, name.encode(), 4)
        nkey = layout.node_key(cluster, name)
        rec = {"name": name, "cluster": cluster, "endpoint": f"198.51.100.{i}:51820",
               "public_key": PrivateKey(bytes([i + len(cluster)]) * 32).public_key().base64,
               "pod_cidr": cidr, "overlay_ip": overlay_address(cidr)}
        items[nkey] = KVItem(nkey, json.dumps(rec).encode(), 10 + i)
    return parse_cluster(cluster, index, items)


def remote(env: Env, name: str) -> Remote:
    with env.fed.lock:
        return env.fed.remotes[name]


# --- membership -------------------------------------------------------------------------------


def test_before_any_membership_nothing_is_known(env: Env) -> None:
    v = env.fed.view()
    assert (v.nodes, v.members, v.frozen_cidrs, v.mesh_synced) == ({}, {}, frozenset(), False)
    assert env.fed.status() == {}


def test_remotes_are_the_accepted_members_other_than_the_local_one(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST, NORTH))
    assert set(env.fed.remotes) == {"west", "north"}
    assert remote(env, "west").member == MeshMember("west", 2, "dc-west", "10.241.0.0/16")
    assert env.changes == 1
    v = env.fed.view()
    assert v.mesh_synced is True
    assert set(v.members) == {"east", "west", "north"}
    assert v.nodes == {}
    # Never seen yet: their pod CIDRs are left alone on the device.
    assert v.frozen_cidrs == frozenset({"10.241.0.0/16", "10.242.0.0/16"})


def test_each_remote_is_watched_through_its_datacenter(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST))
    assert env.store.wait_for_watch(layout.cluster_prefix("west"), "dc-west")


def test_refused_member_is_not_a_remote_and_is_counted(env: Env) -> None:
    clash = mesh_item("south", 4, "10.241.128.0/17")  # overlaps west
    env.fed._take_membership(mesh(EAST, WEST, clash))
    assert set(env.fed.remotes) == {"west"}
    assert env.sample("wiremesh_invalid_records_total", reason="mesh") == 1.0


def test_member_removed_from_the_mesh_is_dropped(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST, NORTH))
    north = remote(env, "north")
    env.fed._take_remote(north, snapshot("north", "10.242.0.0/16", {"n1": "10.242.1.0/24"}))

    env.fed._take_membership(mesh(EAST, WEST))

    assert set(env.fed.remotes) == {"west"}
    assert north.stop.is_set()  # its watch ends
    v = env.fed.view()
    assert "north" not in v.nodes and "10.242.0.0/16" not in v.frozen_cidrs
    assert set(v.members) == {"east", "west"}


def test_changed_member_is_watched_afresh(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST))
    old = remote(env, "west")
    env.fed._take_remote(old, snapshot("west", "10.241.0.0/16", {"w1": "10.241.1.0/24"}))

    env.fed._take_membership(mesh(EAST, mesh_item("west", 2, "10.243.0.0/16")))

    new = remote(env, "west")
    assert new is not old and old.stop.is_set() and not new.stop.is_set()
    assert new.snapshot is None
    v = env.fed.view()
    assert v.nodes == {} and v.frozen_cidrs == frozenset({"10.243.0.0/16"})


def test_same_membership_again_keeps_the_remotes(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST))
    first = remote(env, "west")
    env.fed._take_membership(mesh(EAST, WEST))
    assert remote(env, "west") is first and not first.stop.is_set()
    assert env.changes == 2


def test_local_cluster_not_a_member_means_no_remotes(env: Env) -> None:
    env.fed._take_membership(mesh(WEST, NORTH))
    assert env.fed.remotes == {}
    v = env.fed.view()
    assert v.nodes == {} and v.frozen_cidrs == frozenset() and v.mesh_synced is True


def test_local_cluster_leaving_the_mesh_drops_every_remote(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST))
    west = remote(env, "west")
    env.fed._take_membership(mesh(WEST, NORTH))
    assert env.fed.remotes == {} and west.stop.is_set()


def test_local_cluster_refused_means_no_remotes(env: Env) -> None:
    # The local cluster is taken first, so it can only be refused for an invalid record.
    bad_east = (layout.mesh_key("east"), KVItem(layout.mesh_key("east"), b"{}", 5))
    env.fed._take_membership(mesh(bad_east, WEST))
    assert env.fed.remotes == {}


def test_empty_mesh_means_no_remotes(env: Env) -> None:
    env.fed._take_membership(mesh())
    assert env.fed.remotes == {}
    assert env.fed.view().mesh_synced is True


# --- remote snapshots -------------------------------------------------------------------------


def test_snapshot_makes_a_remotes_nodes_visible(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST, NORTH))
    snap = snapshot("west", "10.241.0.0/16", {"w1": "10.241.1.0/24", "w2": "10.241.2.0/24"})
    assert set(snap.nodes) == {"w1", "w2"} and snap.rejected == ()

    env.fed._take_remote(remote(env, "west"), snap)

    v = env.fed.view()
    assert v.nodes == {"west": snap.nodes}
    assert v.frozen_cidrs == frozenset({"10.242.0.0/16"})  # north still unseen
    assert env.sample("wiremesh_remote_cluster_up", cluster="west") == 1.0
    assert env.changes == 2
    st = env.fed.status()["west"]
    assert st == {"datacenter": "dc-west", "id": 2, "pod_cidr": "10.241.0.0/16", "reachable": True, "synced": True,
                  "refused": None, "waiting": None, "nodes": 2}
    assert env.fed.status()["north"]["synced"] is False


def test_view_is_a_copy(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST))
    env.fed._take_remote(remote(env, "west"), snapshot("west", "10.241.0.0/16", {"w1": "10.241.1.0/24"}))
    v = env.fed.view()
    v.nodes["west"].clear()
    assert set(env.fed.view().nodes["west"]) == {"w1"}


def test_remote_with_no_nodes_is_synced_and_not_frozen(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST))
    env.fed._take_remote(remote(env, "west"), snapshot("west", "10.241.0.0/16", {}))
    v = env.fed.view()
    assert v.nodes == {"west": {}} and v.frozen_cidrs == frozenset()


def test_remote_whose_config_disagrees_with_its_mesh_record_is_refused(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST))
    snap = snapshot("west", "10.241.0.0/16", {"w1": "10.241.1.0/24"}, config_cidr="10.241.0.0/17")
    assert snap.config is not None and snap.config.pod_cidr == "10.241.0.0/17" and "w1" in snap.nodes

    env.fed._take_remote(remote(env, "west"), snap)

    v = env.fed.view()
    assert "west" not in v.nodes
    assert "10.241.0.0/16" not in v.frozen_cidrs  # refused: not programmed, not protected
    refused = env.fed.status()["west"]["refused"]
    assert isinstance(refused, str) and "10.241.0.0/17" in refused and "10.241.0.0/16" in refused


def test_remote_without_a_valid_config_is_frozen(env: Env) -> None:
    # Not refused: a config that is missing for a moment (or was written badly) must not make
    # every node prune its working tunnels to that cluster.
    env.fed._take_membership(mesh(EAST, WEST))
    env.fed._take_remote(remote(env, "west"), snapshot("west", "10.241.0.0/16", {}, config=False))
    v = env.fed.view()
    assert "west" not in v.nodes and v.frozen_cidrs == frozenset({"10.241.0.0/16"})
    assert env.fed.status()["west"]["refused"] is None
    assert "no valid config" in str(env.fed.status()["west"]["waiting"])


def test_refused_remote_is_accepted_once_its_config_agrees(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST))
    r = remote(env, "west")
    env.fed._take_remote(r, snapshot("west", "10.241.0.0/16", {}, config_cidr="10.241.0.0/17"))
    assert "west" not in env.fed.view().nodes

    env.fed._take_remote(r, snapshot("west", "10.241.0.0/16", {"w1": "10.241.1.0/24"}))

    assert set(env.fed.view().nodes["west"]) == {"w1"}
    assert env.fed.status()["west"]["refused"] is None


def test_snapshot_of_a_dropped_remote_is_ignored(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST))
    west = remote(env, "west")
    env.fed._take_membership(mesh(EAST))
    changes = env.changes

    env.fed._take_remote(west, snapshot("west", "10.241.0.0/16", {"w1": "10.241.1.0/24"}))

    assert env.fed.view().nodes == {} and west.snapshot is None
    assert env.changes == changes


def test_snapshot_keeps_its_invalid_records_out(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, WEST))
    snap = snapshot("west", "10.241.0.0/16", {"w1": "10.241.1.0/24", "w2": "10.250.2.0/24"})  # w2 outside
    assert [r.key for r in snap.rejected] == [layout.node_key("west", "w2")]
    env.fed._take_remote(remote(env, "west"), snap)
    assert set(env.fed.view().nodes["west"]) == {"w1"}


def test_same_network_spelled_differently_is_not_refused(env: Env) -> None:
    env.fed._take_membership(mesh(EAST, mesh_item("west", 2, "FD00:0241::/48")))
    assert remote(env, "west").member.pod_cidr == "fd00:241::/48"
    ckey = layout.config_key("west")
    cfg = json.dumps({"name": "west", "id": 2, "pod_cidr": "FD00:241::/48", "node_prefix_len": 64})
    snap = parse_cluster("west", 7, {ckey: KVItem(ckey, cfg.encode(), 3)})
    assert snap.config is not None

    env.fed._take_remote(remote(env, "west"), snap)

    assert env.fed.status()["west"]["refused"] is None
    assert env.fed.view().nodes == {"west": {}}


def test_a_remote_node_whose_record_vanished_is_held_like_a_local_one(env: Env) -> None:
    """A remote node's session lapsed on a busy host (seen under a CPU hog: its tunnel from the
    other cluster cut for 1 s while its own cluster kept it): held as agent.departures holds a
    local one, and planned from its last record meanwhile."""
    env.fed._take_membership(mesh(EAST, WEST))
    west = remote(env, "west")
    both = snapshot("west", "10.241.0.0/16", {"w1": "10.241.1.0/24", "w2": "10.241.2.0/24"})
    env.fed._take_remote(west, both)
    env.fed._take_remote(west, snapshot("west", "10.241.0.0/16", {"w1": "10.241.1.0/24"}))
    v = env.fed.view()
    assert set(v.nodes["west"]) == {"w1"} and v.departed == {"west": {"w2": both.nodes["w2"]}}
    assert env.fed.next_departure_end() is not None
    env.fed._take_remote(west, both)  # registered again within the hold
    assert env.fed.view().departed == {} and env.fed.next_departure_end() is None
