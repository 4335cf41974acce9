"""Makes the WireGuard device and routes match a DesiredState, by the smallest diff.

Status lives beside each desired peer (pending/done/error); only this module writes it. A
peer whose update fails backs off on its own schedule while the others are programmed; a
change to the desired peer clears its backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wiremesh.tunnels import (
    PeerChange,
    PeerConfig,
    TunnelError,
    WireGuardDevice,
    delete_vxlan,
    ensure_vxlan,
    link_exists,
    link_mtu,
    peer_changes,
    set_mtu,
    sync_fdb,
    sync_neighbours,
    sync_routes,
)

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
    def __init__(
        self,
        device: WireGuardDevice,
        clock: Callable[[], float] = time.monotonic,
        on_pod_mtu: Callable[[int], object] | None = None,
        vxlan_device: str = "wm-vxlan",
    ) -> None:
        self.device = device
        self.status: dict[str, PeerStatusEntry] = {}
        self.lock = threading.Lock()  # guards `status` against readers in other threads
        self._overlay_applied: object = None  # the desired overlay as of the last good sync
        self._pod_mtu: int | None = None
        self.on_pod_mtu = on_pod_mtu  # applies a new pod MTU to every pod on the node
        self.vxlan_device = vxlan_device
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
        changes = [c for c in peer_changes(actual, desired.peers, prune=prune)
                   if not (c.remove and any(desired.kept(ip) for ip in actual[c.public_key].allowed_ips))]
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
        # The overlay (routes, VXLAN, FDB, neighbours, MTUs) is re-read only when its desired
        # state changed or on a full pass; peers above are compared on every pass (cheap).
        overlay = _overlay_key(desired) if prune else None
        if not full and overlay is not None and overlay == self._overlay_applied:
            return res
        try:
            self._sync_overlay(desired, prune, res)
            self._overlay_applied = overlay
        except TunnelError as e:
            self._overlay_applied = None
            res.errors += 1
            res.failed.append(f"overlay: {e}")
            log.warning("overlay sync failed: %s", e)
        return res

    def _sync_overlay(self, desired: DesiredState, prune: bool, res: ReconcileResult) -> None:
        """Routes, VXLAN and MTUs, in the order that keeps packets flowing through a mode switch.

        The VXLAN device and its entries come before the routes that use them and go after
        the routes have left them; pod MTUs shrink before traffic moves into VXLAN and grow
        only after it has left.
        """
        vx = desired.vxlan
        # The WireGuard MTU grows before traffic moves into VXLAN (which needs the extra 50
        # bytes) and shrinks only after traffic has left it.
        wg_now = link_mtu(self.device.name) if desired.mtu and link_exists(self.device.name) else None
        if wg_now is not None and desired.mtu > wg_now:  # type: ignore[operator]
            set_mtu(self.device.name, desired.mtu)  # type: ignore[arg-type]
        if vx is not None:
            ensure_vxlan(vx)
            sync_fdb(vx.name, desired.fdb, prune=prune)
            sync_neighbours(vx.name, desired.neighbours, prune=prune)
        pod_mtu_first = (desired.pod_mtu is not None and self.on_pod_mtu is not None
                         and (self._pod_mtu is None or desired.pod_mtu < self._pod_mtu))
        if pod_mtu_first:
            self._set_pod_mtu(desired.pod_mtu)  # type: ignore[arg-type]
        res.routes_added, res.routes_removed = sync_routes(
            desired.routes, devices=[self.device.name, self.vxlan_device], prune=prune, keep=desired.kept)
        if vx is None and prune and delete_vxlan(self.vxlan_device):
            log.info("removed %s (routing mode is wireguard)", self.vxlan_device)
        if wg_now is not None and desired.mtu < wg_now:  # type: ignore[operator]
            set_mtu(self.device.name, desired.mtu)  # type: ignore[arg-type]
        if desired.pod_mtu is not None and not pod_mtu_first and self.on_pod_mtu is not None:
            self._set_pod_mtu(desired.pod_mtu)

    def _set_pod_mtu(self, mtu: int) -> None:
        assert self.on_pod_mtu is not None
        self.on_pod_mtu(mtu)
        self._pod_mtu = mtu

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

    def forget_overlay(self) -> None:
        """Make the next pass re-read the overlay (after the device was re-created)."""
        self._overlay_applied = None

    def next_retry(self) -> float | None:
        times = [st.retry_at for st in self.status.values() if st.state == "error"]
        return min(times) if times else None


def _overlay_key(d: DesiredState) -> object:
    return (d.routes, d.vxlan, tuple(sorted(d.fdb.items())), tuple(sorted(d.neighbours.items())), d.mtu, d.pod_mtu,
            d.keep_cidrs, d.keep_foreign)
