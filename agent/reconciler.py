"""Makes the dataplane match a DesiredState, object by object, by the smallest diff.

Every object kind is a target with update, delete and prune (see agent.objects): WireGuard
peers (keyed by node: the public key is an attribute), routes, the VXLAN device, its FDB and
neighbour entries, the WireGuard MTU and the pod MTU. Each object has its own status and
backoff; one the kernel refuses never blocks the others, and its retry wakes the loop.

Peers are compared against what this process last programmed on most passes (O(changes));
the device itself is read on the first pass and on every full pass, which catches drift.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from wiremesh.tunnels import (
    FdbTarget,
    MtuTarget,
    NeighbourTarget,
    PeerChange,
    PeerConfig,
    PeerStatus,
    PodMtuTarget,
    RouteTarget,
    ServiceLB,
    ServiceTarget,
    TunnelError,
    VxlanSpec,
    VxlanTarget,
    WireGuardDevice,
    as_status,
    link_exists,
    link_mtu,
    peer_changes,
)

from .objects import BACKOFF_MAX, BACKOFF_MIN, ObjectStatus, StatusTable, sync
from .planner import DesiredState, DeviceSpec

log = logging.getLogger(__name__)

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "ReconcileResult", "Reconciler"]

PEER = "peer"
LINGER_S = 1.0  # a replaced peer stays this long without allowed IPs before it is removed
_PEERS = frozenset({PEER})
_SERVICES = frozenset({"service"})
OVERLAY_KINDS = frozenset({"route", "fdb", "neighbour", "vxlan", "mtu", "pod-mtu"})


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
    device_key_changed: bool = False  # the device took a new private key (a rotation's switch) in this pass
    replaced: list[tuple[str, str]] = field(default_factory=list)  # (node, new key): key rotations applied


class Applied(dict[str, PeerConfig]):
    """node -> the peer as this process last programmed it, with the same peers by public key as
    the device would report them kept up to date beside it (so a pass needs no O(peers) rebuild)."""

    def __init__(self) -> None:
        super().__init__()
        self.status: dict[str, PeerStatus] = {}

    def __setitem__(self, node: str, cfg: PeerConfig) -> None:
        old = self.get(node)
        if old is not None and old.public_key != cfg.public_key:
            self.status.pop(old.public_key, None)
        super().__setitem__(node, cfg)
        self.status.update(as_status({node: cfg}))

    def __delitem__(self, node: str) -> None:
        self.status.pop(self[node].public_key, None)
        super().__delitem__(node)

    def pop(self, node: str, default: PeerConfig | None = None) -> PeerConfig | None:  # type: ignore[override]
        if node in self:
            cfg = self[node]
            del self[node]
            return cfg
        return default

    def clear(self) -> None:
        super().clear()
        self.status.clear()


class Reconciler:
    def __init__(
        self,
        device: WireGuardDevice,
        clock: Callable[[], float] = time.monotonic,
        pods: Callable[[], Iterable[tuple[str, str, str]]] | None = None,
        vxlan_device: str = "wm-vxlan",
        service_lb: ServiceLB | None = None,
    ) -> None:
        self.device = device
        self.services = ServiceTarget(service_lb) if service_lb is not None else None
        self._services_applied: object = None
        self._device_applied: DeviceSpec | None = None  # key and port as last set or read
        self.table = StatusTable(clock)
        self.lock = threading.Lock()  # one pass at a time
        self.applied = Applied()  # node -> the peer as this process last programmed it
        self._device_read = False  # peers compared against the device itself at least once
        self._pruning: object = None  # what pruning may touch, as of the last device read
        self._overlay_applied: object = None  # the desired overlay as of the last clean sync
        self.vxlan_device = vxlan_device
        self.routes = RouteTarget([device.name, vxlan_device])
        self.vxlan = VxlanTarget(vxlan_device)
        self.fdb = FdbTarget(vxlan_device)
        self.neighbours = NeighbourTarget(vxlan_device)
        self.mtu = MtuTarget([device.name])
        # Every pod's veth (pods: lists (netns, container id, ifname) of the node's pods).
        self.pod_mtu = PodMtuTarget(pods) if pods is not None else None
        self._pod_mtu_applied: int | None = None
        self._clock = clock
        # Old keys of replaced peers (a rotation), left on the device without allowed IPs: the
        # packets they still hold (queued, being encrypted) go out; removed at this time.
        self._lingering: dict[str, float] = {}

    def reconcile(self, desired: DesiredState, *, prune: bool, full: bool = False) -> ReconcileResult:
        """One pass. Pruning only when `prune` (after the first sync); `full` re-reads everything."""
        with self.lock:
            now = self._clock()
            res = ReconcileResult()
            self._device(desired, full, res)
            self._peers(desired, prune, full, now, res)
            overlay = _overlay_key(desired) if prune else None
            if full or overlay is None or overlay != self._overlay_applied or \
                    self.table.pending_retry(OVERLAY_KINDS, now):
                errors = self._overlay(desired, prune, now, res)
                self._overlay_applied = overlay if not errors else None
            self._services(desired, prune, full, now, res)
            return res

    # --- device -------------------------------------------------------------------------------
    def _device(self, desired: DesiredState, full: bool, res: ReconcileResult) -> None:
        """The device's private key and listen port, first: a rotation's switch is due on the dot,
        and peers' changes that follow it are made with the device's new key."""
        want = desired.device
        if want is None or (want == self._device_applied and not full):
            return
        had = self._device_applied
        changed = self.device.configure(want.private_key, want.listen_port)  # reads first: no change, no write
        self._device_applied = want
        # (With nothing set by this process yet, a change may have been the port alone: a poke too many.)
        res.device_key_changed = changed and (had is None or had.private_key != want.private_key)

    # --- peers ----------------------------------------------------------------------------
    def _peers(self, desired: DesiredState, prune: bool, full: bool, now: float, res: ReconcileResult) -> None:
        actual: dict[str, PeerStatus]
        # The device is read on full passes and whenever memory cannot tell the whole truth: the
        # first pass, when pruning starts or what it must keep changes (peers this process never
        # programmed may now go), and when a failed peer is retried (its state is unknown).
        pruning = (prune, desired.keep_cidrs, desired.keep_foreign)
        if full or not self._device_read or pruning != self._pruning or self.table.pending_retry(_PEERS, now):
            self._pruning = pruning
            actual = dict(self.device.show().peers)
            self._device_read = True
        else:
            actual = self.applied.status
        changes = [c for c in peer_changes(actual, desired.peers, prune=prune, applied=self.applied)
                   if not (c.remove and any(desired.kept(ip) for ip in actual[c.public_key].allowed_ips))
                   and not (c.remove and c.public_key in self._lingering)]
        wanted = {p.public_key for p in desired.peers.values()}
        for key, at in list(self._lingering.items()):
            if key in wanted:
                del self._lingering[key]  # desired again (a rotation went back): it stays
            elif at <= now:
                changes.append(PeerChange(public_key=key, remove=True))
        self.table.want(PEER, desired.peers)
        for node in [n for n in self.applied if n not in desired.peers]:
            if not any(c.remove and c.name == node for c in changes):
                del self.applied[node]  # not desired, and kept (or already gone) on the device
        ready = [c for c in changes if c.remove or self.table.due(PEER, c.name, now)]
        if ready:
            try:
                self.device.apply(ready)
                self._done(ready, desired, res)
            except TunnelError:
                # Find the culprit(s): apply one by one so the good peers still land.
                for ch in ready:
                    try:
                        self.device.apply([ch])
                        self._done([ch], desired, res)
                    except TunnelError as e:
                        self._failed(ch, e, now, res)
        changed = {c.name for c in changes}
        present = set(actual)
        for node, want in desired.peers.items():
            if node not in changed and want.public_key in present:
                if self.applied.get(node) != want:
                    self.applied[node] = want
                self.table.done(PEER, node)
        res.programmed = self.table.count(PEER, "done")

    def _done(self, changes: list[PeerChange], desired: DesiredState, res: ReconcileResult) -> None:
        for ch in changes:
            if ch.remove:
                self._lingering.pop(ch.public_key, None)
                res.removed += 1
                if ch.name and self.applied.get(ch.name, None) is not None and \
                        self.applied[ch.name].public_key == ch.public_key:
                    del self.applied[ch.name]
                continue
            if ch.replaces:
                res.replaced.append((ch.name, ch.public_key))
                self._lingering[ch.replaces] = self._clock() + LINGER_S
            if ch.update_only or ch.replaces:
                res.updated += 1  # a key change is an update of the node's peer
            else:
                res.added += 1
            self.applied[ch.name] = desired.peers[ch.name]
            self.table.done(PEER, ch.name)

    def _failed(self, ch: PeerChange, e: TunnelError, now: float, res: ReconcileResult) -> None:
        res.errors += 1
        name = ch.name or ch.public_key[:8]
        res.failed.append(f"{name}: {e}")
        if ch.remove:
            log.warning("removing peer %s failed: %s", name, e)  # retried on the next full pass
            return
        self.applied.pop(ch.name, None)  # unknown state: compare against the device next time
        self._device_read = False
        delay = self.table.failed(PEER, ch.name, e, now)
        st = self.table.get(PEER, ch.name)
        log.warning("programming peer %s failed (attempt %d, retry in %.1fs): %s", name,
                    st.attempts if st else 1, delay, e)

    # --- overlay --------------------------------------------------------------------------
    def _overlay(self, desired: DesiredState, prune: bool, now: float, res: ReconcileResult) -> int:
        """Routes, VXLAN and MTUs, in the order that keeps packets flowing through a mode switch.

        The WireGuard MTU grows before traffic moves into VXLAN (which needs 50 more bytes) and
        shrinks only after it left; the VXLAN device and its entries come before the routes that
        use them and go after the routes left; pod MTUs shrink first and grow last.
        """
        errors = 0
        wg = self.device.name
        wg_mtu = desired.mtu
        wg_now = link_mtu(wg) if wg_mtu and link_exists(wg) else None
        grow_wg_first = wg_now is not None and wg_mtu is not None and wg_mtu > wg_now
        if grow_wg_first and wg_mtu is not None:
            errors += sync(self.table, self.mtu, {wg: wg_mtu}, prune=False, now=now).errors
        vx = desired.vxlan
        if vx is not None:
            errors += sync(self.table, self.vxlan, {vx.name: vx}, prune=False, now=now).errors
            if link_exists(vx.name):
                errors += sync(self.table, self.fdb, dict(desired.fdb), prune=prune, now=now).errors
                errors += sync(self.table, self.neighbours, dict(desired.neighbours), prune=prune, now=now).errors
        pods = self.pod_mtu
        pod_first = pods is not None and desired.pod_mtu is not None and \
            (self._pod_mtu_applied is None or desired.pod_mtu < self._pod_mtu_applied)  # unknown: shrink first
        if pods is not None and desired.pod_mtu is not None and pod_first:
            errors += self._pods(desired.pod_mtu, now)
        r = sync(self.table, self.routes, {rt.dst: rt for rt in desired.routes}, prune=prune, keep=desired.kept,
                 now=now)
        res.routes_added, res.routes_removed = r.changed, r.removed
        errors += r.errors
        if r.errors:
            # A route still where it was: keep what it may use (the VXLAN device, the larger MTUs)
            # until it has moved; the retry of the route brings the rest along.
            res.errors += errors
            return errors
        if vx is None and prune:
            none: dict[str, VxlanSpec] = {}
            gone = sync(self.table, self.vxlan, none, prune=True, now=now)
            errors += gone.errors
            if gone.removed:
                log.info("removed %s (routing mode is wireguard)", self.vxlan_device)
            if not link_exists(self.vxlan_device):
                self.table.forget_kind("fdb")  # they went with the device
                self.table.forget_kind("neighbour")
        if wg_now is not None and wg_mtu is not None and not grow_wg_first:
            errors += sync(self.table, self.mtu, {wg: wg_mtu}, prune=False, now=now).errors
        if pods is not None and desired.pod_mtu is not None and not pod_first:
            errors += self._pods(desired.pod_mtu, now)
        res.errors += errors
        return errors

    def _pods(self, mtu: int, now: float) -> int:
        """Every pod gets `mtu` (pods come and go: each overlay pass hands it on to all of them)."""
        assert self.pod_mtu is not None
        errors = sync(self.table, self.pod_mtu, {"pods": mtu}, prune=False, now=now).errors
        if not errors:
            if self.pod_mtu.changed:
                log.info("set MTU %d on %d pod interface(s)", mtu, self.pod_mtu.changed)
            self._pod_mtu_applied = mtu
        return errors

    # --- services --------------------------------------------------------------------------
    def _services(self, desired: DesiredState, prune: bool, full: bool, now: float, res: ReconcileResult) -> None:
        """The eBPF lookup's frontends: each written backends first, count last (never zero
        backends in between); frontends whose backends are not known yet are left as they are."""
        target = self.services
        if target is None:
            return
        key = (desired.services, desired.keep_services) if prune else None
        if not full and key is not None and key == self._services_applied and \
                not self.table.pending_retry(_SERVICES, now):
            return
        target.fresh = target.fresh or full
        want = {fe: tuple(bs) for fe, bs in desired.services.items()}
        counts = sync(self.table, target, want, prune=prune, keep=desired.keep_services.__contains__, now=now)
        res.errors += counts.errors
        if counts.changed or counts.removed:
            log.info("services: %d frontend(s) programmed, %d removed", counts.changed, counts.removed)
        self._services_applied = key if not counts.errors else None

    # --- for the loop and the status endpoint ---------------------------------------------
    def attach_services(self, lb: ServiceLB) -> None:
        """Program global services into `lb` from now on (loaded by the agent once at start)."""
        self.services = ServiceTarget(lb)
        self._services_applied = None

    def forget_overlay(self) -> None:
        """Make the next pass re-read everything (after the device was re-created)."""
        self._overlay_applied = None
        self._device_read = False
        self._device_applied = None
        self.applied.clear()
        self._services_applied = None
        if self.services is not None:
            self.services.fresh = True

    def next_retry(self) -> float | None:
        times = [t for t in (self.table.next_retry(), min(self._lingering.values(), default=None)) if t is not None]
        return min(times, default=None)

    def objects(self) -> list[ObjectStatus]:
        return self.table.snapshot()

    def snapshot(self) -> dict[str, ObjectStatus]:
        """Each desired peer's status, by node."""
        return {st.key: st for st in self.table.snapshot() if st.kind == PEER}


def _overlay_key(d: DesiredState) -> object:
    return (d.routes, d.vxlan, tuple(sorted(d.fdb.items())), tuple(sorted(d.neighbours.items())), d.mtu, d.pod_mtu,
            d.keep_cidrs, d.keep_foreign)
