"""keys.rotation (the pure state machine) and agent.rotation (its executor) without a kernel."""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from wiremesh.agent.rotation import Rotator
from wiremesh.agent.rotation_peer import KICK_IDLE_MS, KICK_MS
from wiremesh.clustermesh import NodeRecord, layout
from wiremesh.clustermesh.consul_values import KVItem
from wiremesh.clustermesh.rotation import Rotation, RotationReady
from wiremesh.keys import PrivateKey, read_key_file, write_key_file
from wiremesh.keys.rotation import (
    COMMIT_LEAD_MS,
    CONFIRM_TIMEOUT_MS,
    ORDER_TIMEOUT_MS,
    PEER_WATCH_MS,
    READY_TIMEOUT_MS,
    SWITCH_SPACING_MS,
    commit_order,
    committed_step,
    peer_key,
    staged_step,
    switch_time,
    switched_step,
)

T = 1_000_000
LIVE = {"c/a", "c/b"}


def test_staged_commits_once_every_live_peer_is_ready_else_waits_then_abandons() -> None:
    assert staged_step(T, T, LIVE, LIVE, frozenset()).action == "commit"
    step = staged_step(T + 10, T, LIVE, {"c/a"}, frozenset())
    assert (step.action, step.wake_at, step.lagging) == ("wait", T + READY_TIMEOUT_MS, ("c/b",))
    step = staged_step(T + READY_TIMEOUT_MS, T, LIVE, {"c/a"}, frozenset())
    assert (step.action, step.lagging) == ("abandon", ("c/b",))


def test_staged_waits_for_nodes_before_it_to_commit_first() -> None:
    assert commit_order("c/b", ["c/a", "c/c", "d/a"]) == {"c/a"}
    step = staged_step(T + READY_TIMEOUT_MS, T, LIVE, LIVE, frozenset({"c/a"}))
    assert (step.action, step.lagging) == ("wait", ("c/a",))  # its peers are ready: no timeout yet
    assert staged_step(T + ORDER_TIMEOUT_MS, T, LIVE, LIVE, frozenset({"c/a"})).action == "abandon"


def test_committed_switches_at_its_time_and_late_after_a_stop() -> None:
    assert committed_step(T - 1, T) .wake_at == T
    assert committed_step(T, T).action == "switch"
    assert committed_step(T + 60_000, T).action == "switch"  # no way back once committed


def test_switch_times_keep_apart_from_every_committed_one() -> None:
    assert switch_time(T, []) == T
    assert switch_time(T, [T - SWITCH_SPACING_MS, T + SWITCH_SPACING_MS]) == T
    assert switch_time(T, [T + 100]) == T + 100 + SWITCH_SPACING_MS
    assert switch_time(T, [T + 100, T + 350, T + 2000]) == T + 350 + SWITCH_SPACING_MS
    assert switch_time(T, [T - 299]) == T + 1


def test_switched_is_done_once_every_live_peer_confirmed_else_fails_naming_them() -> None:
    assert switched_step(T + 10, T, LIVE, LIVE).action == "done"
    assert switched_step(T + 10, T, LIVE, {"c/a"}).action == "wait"
    step = switched_step(T + CONFIRM_TIMEOUT_MS, T, LIVE, {"c/a"})
    assert (step.action, step.lagging) == ("fail", ("c/b",))


def test_peers_take_the_next_key_only_on_the_nodes_proof() -> None:
    assert peer_key("old", "new") == "old"  # announced (staged or committed, whatever the time)
    assert peer_key("old", "new", {"new"}) == "new"  # its initiation with it came: it switched
    assert peer_key("old", "", {"new"}) == "old"


class Store:
    def __init__(self) -> None:
        self.kv: dict[str, str] = {}

    def put(self, key: str, value: str | bytes, **_: Any) -> bool:
        self.kv[key] = value if isinstance(value, str) else value.decode()
        return True

    def delete(self, key: str, **_: Any) -> bool:
        self.kv.pop(key, None)
        return True

    def get(self, key: str, **_: Any) -> KVItem | None:
        return KVItem(key, self.kv[key].encode(), 1) if key in self.kv else None


