"""agent.objects: a status and a backoff per desired object, and `sync` of one target kind."""

from __future__ import annotations

import errno
from itertools import pairwise
from typing import Any

import pytest

from wiremesh.agent.objects import BACKOFF_MAX, BACKOFF_MIN, StatusTable, sync
from wiremesh.tunnels import TunnelError

T0 = 1000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class DictTarget:
    """One kind of object in a dict. `refused` keys fail on update and delete."""

    kind = "thing"

    def __init__(self, have: dict[str, Any] | None = None) -> None:
        self.have: dict[str, Any] = dict(have or {})
        self.refused: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def read(self) -> dict[str, Any]:
        self.calls.append(("read", ""))
        return dict(self.have)

    def update(self, key: str, want: Any) -> None:
        self.calls.append(("update", key))
        if key in self.refused:
            raise TunnelError(f"{key}: refused", errno.EINVAL)
        self.have[key] = want

    def delete(self, key: str, have: Any) -> None:
        self.calls.append(("delete", key))
        if key in self.refused:
            raise TunnelError(f"{key}: busy", errno.EBUSY)
        self.have.pop(key, None)

    def written(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] != "read"]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> StatusTable:
    return StatusTable(clock)


def err(msg: str = "Invalid argument") -> TunnelError:
    return TunnelError(msg, errno.EINVAL)


# --- StatusTable ---------------------------------------------------------------------------------


def test_wanted_objects_start_pending(table: StatusTable) -> None:
    table.want("route", {"a": 1, "b": 2})
    assert [(s.kind, s.key, s.state, s.desired) for s in table.snapshot()] == [
        ("route", "a", "pending", 1), ("route", "b", "pending", 2)]
    assert table.count("route", "pending") == 2 and table.count("route", "done") == 0


def test_done_is_fresh_once_and_clears_the_error(table: StatusTable) -> None:
    table.want("route", {"a": 1})
    table.failed("route", "a", err(), T0)
    assert table.done("route", "a") is True
    st = table.get("route", "a")
    assert st is not None
    assert (st.state, st.message, st.attempts, st.retry_at) == ("done", "", 0, 0.0)
    assert st.done_at > 0 and st.as_dict()["programmed_at"] == st.done_at
    assert table.done("route", "a") is False  # already done
    assert table.done("route", "nobody") is False


def test_wanting_the_same_object_again_keeps_its_status(table: StatusTable) -> None:
    table.want("route", {"a": 1})
    table.done("route", "a")
    table.want("route", {"a": 1})
    assert table.count("route", "done") == 1

    table.failed("route", "a", err(), T0)
    table.want("route", {"a": 1})
    st = table.get("route", "a")
    assert st is not None and st.state == "error" and not table.due("route", "a", T0)  # its backoff holds


def test_failure_records_message_and_backoff(table: StatusTable) -> None:
    table.want("route", {"a": 1})
    delay = table.failed("route", "a", err("wm0: route a: Network is unreachable"), T0)
    assert delay == BACKOFF_MIN
    st = table.get("route", "a")
    assert st is not None
    assert (st.state, st.message, st.attempts, st.retry_at, st.op) == (
        "error", "wm0: route a: Network is unreachable", 1, T0 + BACKOFF_MIN, "update")
    assert st.as_dict() == {"kind": "route", "key": "a", "state": "error", "op": "update",
                            "message": "wm0: route a: Network is unreachable", "attempts": 1, "programmed_at": None}
    assert not table.due("route", "a", T0)
    assert not table.due("route", "a", T0 + BACKOFF_MIN - 0.01)
    assert table.due("route", "a", T0 + BACKOFF_MIN)
    assert table.due("route", "unknown", T0) and table.due("other", "a", T0)


def test_backoff_doubles_up_to_the_cap(table: StatusTable) -> None:
    table.want("route", {"a": 1})
    delays = [table.failed("route", "a", err(), T0 + i) for i in range(8)]
    assert delays[:4] == [BACKOFF_MIN, 2 * BACKOFF_MIN, 4 * BACKOFF_MIN, 8 * BACKOFF_MIN]
    assert max(delays) == BACKOFF_MAX and delays[-1] == BACKOFF_MAX
    assert all(b >= a for a, b in pairwise(delays))
    st = table.get("route", "a")
    assert st is not None and st.attempts == 8 and st.retry_at == T0 + 7 + BACKOFF_MAX


def test_a_change_to_the_object_clears_its_retry(table: StatusTable) -> None:
    table.want("route", {"a": 1})
    for _ in range(3):
        table.failed("route", "a", err(), T0)
    table.want("route", {"a": 2})
    st = table.get("route", "a")
    assert st is not None
    assert (st.state, st.attempts, st.retry_at, st.message, st.desired) == ("pending", 0, 0.0, "", 2)
    assert table.due("route", "a", T0)
    assert table.next_retry() is None


