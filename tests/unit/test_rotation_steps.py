"""keys.rotation (the pure state machine) and agent.rotation (its executor) without a kernel."""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from wiremesh.agent.rotation import Rotator
from wiremesh.clustermesh import NodeRecord, layout
from wiremesh.clustermesh.rotation import Rotation, RotationReady
from wiremesh.keys import PrivateKey, read_key_file, write_key_file
from wiremesh.keys.rotation import (
    CONFIRM_TIMEOUT_MS,
    LATE_SWITCH_MS,
    LEAD_MS,
    MAX_POSTPONES,
    PEER_DELAY_MS,
    PEER_ROLLBACK_MS,
    READY_MARGIN_MS,
    peer_key,
    staged_step,
    switched_step,
)

T = 1_000_000
LIVE = {"c/a", "c/b"}


def test_staged_waits_for_the_margin_then_postpones_then_abandons() -> None:
    assert staged_step(T - 2000, T, 0, LIVE, {"c/a"}).wake_at == T - READY_MARGIN_MS
    step = staged_step(T - 500, T, 0, LIVE, {"c/a"})
    assert (step.action, step.lagging) == ("postpone", ("c/b",))
    assert staged_step(T - 500, T, MAX_POSTPONES, LIVE, {"c/a"}).action == "abandon"


def test_staged_with_every_peer_ready_waits_for_the_switch_time_then_switches() -> None:
    assert staged_step(T - 500, T, 0, LIVE, LIVE).wake_at == T
    assert staged_step(T, T, 0, LIVE, LIVE).action == "switch"


def test_a_switch_time_missed_while_stopped_is_caught_up_then_given_up() -> None:
    assert staged_step(T + LATE_SWITCH_MS - 1, T, 0, LIVE, set()).action == "switch"
    assert staged_step(T + LATE_SWITCH_MS, T, 0, LIVE, set()).action == "abandon"
    assert LATE_SWITCH_MS < PEER_ROLLBACK_MS  # peers still hold the new key while the node may catch up


def test_switched_is_done_once_every_live_peer_confirmed_else_fails_naming_them() -> None:
    assert switched_step(T + 10, T, LIVE, LIVE).action == "done"
    assert switched_step(T + 10, T, LIVE, {"c/a"}).action == "wait"
    step = switched_step(T + CONFIRM_TIMEOUT_MS, T, LIVE, {"c/a"})
    assert (step.action, step.lagging) == ("fail", ("c/b",))


def test_peers_take_the_next_key_a_moment_after_the_switch_unless_they_refused_it() -> None:
    assert peer_key("old", "new", T, T + PEER_DELAY_MS - 1, set()) == "old"
    assert peer_key("old", "new", T, T + PEER_DELAY_MS, set()) == "new"
    assert peer_key("old", "new", T, T + PEER_DELAY_MS, {"new"}) == "old"
    assert peer_key("old", "", 0, T, set()) == "old"


class Store:
    def __init__(self) -> None:
        self.kv: dict[str, str] = {}

    def put(self, key: str, value: str | bytes, **_: Any) -> bool:
        self.kv[key] = value if isinstance(value, str) else value.decode()
        return True

    def delete(self, key: str, **_: Any) -> bool:
        self.kv.pop(key, None)
        return True


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


def drive(rot: Rotator, own: Rotation | None, ready: Mapping[str, RotationReady], switched: list[PrivateKey],
          hs: Mapping[str, float] | None = None) -> None:
    rot.drive(own, None, {"c/b"}, ready, lambda: dict(hs or {}), switched.append, lambda: None)


def test_a_rotation_from_request_to_done(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    req = Rotation.new("a", clock.now)
    drive(rot, req, {}, switched)
    staged = Rotation.from_json(store.kv[layout.rotation_key("c", "a")])
    assert staged.state == "staged" and staged.switch_at == T + LEAD_MS
    assert stat.S_IMODE(rot.next_file.stat().st_mode) == 0o600
    announced = rot.announce(record(key))
    assert announced.next_public_key == read_key_file(rot.next_file).public_key().base64
    assert announced.switch_at == T + LEAD_MS
    assert key.secret_base64() not in "".join(store.kv.values())
    ready = {"c/b": RotationReady(announced.next_public_key, announced.switch_at)}
    clock.now = T + LEAD_MS
    drive(rot, staged, ready, switched)
    assert [k.public_key().base64 for k in switched] == [announced.next_public_key]
    assert read_key_file(rot.key_file).public_key().base64 == announced.next_public_key
    assert not rot.next_file.exists() and rot.epoch == 1
    assert Rotation.from_json(store.kv[layout.rotation_key("c", "a")]).state == "switched"
    drive(rot, rot.rotation, ready, switched, hs={"c/b": (T + LEAD_MS + 5) / 1000})
    done = Rotation.from_json(store.kv[layout.rotation_key("c", "a")])
    assert (done.state, done.confirmed, done.epoch_to) == ("done", ("c/b",), 1)


def test_a_peer_that_is_never_ready_makes_the_rotation_abandoned_with_the_old_key(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    drive(rot, Rotation.new("a", clock.now), {}, switched)
    for _ in range(MAX_POSTPONES + 1):
        clock.now = rot.switch_at - 500
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


def test_the_peer_side_says_ready_once_and_goes_back_without_a_handshake(rig: Any) -> None:
    rot, store, clock, key, switched = rig
    other = record(PrivateKey.generate())
    nxt = PrivateKey.generate().public_key().base64
    announced = {"c/b": NodeRecord("b", "c", other.endpoint, other.public_key, "10.240.2.0/24", "10.240.2.1",
                                   next_public_key=nxt, switch_at=T + LEAD_MS)}
    rot.take_part(announced)
    rk = layout.rotation_ready_key("c", "a", "c", "b")
    assert RotationReady.from_json(store.kv[rk]) == RotationReady(nxt, T + LEAD_MS)
    assert rot.wake == T + LEAD_MS + PEER_DELAY_MS
    rot.took("c/b", nxt)
    clock.now += PEER_ROLLBACK_MS
    assert rot.check_taken({}) is True and nxt in rot.refused
    rot.take_part({"c/b": other})  # the rotation ended: the word is taken back
    assert rk not in store.kv


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
    clock.now = staged.switch_at + 50
    drive(again, staged, {}, switched)
    rec = Rotation.from_json(store.kv[layout.rotation_key("c", "a")])
    assert rec.state == "switched" and switched == []  # no second switch, not abandoned
    assert again.announce(record(nxt)).next_public_key == ""