class Clock:
    def __init__(self) -> None:
        self.now = T

    def __call__(self) -> int:
        return self.now


def record(key: PrivateKey) -> NodeRecord:
    return NodeRecord("a", "c", "192.0.2.1:51820", key.public_key().base64, "10.240.1.0/24", "10.240.1.1")


@pytest.fixture
def rig(tmp_path: Path) -> tuple[Rotator, Store, Clock, PrivateKey, list[PrivateKey]]:
    key = PrivateKey.generate()
    write_key_file(tmp_path / "private.key", key)
    store, clock = Store(), Clock()
    rot = Rotator(store, "c", "a", tmp_path / "private.key", clock=clock)  # type: ignore[arg-type]
    return rot, store, clock, key, []


class Publisher:
    """The node's record as the rotator has it published (publish_now), or a failing Consul."""

    def __init__(self, rot: Rotator, key: PrivateKey) -> None:
        self.rot, self.key, self.ok = rot, key, True
        self.published: list[NodeRecord] = []

    def __call__(self, commit_at: int = 0) -> bool:
        """A write made at once (the agent's answers come a pass later: agent.rotation_link)."""
        if self.ok:
            rec = self.rot.announce(record(self.key))
            self.published.append(dataclasses.replace(rec, switch_at=commit_at) if commit_at else rec)
            if commit_at:
                self.rot.committed(commit_at, rec.next_public_key)
        return self.ok


def drive(rot: Rotator, own: Rotation | None, ready: Mapping[str, RotationReady], switched: list[PrivateKey],
          hs: Mapping[str, float] | None = None, publish: Any = None,
          announced: Mapping[str, NodeRecord] | None = None) -> None:
    rot.drive(own, {"c/b"}, ready, lambda: dict(hs or {}), switched.append, publish or (lambda _at: True),
              lambda: None, announced)