def test_objects_no_longer_wanted_are_forgotten(table: StatusTable) -> None:
    table.want("route", {"a": 1, "b": 2})
    table.failed("route", "b", err(), T0)
    table.want("fdb", {"a": 1})
    table.want("route", {"a": 1})
    assert [(s.kind, s.key) for s in table.snapshot()] == [("fdb", "a"), ("route", "a")]  # other kinds stay
    assert table.next_retry() is None


def test_failed_delete_is_kept_as_a_delete_until_done(table: StatusTable) -> None:
    table.want("route", {"a": 1})
    table.done("route", "a")
    table.want("route", {})
    table.failed("route", "a", err("busy"), T0, op="delete")
    st = table.get("route", "a")
    assert st is not None and (st.op, st.state, st.attempts, st.message) == ("delete", "error", 1, "busy")

    table.want("route", {})  # not wanted: but its removal failed, so it stays
    table.failed("route", "a", err("busy"), T0 + 1, op="delete")
    st = table.get("route", "a")
    assert st is not None and st.op == "delete" and st.attempts == 2

    assert table.done("route", "a") is True  # removed at last: the entry goes
    assert table.get("route", "a") is None


def test_failed_delete_of_an_object_wanted_again_becomes_an_update(table: StatusTable) -> None:
    table.want("route", {})
    table.failed("route", "a", err(), T0, op="delete")
    table.want("route", {"a": 1})
    st = table.get("route", "a")
    assert st is not None and (st.op, st.state, st.attempts) == ("update", "pending", 0)


def test_next_retry_is_the_earliest_error(table: StatusTable) -> None:
    assert table.next_retry() is None
    table.want("route", {"a": 1, "b": 2})
    table.want("peer", {"n1": 1})
    table.done("route", "a")
    assert table.next_retry() is None  # nothing in error
    table.failed("route", "b", err(), T0 + 5)
    table.failed("peer", "n1", err(), T0)
    assert table.next_retry() == T0 + BACKOFF_MIN
    table.done("peer", "n1")
    assert table.next_retry() == T0 + 5 + BACKOFF_MIN


def test_pending_retry_only_for_due_errors_of_the_given_kinds(table: StatusTable) -> None:
    table.want("route", {"a": 1})
    table.want("peer", {"n1": 1})
    table.failed("peer", "n1", err(), T0)
    routes = frozenset({"route", "fdb"})
    assert not table.pending_retry(routes, T0 + 10)  # a peer's retry is not the overlay's
    table.failed("route", "a", err(), T0)
    assert not table.pending_retry(routes, T0)
    assert table.pending_retry(routes, T0 + BACKOFF_MIN)
    table.done("route", "a")
    assert not table.pending_retry(routes, T0 + 10)


def test_snapshot_is_a_sorted_copy(table: StatusTable) -> None:
    table.want("route", {"b": 1, "a": 1})
    table.want("fdb", {"z": 1})
    snap = table.snapshot()
    assert [(s.kind, s.key) for s in snap] == [("fdb", "z"), ("route", "a"), ("route", "b")]
    snap[0].state = "error"
    assert table.count("fdb", "error") == 0


def test_forget_drops_the_entry(table: StatusTable) -> None:
    table.want("route", {"a": 1})
    table.failed("route", "a", err(), T0)
    table.forget("route", "a")
    table.forget("route", "a")  # twice is fine
    assert table.get("route", "a") is None and table.next_retry() is None


# --- sync: one target kind ----------------------------------------------------------------------


def test_sync_updates_only_what_differs(table: StatusTable) -> None:
    t = DictTarget({"a": 1, "b": 2})
    counts = sync(table, t, {"a": 1, "b": 3, "c": 4}, prune=True)
    assert t.written() == [("update", "b"), ("update", "c")]
    assert t.have == {"a": 1, "b": 3, "c": 4}
    assert (counts.changed, counts.removed, counts.errors) == (2, 0, 0)
    assert table.count("thing", "done") == 3  # what already matched is done too

    t.calls.clear()
    counts = sync(table, t, {"a": 1, "b": 3, "c": 4}, prune=True)
    assert t.written() == [] and counts.changed == 0


def test_sync_prunes_only_with_prune(table: StatusTable) -> None:
    t = DictTarget({"a": 1, "stale": 9})
    counts = sync(table, t, {"a": 1}, prune=False)
    assert "stale" in t.have and counts.removed == 0 and t.written() == []

    counts = sync(table, t, {"a": 1}, prune=True)
    assert t.have == {"a": 1} and counts.removed == 1 and t.written() == [("delete", "stale")]
    assert table.get("thing", "stale") is None


