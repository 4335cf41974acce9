"""A status beside every desired dataplane object, with its own backoff (after cilium/statedb).

Every object the agent programs (a WireGuard peer, a route, an FDB or neighbour entry, the
VXLAN device, an MTU) has an entry: pending until programmed, done, or error with the kernel's
message. Only the reconciler writes done or error. An object that failed is retried on its own
backoff while the others are programmed; a change to the object clears its retry. A removal
that failed keeps an entry too (state error, op delete) until it succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from wiremesh.tunnels import Target, TunnelError

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

BACKOFF_MIN = 0.2
# Local kernel objects and the local device: a refused object is retried at least every 1.6 s,
# so it is programmed within 2 s of the obstacle going; one retry costs one netlink call.
BACKOFF_MAX = 1.6


@dataclass(slots=True)
class ObjectStatus:
    kind: str
    key: str
    state: str = "pending"  # pending | done | error
    message: str = ""
    attempts: int = 0
    retry_at: float = 0.0
    desired: Any = None
    done_at: float = 0.0  # wall-clock time the current desired value was programmed
    op: str = "update"  # update | delete

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "state": self.state, "op": self.op, "message": self.message,
                "attempts": self.attempts, "programmed_at": self.done_at or None}


@dataclass(slots=True)
class SyncCounts:
    changed: int = 0
    removed: int = 0
    errors: int = 0


class StatusTable:
    """Every object's status, by (kind, key). Thread-safe for readers; one writer (the loop)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: dict[tuple[str, str], ObjectStatus] = {}
        self._lock = threading.Lock()
        self.clock = clock

    def want(self, kind: str, desired: Mapping[str, Any]) -> None:
        """Make `desired` the wanted objects of `kind`: new ones pending, changed ones pending with
        their backoff cleared, ones no longer wanted forgotten (but failed removals kept)."""
        with self._lock:
            for k in [k for k in self._entries if k[0] == kind and k[1] not in desired]:
                if self._entries[k].op != "delete":
                    del self._entries[k]
            for key, obj in desired.items():
                st = self._entries.get((kind, key))
                if st is None or st.op == "delete" or st.desired != obj:
                    self._entries[(kind, key)] = ObjectStatus(kind, key, desired=obj)

    def due(self, kind: str, key: str, now: float) -> bool:
        st = self._entries.get((kind, key))
        return st is None or st.state != "error" or st.retry_at <= now

    def get(self, kind: str, key: str) -> ObjectStatus | None:
        return self._entries.get((kind, key))

    def done(self, kind: str, key: str) -> bool:
        """Mark programmed; True if it was not already done."""
        with self._lock:
            st = self._entries.get((kind, key))
            if st is None:
                return False
            if st.op == "delete":
                del self._entries[(kind, key)]
                return True
            fresh = st.state != "done"
            if fresh:
                st.state, st.message, st.attempts, st.retry_at, st.done_at = "done", "", 0, 0.0, time.time()
            return fresh

    def failed(self, kind: str, key: str, err: Exception, now: float, *, op: str = "update") -> float:
        """Record a failure and schedule the retry; returns the delay."""
        with self._lock:
            st = self._entries.get((kind, key))
            if st is None or st.op != op:
                st = self._entries[(kind, key)] = ObjectStatus(kind, key, op=op, desired=st.desired if st else None)
            st.attempts += 1
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** (st.attempts - 1))
            st.state, st.message, st.retry_at = "error", str(err), now + delay
            return delay

    def settle_deletes(self, kind: str, present: Mapping[str, Any]) -> None:
        """Forget failed removals of `kind` whose object went by itself (nothing left to retry)."""
        with self._lock:
            for k in [k for k, st in self._entries.items() if k[0] == kind and st.op == "delete" and k[1] not in present]:
                del self._entries[k]

    def forget_kind(self, kind: str) -> None:
        """Forget every entry of `kind` (its objects went with their device)."""
        with self._lock:
            for k in [k for k in self._entries if k[0] == kind]:
                del self._entries[k]

    def forget(self, kind: str, key: str) -> None:
        with self._lock:
            self._entries.pop((kind, key), None)

    def next_retry(self) -> float | None:
        with self._lock:
            times = [st.retry_at for st in self._entries.values() if st.state == "error"]
        return min(times) if times else None

    def pending_retry(self, kinds: frozenset[str], now: float) -> bool:
        """True if an object of one of `kinds` failed and its retry is due."""
        with self._lock:
            return any(st.state == "error" and st.retry_at <= now and st.kind in kinds for st in self._entries.values())

    def errors(self) -> int:
        """How many objects are in error (no copies: it runs on every pass)."""
        with self._lock:
            return sum(1 for st in self._entries.values() if st.state == "error")

    def count(self, kind: str, state: str) -> int:
        with self._lock:
            return sum(1 for st in self._entries.values() if st.kind == kind and st.state == state)

    def snapshot(self) -> list[ObjectStatus]:
        """A copy of every entry, sorted by kind and key, safe to read from another thread."""
        with self._lock:
            return [replace(st) for _, st in sorted(self._entries.items())]


def sync(table: StatusTable, target: Target[K, V], desired: Mapping[K, V], *, prune: bool,
         keep: Callable[[K], bool] | None = None, now: float | None = None) -> SyncCounts:
    """Make the kernel's objects of one kind equal `desired`, one object at a time.

    Reads the kernel's objects, updates each wanted one that differs (unless it failed and its
    retry is not due), and with `prune` deletes those nobody wants (except what `keep` protects).
    A failure is recorded on that object alone; the others go on. Keys are the target's own
    type (a CIDR, a MAC, a Frontend); the status table names each by its text.
    """
    now = table.clock() if now is None else now
    kind = target.kind
    table.want(kind, {str(k): v for k, v in desired.items()})
    counts = SyncCounts()
    actual = target.read()
    table.settle_deletes(kind, {str(k): v for k, v in actual.items()})
    for key in sorted(desired, key=str):
        name, want = str(key), desired[key]
        if actual.get(key) == want:
            table.done(kind, name)
            continue
        if not table.due(kind, name, now):
            counts.errors += 1
            continue
        try:
            target.update(key, want)
        except TunnelError as e:
            counts.errors += 1
            delay = table.failed(kind, name, e, now)
            log.warning("%s %s: %s (attempt %d, retry in %.1fs)", kind, name, e,
                        (table.get(kind, name) or ObjectStatus(kind, name)).attempts, delay)
            continue
        table.done(kind, name)
        counts.changed += 1
    if prune:
        for key in sorted(set(actual) - set(desired), key=str):
            name = str(key)
            if (keep is not None and keep(key)) or not table.due(kind, name, now):
                continue
            try:
                target.delete(key, actual[key])
            except TunnelError as e:
                counts.errors += 1
                table.failed(kind, name, e, now, op="delete")
                log.warning("%s %s: removing failed: %s", kind, name, e)
                continue
            table.forget(kind, name)
            counts.removed += 1
    return counts