def test_a_rotation_from_request_to_done(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    pub = Publisher(rot, key)
    req = Rotation.new("a", clock.now)
    drive(rot, req, {}, switched, publish=pub)
    staged = Rotation.from_json(store.kv[layout.rotation_key("c", "a")])
    assert staged.state == "staged" and staged.switch_at == 0
    assert stat.S_IMODE(rot.next_file.stat().st_mode) == 0o600
    nxt = read_key_file(rot.next_file).public_key().base64
    assert (pub.published[-1].next_public_key, pub.published[-1].switch_at) == (nxt, 0)  # staged: no time yet
    assert key.secret_base64() not in "".join(store.kv.values())
    clock.now += 50
    drive(rot, staged, {}, switched, publish=pub)  # b not ready: waits, nothing decided
    assert rot.switch_at == 0 and rot.wake == T + READY_TIMEOUT_MS
    ready = {"c/b": RotationReady(nxt)}
    drive(rot, staged, ready, switched, publish=pub)
    committed = Rotation.from_json(store.kv[layout.rotation_key("c", "a")])
    at = T + 50 + COMMIT_LEAD_MS
    assert (committed.state, committed.switch_at) == ("committed", at)
    assert pub.published[-1].switch_at == at and rot.wake == at
    clock.now = at - 1
    drive(rot, committed, ready, switched, publish=pub)
    assert switched == [] and not rot.switch_due()
    clock.now = at
    assert rot.switch_due()
    drive(rot, committed, ready, switched, publish=pub)
    assert [k.public_key().base64 for k in switched] == [nxt]
    assert read_key_file(rot.key_file).public_key().base64 == nxt
    assert not rot.next_file.exists() and rot.epoch == 1
    assert Rotation.from_json(store.kv[layout.rotation_key("c", "a")]).state == "switched"
    drive(rot, rot.rotation, ready, switched, hs={"c/b": (at + 5) / 1000})
    done = Rotation.from_json(store.kv[layout.rotation_key("c", "a")])
    assert (done.state, done.confirmed, done.epoch_to) == ("done", ("c/b",), 1)


def test_a_commit_consul_did_not_take_is_not_a_commit(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    pub = Publisher(rot, key)
    drive(rot, Rotation.new("a", clock.now), {}, switched, publish=pub)
    ready = {"c/b": RotationReady(read_key_file(rot.next_file).public_key().base64)}
    pub.ok = False
    drive(rot, rot.rotation, ready, switched, publish=pub)
    assert rot.switch_at == 0 and rot.rotation.state == "staged" and rot.wake == clock.now + 1000
    clock.now += 60_000
    drive(rot, rot.rotation, ready, switched, publish=pub)
    assert switched == []  # never switches on a switch time its peers may not know
    pub.ok = True
    drive(rot, rot.rotation, ready, switched, publish=pub)
    assert rot.rotation.state == "committed" and rot.switch_at == clock.now + COMMIT_LEAD_MS


def test_commits_wait_for_nodes_before_and_keep_apart_from_theirs(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    drive(rot, Rotation.new("a", clock.now), {}, switched)
    nxt = read_key_file(rot.next_file).public_key().base64
    ready = {"c/b": RotationReady(nxt)}
    other = record(PrivateKey.generate())
    first = dataclasses.replace(other, name="0", next_public_key=PrivateKey.generate().public_key().base64)
    drive(rot, rot.rotation, ready, switched, announced={"b/0": first})  # "b/0" < "c/a": it commits first
    assert rot.rotation.state == "staged"
    at = clock.now + COMMIT_LEAD_MS
    drive(rot, rot.rotation, ready, switched, announced={"b/0": dataclasses.replace(first, switch_at=at)})
    assert rot.rotation.state == "committed" and rot.switch_at == at + SWITCH_SPACING_MS


def test_a_peer_that_is_never_ready_makes_the_rotation_abandoned_with_the_old_key(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    drive(rot, Rotation.new("a", clock.now), {}, switched)
    clock.now += READY_TIMEOUT_MS
    drive(rot, rot.rotation, {}, switched)
    end = Rotation.from_json(store.kv[layout.rotation_key("c", "a")])
    assert (end.state, end.lagging) == ("abandoned", ("c/b",))
    assert switched == [] and not rot.next_file.exists()
    assert read_key_file(rot.key_file) == key
    assert rot.announce(record(key)).next_public_key == ""


def test_restart_after_the_device_switched_promotes_the_next_key(rig: Any, tmp_path: Path) -> None:
    rot, store, clock, key, switched = rig
    nxt = PrivateKey.generate()
    write_key_file(rot.next_file, nxt)
    again = Rotator(store, "c", "a", tmp_path / "private.key", clock=clock)  # type: ignore[arg-type]
    assert again.recover(nxt.public_key().base64) == nxt
    assert read_key_file(tmp_path / "private.key") == nxt and not again.next_file.exists() and again.epoch == 1


def test_restart_before_the_switch_keeps_the_next_key_staged(rig: Any, tmp_path: Path) -> None:
    rot, store, clock, key, switched = rig
    nxt = PrivateKey.generate()
    write_key_file(rot.next_file, nxt)
    again = Rotator(store, "c", "a", tmp_path / "private.key", clock=clock)  # type: ignore[arg-type]
    assert again.recover(key.public_key().base64) is None
    assert again.next_key == nxt and read_key_file(tmp_path / "private.key") == key


def test_the_peer_side_says_ready_once_and_never_gives_a_taken_key_back(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    other = record(PrivateKey.generate())
    nxt = PrivateKey.generate().public_key().base64
    staged = NodeRecord("b", "c", other.endpoint, other.public_key, "10.240.2.0/24", "10.240.2.1",
                        next_public_key=nxt)
    rot.peer.take_part({"c/b": staged})
    rk = layout.rotation_ready_key("c", "a", "c", "b")
    assert RotationReady.from_json(store.kv[rk]) == RotationReady(nxt)
    assert rot.wake is None  # staged: nothing to take yet
    del store.kv[rk]
    at = T + COMMIT_LEAD_MS
    rot.peer.take_part({"c/b": dataclasses.replace(staged, switch_at=at)})
    assert rk not in store.kv  # said once
    assert rot.wake is None  # committed: nothing to do by the clock (the key is taken on the proof)
    rot.peer.took("c/b", nxt)
    clock.now += PEER_WATCH_MS
    rot.peer.check_taken({})
    assert rot.peer.taken == {}  # no longer watched, never given back
    rot.peer.take_part({"c/b": other})  # the rotation ended: the word is taken back
    assert rk not in store.kv


def test_restart_after_the_commit_switches_at_the_announced_time(rig: Any, tmp_path: Path) -> None:
    rot, store, clock, key, switched = rig
    nxt = PrivateKey.generate()
    write_key_file(rot.next_file, nxt)
    at = T + 700
    rec = dataclasses.replace(record(key), next_public_key=nxt.public_key().base64, switch_at=at)
    store.kv[layout.node_key("c", "a")] = rec.to_json()  # the commit; the rotation record still says staged
    own = Rotation("a", "0123456789abcdef", "staged", next_fingerprint=nxt.public_key().fingerprint)
    store.kv[layout.rotation_key("c", "a")] = own.to_json()
    again = Rotator(store, "c", "a", tmp_path / "private.key", clock=clock)  # type: ignore[arg-type]
    assert again.recover(key.public_key().base64) is None
    again.resume()
    assert again.switch_at == at and again.announce(record(key)).switch_at == at
    clock.now = at + 30_000  # however late
    drive(again, own, {}, switched)
    assert [k.public_key().base64 for k in switched] == [nxt.public_key().base64]


def test_scheduled_rotation_comes_at_the_node_s_phase_and_never_beside_another(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    nodes = ["a", "b", "c", "d"]  # "a" is first: phase 0 of the period
    hour = 3600
    rot.schedule(hour, nodes, {}, key_age_from=T)
    assert layout.rotation_key("c", "a") not in store.kv
    due = rot.wake
    assert due is not None and due >= T + hour * 1000 and due % (hour * 1000) == 0
    clock.now = due
    busy = {"b": Rotation("b", "0123456789abcdef", "staged")}
    rot.schedule(hour, nodes, busy, key_age_from=T)  # another node is rotating: not now
    assert layout.rotation_key("c", "a") not in store.kv
    rot.schedule(hour, nodes, {}, key_age_from=T)
    assert Rotation.from_json(store.kv[layout.rotation_key("c", "a")]).state == "requested"


def test_stopped_between_the_switch_and_writing_it_down_the_rotation_is_switched(rig: Any, tmp_path: Path) -> None:
    rot, store, clock, key, switched = rig
    drive(rot, Rotation.new("a", clock.now), {}, switched)
    staged = rot.rotation
    nxt = read_key_file(rot.next_file)
    again = Rotator(store, "c", "a", tmp_path / "private.key", clock=clock)  # type: ignore[arg-type]
    assert again.recover(nxt.public_key().base64) == nxt  # the device had taken it
    clock.now += COMMIT_LEAD_MS + 50
    drive(again, staged, {}, switched)
    rec = Rotation.from_json(store.kv[layout.rotation_key("c", "a")])
    assert rec.state == "switched" and switched == []  # no second switch, not abandoned
    assert again.announce(record(nxt)).next_public_key == ""


def test_readiness_words_are_read_for_one_rotating_node_and_bad_ones_refused() -> None:
    from wiremesh.clustermesh.rotation import parse_ready
    nxt = PrivateKey.generate().public_key().base64
    word = RotationReady(nxt).to_json().encode()
    items = {layout.rotation_ready_key("c", "b", "c", "a"): word,  # b is ready for c/a
             layout.rotation_ready_key("c", "d", "x", "a"): word,  # another node's rotation (x/a)
             layout.rotation_ready_key("c", "e", "c", "a"): b"{",
             layout.ready_prefix("c") + "f/c": word}
    ready, refused = parse_ready("c", items, "c/a")
    assert ready == {"c/b": RotationReady(nxt)}
    assert {k for k, _ in refused} == {layout.rotation_ready_key("c", "e", "c", "a"), layout.ready_prefix("c") + "f/c"}
    assert layout.ready_prefix("c") not in layout.cluster_prefix("c")  # no agent's main watch wakes for it


def test_a_switched_rotation_does_not_fail_while_consul_is_away(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    up = [True]
    rot.consul_up = lambda: up[0]
    drive(rot, Rotation.new("a", clock.now), {}, switched)
    ready = {"c/b": RotationReady(read_key_file(rot.next_file).public_key().base64)}
    drive(rot, rot.rotation, ready, switched)
    clock.now = rot.switch_at
    drive(rot, rot.rotation, ready, switched)
    assert rot.rotation.state == "switched"
    up[0] = False
    clock.now += CONFIRM_TIMEOUT_MS + 5000  # b missed the commit and cannot learn of it: no verdict
    drive(rot, rot.rotation, ready, switched)
    assert rot.rotation.state == "switched"
    up[0] = True
    back = clock.now
    drive(rot, rot.rotation, ready, switched)
    assert rot.rotation.state == "switched"  # Consul back: b has CONFIRM_TIMEOUT_MS from now
    drive(rot, rot.rotation, ready, switched, hs={"c/b": (back + 300) / 1000})
    assert rot.rotation.state == "done"


def test_a_pass_is_held_for_the_switch_close_ahead_but_never_past_it(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    rot.next_key, rot.switch_at = PrivateKey.generate(), T + 1000
    clock.now = T + 500
    assert rot.hold_until(250) is None  # too far ahead: the pass goes on
    clock.now = T + 900
    assert rot.hold_until(250) == T + 1000  # close ahead: held until it, then done first
    clock.now = T + 1030  # due (the loop woke late): never held
    assert rot.hold_until(250) is None


def test_a_next_key_that_cannot_be_saved_fails_the_rotation_with_the_reason(rig: Any, tmp_path: Path) -> None:
    rot, store, clock, key, switched = rig
    (tmp_path / "full").write_text("")  # a file where a directory should be: writing under it fails
    rot.next_file = tmp_path / "full" / "private.key.next"
    pub = Publisher(rot, key)
    drive(rot, Rotation.new("a", clock.now), {}, switched, publish=pub)
    ended = Rotation.from_json(store.kv[layout.rotation_key("c", "a")])
    assert ended.state == "failed" and "next key could not be saved" in ended.error
    assert rot.next_key is None and pub.published == [] and switched == []


def test_a_commit_under_way_is_decided_only_by_its_answer(rig: Any) -> None:
    """The record write of a commit is the registration thread's: the loop asks, then looks."""
    rot, store, clock, key, switched = rig
    answers: list[bool | None] = []
    asked: list[int] = []

    def publish(commit_at: int) -> bool | None:
        asked.append(commit_at)
        return answers.pop(0) if answers else True

    drive(rot, Rotation.new("a", clock.now), {}, switched, publish=publish)
    staged = Rotation.from_json(store.kv[layout.rotation_key("c", "a")])
    nxt = read_key_file(rot.next_file).public_key().base64
    answers[:] = [None, None]  # under way, twice
    drive(rot, staged, {"c/b": RotationReady(nxt)}, switched, publish=publish)
    at = asked[-1]
    assert at and rot.switch_at == 0 and rot.wake == clock.now + 1000
    clock.now += 30
    drive(rot, staged, {}, switched, publish=publish)  # b's word gone meanwhile: nothing is decided again
    assert asked[-1] == at and rot.switch_at == 0
    rot.committed(at, nxt)  # the registration thread wrote it
    drive(rot, staged, {}, switched, publish=publish)
    assert rot.switch_at == at and rot.wake == at
    assert Rotation.from_json(store.kv[layout.rotation_key("c", "a")]).state == "committed"


def test_a_taken_key_without_a_handshake_is_kicked_once_then_rolled_back(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    new = PrivateKey.generate().public_key().base64
    rot.peer.took("c/b", new)
    clock.now += KICK_MS - 1
    assert rot.peer.kicks_due({}, {new: 148}) == []
    clock.now += 1
    assert rot.peer.kicks_due({}, {new: 0}) == []  # nothing came back yet: a slow handshake, not a crossed one
    assert rot.peer.kicks_due({}, {new: 148}) == ["c/b"]  # crossed handshakes: the peer is made again
    assert rot.peer.kicks_due({}) == []  # once
    assert rot.peer.kicks_due({new: clock.now / 1000}) == []
    other = PrivateKey.generate().public_key().base64
    rot.peer.took("c/c", other)
    clock.now += KICK_MS
    assert rot.peer.kicks_due({other: clock.now / 1000}) == []  # its handshake came: nothing to do
    idle = PrivateKey.generate().public_key().base64
    rot.peer.took("c/d", idle)
    clock.now += KICK_IDLE_MS - 1
    done = {other: clock.now / 1000}
    assert rot.peer.kicks_due(done, {idle: 0}) == []
    clock.now += 1
    assert rot.peer.kicks_due(done, {idle: 0}) == ["c/d"]  # nothing at all for a second: made again all the same


def test_a_key_taken_before_this_nodes_own_switch_is_never_kicked(rig: Any) -> None:
    """Its handshake waits for the peer to take this node's new key: making the entry again
    would drop what this node holds queued for the peer."""
    rot, store, clock, key, switched = rig
    new = PrivateKey.generate().public_key().base64
    rot.peer.took("c/b", new)
    clock.now += 50
    rot.peer.switched(clock.now)
    clock.now += KICK_IDLE_MS
    assert rot.peer.kicks_due({}, {new: 148}) == []
    later = PrivateKey.generate().public_key().base64
    rot.peer.took("c/c", later)  # taken after the switch: kicked as ever
    clock.now += KICK_MS
    assert rot.peer.kicks_due({}, {new: 148, later: 148}) == ["c/c"]


def test_after_its_switch_the_record_says_the_commit_until_the_rotation_ends(rig: Any) -> None:
    """Peers take the new key from the data plane: a record with the new key as its public key
    before every peer saw the node's first handshake would make a late peer start its own."""
    rot, store, clock, key, switched = rig
    base = record(key)
    nxt = PrivateKey.generate()
    write_key_file(rot.next_file, nxt)
    rot.next_key, rot.switch_at, rot.staged_at = nxt, T, T
    own = Rotation.new("a", T)
    rot.rotation = dataclasses.replace(own, state="committed", switch_at=T, next_fingerprint=nxt.public_key().fingerprint)
    clock.now = T
    rot._switch(T, lambda k: True, lambda: None)
    held = rot.announce(dataclasses.replace(base, public_key=nxt.public_key().base64))
    assert (held.public_key, held.next_public_key, held.switch_at, held.key_epoch) == (
        key.public_key().base64, nxt.public_key().base64, T, 0)
    rot._end("done", "", (), lambda: None)
    after = rot.announce(dataclasses.replace(base, public_key=nxt.public_key().base64))
    assert (after.public_key, after.next_public_key, after.switch_at, after.key_epoch) == (
        nxt.public_key().base64, "", 0, 1)


def test_the_epoch_is_raised_once_for_a_key_changed_outside_a_rotation(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    assert rot.raise_epoch(3) and rot.epoch == 3 and rot.epoch_file.read_text().strip() == "3"
    assert not rot.raise_epoch(3) and not rot.raise_epoch(2)  # never lowered, never twice
    rot.next_key = PrivateKey.generate()  # a rotation under way owns the epoch
    assert not rot.raise_epoch(9) and rot.epoch == 3


def test_a_switch_waits_for_the_unseen_switches_committed_before_it() -> None:
    from wiremesh.keys import switch_waits_for
    assert switch_waits_for("c/b", T, {"c/a": T - 300, "c/c": T + 300, "d/a": T - 9000}) == ["c/a", "d/a"]
    assert switch_waits_for("c/b", T, {"c/a": T, "c/c": T}) == ["c/a"]  # equal times: the lower id first
    assert switch_waits_for("c/b", T, {}) == []


def _committed(rot: Rotator, clock: Any, switched: list[PrivateKey]) -> int:
    drive(rot, Rotation.new("a", clock.now), {}, switched)
    ready = {"c/b": RotationReady(read_key_file(rot.next_file).public_key().base64)}
    drive(rot, rot.rotation, ready, switched)
    assert rot.rotation.state == "committed"
    return rot.switch_at


def test_a_switch_is_held_until_the_earlier_one_shows_on_the_data_plane(rig: Any) -> None:
    """Two commits that came back late from a slow Consul made two nodes switch 110 ms apart:
    each addressed the other's old key and neither tunnel came back for 12 s."""
    rot, store, clock, key, switched = rig
    at = _committed(rot, clock, switched)
    earlier = {"b/0": at - SWITCH_SPACING_MS}
    clock.now = at + 4000  # (its commit's write came back this late)
    assert not rot.switch_due(earlier)
    drive(rot, rot.rotation, {}, switched)
    assert switched == [] and rot.wake == at + 4000 + 50  # (looked at again soon: a handshake wakes nothing)
    assert not rot.switch_due({**earlier, "c/z": at + SWITCH_SPACING_MS})  # (a later one: never waited for)
    clock.now += 30
    assert rot.switch_due({"c/z": at + SWITCH_SPACING_MS})  # the earlier switch was seen: at once
    drive(rot, rot.rotation, {}, switched)
    assert len(switched) == 1


def test_a_switch_held_for_a_node_stays_held_when_that_nodes_switch_time_moves_later(rig: Any) -> None:
    """Seen at 30 nodes: a node retried its commit after a write of unknown outcome, with a new
    switch time later than this node's. Going at once on seeing it, this node switched together
    with it; neither reached the other for 15 s."""
    rot, store, clock, key, switched = rig
    at = _committed(rot, clock, switched)
    clock.now = at
    assert not rot.switch_due({"b/0": at - 500})
    clock.now += 50
    assert not rot.switch_due({"b/0": at + 540})  # its commit again, later than ours: still held
    clock.now += 50
    assert rot.switch_due({})  # its switch was seen
    drive(rot, rot.rotation, {}, switched)
    assert len(switched) == 1


def test_a_switch_waits_for_an_earlier_one_only_so_long(rig: Any) -> None:
    from wiremesh.keys import SWITCH_DEFER_MS
    rot, store, clock, key, switched = rig
    at = _committed(rot, clock, switched)
    clock.now = at
    assert not rot.switch_due({"b/0": at - 1})
    clock.now = at + SWITCH_DEFER_MS
    assert rot.switch_due({"b/0": at - 1})  # (its node may have stopped: never held for good)
    drive(rot, rot.rotation, {}, switched)
    assert len(switched) == 1


def test_a_record_built_during_the_switch_never_names_the_current_key_as_next(rig: Any) -> None:
    """The registration thread builds the record at any moment; built while the agent had taken
    the new key as its own but the rotator had not yet marked the switch, it said the new key as
    current and as next: refused by every peer, which cut the node for 2 s (seen at 30 nodes)."""
    rot, store, clock, key, switched = rig
    at = _committed(rot, clock, switched)
    clock.now = at
    seen: list[NodeRecord] = []

    def switch(new: PrivateKey) -> bool:
        # the agent takes the key as its own here; a record built now (another thread):
        seen.append(rot.announce(record(new)))
        seen.append(rot.announce(record(key)))
        return True
    rot.drive(rot.rotation, {"c/b"}, {}, lambda: {}, switch, lambda _at: True, lambda: None, {})
    assert rot.rotation.state == "switched" and len(seen) == 2
    for rec in seen:  # as committed: the old key, the new one next
        assert (rec.public_key, rec.next_public_key) == (key.public_key().base64, read_key_file(rot.key_file).public_key().base64)
    after = rot.announce(record(read_key_file(rot.key_file)))
    assert after.next_public_key != after.public_key  # (a record never names its current key as next)