def test_sync_keep_protects_from_pruning(table: StatusTable) -> None:
    t = DictTarget({"a": 1, "kept": 1, "stale": 1})
    counts = sync(table, t, {"a": 1}, prune=True, keep=lambda key: key == "kept")
    assert set(t.have) == {"a", "kept"} and counts.removed == 1
    assert table.get("thing", "kept") is None  # kept, not owned: no status


def test_sync_refused_key_does_not_block_the_others(table: StatusTable, clock: Clock) -> None:
    t = DictTarget({"stale": 1})
    t.refused = {"b"}
    counts = sync(table, t, {"a": 1, "b": 2, "c": 3}, prune=True)
    assert t.have == {"a": 1, "c": 3}  # the others landed, the stale one went
    assert (counts.changed, counts.removed, counts.errors) == (2, 1, 1)
    st = table.get("thing", "b")
    assert st is not None and (st.state, st.message, st.attempts) == ("error", "b: refused", 1)
    assert table.next_retry() == T0 + BACKOFF_MIN


def test_sync_uses_the_table_clock_or_the_given_time(table: StatusTable, clock: Clock) -> None:
    t = DictTarget()
    t.refused = {"a"}
    sync(table, t, {"a": 1}, prune=False)
    assert table.next_retry() == T0 + BACKOFF_MIN
    sync(table, t, {"a": 1}, prune=False, now=T0 + 100)
    assert table.next_retry() == T0 + 100 + 2 * BACKOFF_MIN


def test_sync_leaves_a_failed_object_alone_until_its_retry(table: StatusTable, clock: Clock) -> None:
    t = DictTarget()
    t.refused = {"b"}
    sync(table, t, {"a": 1, "b": 2}, prune=True)
    t.calls.clear()

    counts = sync(table, t, {"a": 1, "b": 2}, prune=True, now=T0 + BACKOFF_MIN / 2)
    assert t.written() == [] and counts.errors == 1  # still in error, not retried yet

    t.refused.clear()
    counts = sync(table, t, {"a": 1, "b": 2}, prune=True, now=T0 + BACKOFF_MIN)
    assert t.written() == [("update", "b")] and counts.errors == 0
    assert table.count("thing", "done") == 2 and table.next_retry() is None


def test_sync_changed_object_is_tried_at_once_despite_backoff(table: StatusTable) -> None:
    t = DictTarget()
    t.refused = {"b"}
    sync(table, t, {"b": 2}, prune=False)
    t.refused.clear()
    t.calls.clear()
    sync(table, t, {"b": 3}, prune=False, now=T0)  # same instant, other value
    assert t.written() == [("update", "b")] and t.have == {"b": 3}


def test_sync_object_fixed_by_someone_else_is_done(table: StatusTable) -> None:
    t = DictTarget()
    t.refused = {"a"}
    sync(table, t, {"a": 1}, prune=False)
    t.have["a"] = 1  # it appeared by other means
    sync(table, t, {"a": 1}, prune=False, now=T0)
    st = table.get("thing", "a")
    assert st is not None and st.state == "done" and table.next_retry() is None


def test_sync_delete_failure_is_recorded_and_retried(table: StatusTable) -> None:
    t = DictTarget({"stale": 1})
    t.refused = {"stale"}
    counts = sync(table, t, {}, prune=True)
    assert counts.errors == 1 and counts.removed == 0
    st = table.get("thing", "stale")
    assert st is not None and (st.op, st.state, st.message) == ("delete", "error", "stale: busy")

    t.calls.clear()
    sync(table, t, {}, prune=True, now=T0 + BACKOFF_MIN / 2)
    assert t.written() == []  # its backoff holds

    t.refused.clear()
    counts = sync(table, t, {}, prune=True, now=T0 + BACKOFF_MIN)
    assert counts.removed == 1 and t.have == {}
    assert table.get("thing", "stale") is None and table.next_retry() is None


def test_sync_failed_delete_of_an_object_that_went_by_itself_is_forgotten(table: StatusTable) -> None:
    # Nothing is left to delete: an error entry kept for it would never be retried nor cleared,
    # and next_retry() would stay in the past for ever (the agent's loop would spin on it).
    t = DictTarget({"stale": 1})
    t.refused = {"stale"}
    sync(table, t, {}, prune=True)
    del t.have["stale"]

    sync(table, t, {}, prune=True, now=T0 + 10)

    assert table.get("thing", "stale") is None
    assert table.next_retry() is None


def test_sync_does_not_swallow_programming_errors(table: StatusTable) -> None:
    class Broken(DictTarget):
        def update(self, key: str, want: Any) -> None:
            raise ValueError("a bug, not a kernel refusal")

    with pytest.raises(ValueError):
        sync(table, Broken(), {"a": 1}, prune=False)
