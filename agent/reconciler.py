"""Makes the WireGuard device and routes match a DesiredState, by the smallest diff.

Status lives beside each desired peer (pending/done/error); only this module writes it. A
peer whose update fails backs off on its own schedule while the others are programmed; a
change to the desired peer clears its backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from tunnels import PeerChange, PeerConfig, TunnelError, WireGuardDevice, peer_changes, sync_routes

from .planner import DesiredState

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.2
BACKOFF_MAX = 30.0


@dataclass(slots=True)
class PeerStatusEntry:
    state: str = "pending"  # pending | done | error
    message: str = ""
    attempts: int = 0
    retry_at: float = 0.0
    desired: PeerConfig | None = None
    done_at: float = 0.0  # wall-clock time the current desired config was programmed


@dataclass(slots=True)
class ReconcileResult:
    added: int = 0
    updated: int = 0
    removed: int = 0
    errors: int = 0
    programmed: int = 0
    routes_added: int = 0
    routes_removed: int = 0
    failed: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, device: WireGuardDevice, clock: "callable[[], float]" = time.monotonic) -> None:  # type: ignore[valid-type]
        self.device = device
        self.status: dict[str, PeerStatusEntry] = {}
        self.lock = threading.Lock()  # guards `status` against readers in other threads
        self._routes_applied: frozenset[str] | None = None  # as of the last good route sync
        self._clock = clock

    def reconcile(self, desired: DesiredState, *, prune: bool, full: bool = False) -> ReconcileResult:
        """One pass: read the device, diff, apply. Pruning only when `prune` (after first sync).

        Peers are always read back from the device (cheap); routes only when the desired set
        changed or on a `full` pass, which catches drift nobody announced.
        """
        with self.lock:
            return self._reconcile(desired, prune, full)

    def snapshot(self) -> dict[str, PeerStatusEntry]:
        """A copy of the per-peer status, safe to read from another thread."""
        with self.lock:
            return {k: PeerStatusEntry(v.state, v.message, v.attempts, v.retry_at, v.desired, v.done_at)
                    for k, v in self.status.items()}

    def _reconcile(self, desired: DesiredState, prune: bool, full: bool) -> ReconcileResult:
        now = self._clock()
        res = ReconcileResult()
        actual = self.device.show().peers
        changes = peer_changes(actual, desired.peers, prune=prune)
        # Drop status of peers no longer desired; reset backoff of peers whose config changed.
        for key in list(self.status):
            if key not in desired.peers:
                del self.status[key]
        for key, want in desired.peers.items():
            st = self.status.setdefault(key, PeerStatusEntry())
            if st.desired != want:
                st.desired, st.attempts, st.retry_at = want, 0, 0.0
                st.state = "pending"
        ready = [c for c in changes if c.remove or self.status[c.public_key].retry_at <= now]
        if ready:
            try:
                self.device.apply(ready)
                self._done(ready, res)
            except TunnelError:
                # Find the culprit(s): apply one by one so the good peers still land.
                for ch in ready:
                    try:
                        self.device.apply([ch])
                        self._done([ch], res)
                    except TunnelError as e:
                        self._failed(ch, e, now, res, desired)
        changed = {c.public_key for c in changes}
        for key, st in self.status.items():
            if key in actual and key not in changed and st.state != "done":
                st.state, st.message, st.done_at = "done", "", time.time()
        res.programmed = sum(1 for st in self.status.values() if st.state == "done")
        routes_key = desired.routes if prune else None
        if not full and routes_key is not None and routes_key == self._routes_applied:
            return res
        try:
            res.routes_added, res.routes_removed = sync_routes(self.device.name, desired.routes, prune=prune)
            self._routes_applied = routes_key
        except TunnelError as e:
            self._routes_applied = None
            res.errors += 1
            res.failed.append(f"routes: {e}")
            log.warning("route sync on %s failed: %s", self.device.name, e)
        return res

    def _done(self, changes: list[PeerChange], res: ReconcileResult) -> None:
        for ch in changes:
            if ch.remove:
                res.removed += 1
                continue
            if ch.update_only:
                res.updated += 1
            else:
                res.added += 1
            st = self.status[ch.public_key]
            st.state, st.message, st.attempts, st.retry_at = "done", "", 0, 0.0
            st.done_at = time.time()

    def _failed(self, ch: PeerChange, e: TunnelError, now: float, res: ReconcileResult, desired: DesiredState) -> None:
        res.errors += 1
        name = desired.peer_names.get(ch.public_key, ch.public_key[:8])
        res.failed.append(f"{name}: {e}")
        st = self.status.get(ch.public_key)
        if st is None:  # a removal that failed: retried on the next pass
            log.warning("removing peer %s failed: %s", name, e)
            return
        st.attempts += 1
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (st.attempts - 1))
        st.state, st.message, st.retry_at = "error", str(e), now + delay
        log.warning("programming peer %s failed (attempt %d, retry in %.1fs): %s", name, st.attempts, delay, e)

    def next_retry(self) -> float | None:
        times = [st.retry_at for st in self.status.values() if st.state == "error"]
        return min(times) if times else None
