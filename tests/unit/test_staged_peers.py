"""A rotating node's next key as a staged (locked) peer entry: planned, diffed, encoded, and
proven by the data plane (agent.staged). The whole path with real wireguard-go is
tests/integration/test_rotation.py (test_consul_outage_during_a_rotation)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from wiremesh.agent.planner import plan_mesh
from wiremesh.agent.staged import LEAD_MS, SLOW_POLL_S, TAIL_MS, SwitchProofs, hot, used
from wiremesh.clustermesh import ClusterConfig, NodeRecord
from wiremesh.keys import PrivateKey
from wiremesh.tunnels import STAGED_PSK, DeviceState, PeerChange, PeerConfig, PeerStatus, peer_changes
from wiremesh.tunnels.kernel import change_to_netlink
from wiremesh.tunnels.uapi import format_set, parse_get

MakeNode = Callable[..., NodeRecord]
OLD, NEXT, OTHER = (PrivateKey(bytes([s]) * 32).public_key() for s in (1, 2, 3))
IPS = frozenset({"10.240.2.0/24"})
EP = "192.0.2.12:51820"


def test_an_announced_next_key_is_staged_until_taken(cluster_config: ClusterConfig, make_node: MakeNode) -> None:
    me = make_node("n1", "10.240.1.0/24")
    n2 = make_node("n2", "10.240.2.0/24", public_key=OLD.base64, endpoint=EP, next_public_key=NEXT.base64)
    st = plan_mesh("n1", me.public_key, cluster_config, {"n1": me, "n2": n2}, local_pod_cidr=me.pod_cidr)
    assert st.peers["lab/n2"].public_key == OLD.base64 and st.peers["lab/n2"].allowed_ips == IPS
    assert st.staged == {"lab/n2": PeerConfig(public_key=NEXT.base64, endpoint=EP, staged=True)}
    # proven by the data plane (no commit seen): the next key is the node's, nothing staged
    st = plan_mesh("n1", me.public_key, cluster_config, {"n1": me, "n2": n2}, local_pod_cidr=me.pod_cidr,
                   proven_keys=frozenset({NEXT.base64}))
    assert st.peers["lab/n2"].public_key == NEXT.base64 and st.staged == {}
    # committed, its switch time long past, no proof: never taken by the clock, still staged
    committed = replace(n2, switch_at=1000)
    st = plan_mesh("n1", me.public_key, cluster_config, {"n1": me, "n2": committed}, local_pod_cidr=me.pod_cidr,
                   now_ms=500_000)
    assert st.peers["lab/n2"].public_key == OLD.base64 and set(st.staged) == {"lab/n2"}


def test_a_next_key_another_node_holds_is_never_staged(cluster_config: ClusterConfig, make_node: MakeNode) -> None:
    me = make_node("n1", "10.240.1.0/24")
    n2 = make_node("n2", "10.240.2.0/24", public_key=OLD.base64, next_public_key=OTHER.base64)
    n3 = make_node("n3", "10.240.3.0/24", public_key=OTHER.base64)
    st = plan_mesh("n1", me.public_key, cluster_config, {"n1": me, "n2": n2, "n3": n3}, local_pod_cidr=me.pod_cidr)
    assert st.staged == {} and st.peers["lab/n3"].public_key == OTHER.base64


def _status(key: str, *, ips: frozenset[str] = frozenset(), staged: bool = False, rx: int = 0) -> PeerStatus:
    return PeerStatus(public_key=key, endpoint=EP, allowed_ips=ips, staged=staged, rx_bytes=rx)


def test_a_staged_entry_is_added_locked_and_promoted_by_recreating_it() -> None:
    node = PeerConfig(public_key=OLD.base64, endpoint=EP, allowed_ips=IPS)
    staged = PeerConfig(public_key=NEXT.base64, endpoint=EP, staged=True)
    actual = {OLD.base64: _status(OLD.base64, ips=IPS)}
    (add,) = peer_changes(actual, {"lab/n2": node, "lab/n2#next": staged}, prune=True)
    assert add == PeerChange(public_key=NEXT.base64, endpoint=EP, allowed_ips=frozenset(), staged=True,
                             name="lab/n2#next")
    # the node switched: its key is the staged one's, which is made again unlocked with the IPs
    actual[NEXT.base64] = _status(NEXT.base64, staged=True, rx=148)
    taken = PeerConfig(public_key=NEXT.base64, endpoint=EP, allowed_ips=IPS)
    (promote,) = peer_changes(actual, {"lab/n2": taken}, prune=False,
                              applied={"lab/n2": node, "lab/n2#next": staged})
    assert promote == PeerChange(public_key=NEXT.base64, endpoint=EP, allowed_ips=IPS, replaces=OLD.base64,
                                 recreate=True, name="lab/n2")


def test_a_staged_entry_nobody_wants_goes_even_before_pruning() -> None:
    node = PeerConfig(public_key=OLD.base64, endpoint=EP, allowed_ips=IPS)
    actual = {OLD.base64: _status(OLD.base64, ips=IPS), NEXT.base64: _status(NEXT.base64, staged=True),
              OTHER.base64: _status(OTHER.base64, ips=frozenset({"10.9.0.0/24"}))}
    changes = peer_changes(actual, {"lab/n2": node}, prune=False)
    assert changes == [PeerChange(public_key=NEXT.base64, remove=True)]  # the stray unlocked one waits for pruning


def test_uapi_locks_unlocks_and_recreates() -> None:
    body = format_set(changes=[PeerChange(public_key=NEXT.base64, endpoint=EP, allowed_ips=frozenset(), staged=True),
                               PeerChange(public_key=NEXT.base64, endpoint=EP, allowed_ips=IPS, recreate=True,
                                          staged=False, update_only=True)])
    lines = body.splitlines()
    first = lines[:lines.index(f"public_key={NEXT.hex}", 2)]
    assert first[1] == f"public_key={NEXT.hex}" and f"preshared_key={STAGED_PSK.hex()}" in first
    assert "remove=true" not in first and "replace_allowed_ips=true" in first and not any(
        x.startswith("allowed_ip=") for x in first)
    second = lines[len(first):]
    assert second[:3] == [f"public_key={NEXT.hex}", "remove=true", f"public_key={NEXT.hex}"]
    assert "update_only=true" not in second and f"preshared_key={'0' * 64}" in second
    assert "allowed_ip=10.240.2.0/24" in second


def test_uapi_get_reports_the_lock() -> None:
    text = (f"public_key={NEXT.hex}\npreshared_key={STAGED_PSK.hex()}\nrx_bytes=148\n"
            f"public_key={OLD.hex}\npreshared_key={'0' * 64}\nallowed_ip=10.240.2.0/24\nerrno=0\n\n")
    peers = parse_get("wm0", text).peers
    assert peers[NEXT.base64].staged and peers[NEXT.base64].rx_bytes == 148 and not peers[OLD.base64].staged


def test_kernel_translation_of_the_lock() -> None:
    nl = change_to_netlink(PeerChange(public_key=NEXT.base64, allowed_ips=frozenset(), staged=True))
    assert nl["preshared_key"] and "update_only" not in nl
    nl = change_to_netlink(PeerChange(public_key=NEXT.base64, allowed_ips=IPS, recreate=True, update_only=True,
                                      staged=False))
    assert "update_only" not in nl and nl["preshared_key"] == "A" * 43 + "="


class _Device:
    def __init__(self, peers: dict[str, PeerStatus]) -> None:
        self.peers = peers
        self.reads = 0

    def show(self) -> DeviceState:
        self.reads += 1
        return DeviceState(name="wm0", public_key=None, listen_port=0, peers=dict(self.peers))


def test_used_needs_a_packet_or_a_handshake() -> None:
    peers = {NEXT.base64: _status(NEXT.base64, staged=True), OLD.base64: _status(OLD.base64, rx=5)}
    assert used(peers, [NEXT.base64, OLD.base64, OTHER.base64]) == {OLD.base64}


def test_proofs_look_at_a_new_next_key_once_and_keep_only_announced_ones() -> None:
    dev = _Device({NEXT.base64: _status(NEXT.base64, ips=IPS, rx=100)})  # taken before a restart
    proofs = SwitchProofs(dev, lambda: None)  # type: ignore[arg-type]
    assert proofs.proven({NEXT.base64, OTHER.base64}) == {NEXT.base64}
    assert proofs.proven({NEXT.base64, OTHER.base64}) == {NEXT.base64} and dev.reads == 1  # looked at once
    assert proofs.proven({OTHER.base64}) == frozenset()  # no longer announced: forgotten


def test_the_watch_wakes_the_loop_when_a_staged_entry_is_used() -> None:
    dev = _Device({NEXT.base64: _status(NEXT.base64, staged=True)})
    woke = threading.Event()
    proofs = SwitchProofs(dev, woke.set)  # type: ignore[arg-type]
    assert proofs.proven({NEXT.base64}) == frozenset()
    stop = threading.Event()
    t = threading.Thread(target=proofs.run, args=(stop,), daemon=True)
    t.start()
    try:
        proofs.watch({"lab/n2": PeerConfig(public_key=NEXT.base64, staged=True)}, {"lab/n2": 0})
        dev.peers[NEXT.base64] = _status(NEXT.base64, staged=True, rx=148)  # the node's initiation
        assert woke.wait(10)
        assert proofs.proven({NEXT.base64}) == {NEXT.base64}
    finally:
        stop.set()
        t.join(10)


def test_the_device_is_read_often_only_while_a_switch_may_be_happening() -> None:
    keys = {"committed-soon": 100_000, "committed-long-ago": 1_000, "uncommitted": 0}
    assert hot(keys, 99_000, consul_up=True) == (set(), min(SLOW_POLL_S, (100_000 - LEAD_MS - 99_000) / 1000))
    assert hot(keys, 100_000 - LEAD_MS - 100, consul_up=True) == (set(), 0.1)  # (the window opens then)
    assert hot(keys, 100_000 - LEAD_MS, consul_up=True)[0] == {"committed-soon"}
    assert hot(keys, 100_000 + 2_000, consul_up=True)[0] == {"committed-soon"}  # (a late switch)
    assert hot(keys, 100_000 + 6_000, consul_up=True)[0] == {"committed-soon"}  # (a starved host's: 5.6 s seen)
    assert hot(keys, 100_000 + TAIL_MS + 1, consul_up=True) == (set(), SLOW_POLL_S)
    # Consul away: a commit may have landed unseen
    assert hot(keys, 200_000, consul_up=False)[0] == {"uncommitted"}


def test_a_held_node_keeps_its_proven_switch(cluster_config: ClusterConfig, make_node: MakeNode) -> None:
    """A node whose session lapsed right after its switch is held with its commit record (old
    key, next key): the proof of its switch stays, so the hold keeps the new key's allowed IPs
    (it gave them back to the old key: a 1.8 s hole at 30 nodes, seen in bench/rotation.py)."""
    from wiremesh.agent.federation import FederationView
    from wiremesh.agent.passes import announced_next_keys
    from wiremesh.agent.planner import with_departed

    me = make_node("n1", "10.240.1.0/24")
    n2 = make_node("n2", "10.240.2.0/24", public_key=OLD.base64, endpoint=EP, next_public_key=NEXT.base64,
                   switch_at=1000)
    remote = make_node("r1", "10.241.1.0/24", public_key=OTHER.base64, next_public_key=OTHER.base64)
    fed = FederationView(nodes={}, members={}, frozen_cidrs=frozenset(), mesh_synced=True,
                         departed={"west": {"r1": remote}})
    dev = _Device({NEXT.base64: _status(NEXT.base64, ips=IPS, rx=100)})
    proofs = SwitchProofs(dev, lambda: None)  # type: ignore[arg-type]
    assert proofs.proven(announced_next_keys({"n1": me, "n2": n2}, {}, fed)) == {NEXT.base64}
    # n2's record vanishes (its session lapsed): planned from the held record
    announced = announced_next_keys({"n1": me}, {"n2": n2}, fed)
    assert announced == {NEXT.base64, OTHER.base64}
    proven = proofs.proven(announced)
    assert proven == {NEXT.base64}
    nodes = with_departed({"n1": me}, {"n2": n2})
    st = plan_mesh("n1", me.public_key, cluster_config, nodes, local_pod_cidr=me.pod_cidr, proven_keys=proven)
    assert st.peers["lab/n2"].public_key == NEXT.base64 and st.peers["lab/n2"].allowed_ips == IPS
    assert st.staged == {}


def test_switches_unseen_are_the_committed_next_keys_not_proven(make_node: MakeNode) -> None:
    from wiremesh.agent.federation import FederationView
    from wiremesh.agent.passes import unseen_switches

    me = make_node("n1", "10.240.1.0/24", next_public_key=OTHER.base64, switch_at=900)
    staged = make_node("n2", "10.240.2.0/24", public_key=OLD.base64, next_public_key=NEXT.base64)
    committed = replace(staged, name="n3", switch_at=1000)
    proven = replace(staged, name="n4", next_public_key=OTHER.base64, switch_at=1100)
    remote = replace(committed, name="r1", cluster="west")
    fed = FederationView(nodes={"west": {"r1": remote}}, members={}, frozen_cidrs=frozenset(), mesh_synced=True)
    nodes = {"n1": me, "n2": staged, "n3": committed, "n4": proven}
    assert unseen_switches("lab", "n1", nodes, fed, frozenset({OTHER.base64})) == {"lab/n3": 1000, "west/r1": 1000}
    # n4's key taken, no handshake on it yet: its switch has not settled here
    assert unseen_switches("lab", "n1", nodes, fed, frozenset({OTHER.base64}), {"lab/n4"}) == \
        {"lab/n3": 1000, "lab/n4": 1100, "west/r1": 1000}
    # n4's key proven since the last pass: this pass takes it, no handshake can be on it yet
    assert unseen_switches("lab", "n1", nodes, fed, frozenset({OTHER.base64}), (), {OTHER.base64}) == \
        {"lab/n3": 1000, "lab/n4": 1100, "west/r1": 1000}


def test_a_proven_switch_postpones_the_periodic_full_pass_not_an_asked_one() -> None:
    from wiremesh.agent.daemon import full_pass_now

    assert full_pass_now(asked=False, due=True, proof_waiting=False)
    assert not full_pass_now(asked=False, due=True, proof_waiting=True)  # the quick pass first
    assert full_pass_now(asked=True, due=False, proof_waiting=True)  # SIGHUP, a new port: as asked
    assert not full_pass_now(asked=False, due=False, proof_waiting=False)
    # put off once only: the pass after one put off is full, proof or not
    assert full_pass_now(asked=False, due=True, proof_waiting=True, postponed=True)
