"""Makes the dataplane match a DesiredState, object by object, by the smallest diff.

One contract for every kind of kernel object: a target that reads what the kernel holds and
updates, deletes and prunes one object (agent.objects.sync), or a batch (the device's peers,
agent.peers: one device update per pass). In order: the device's key and port (first: a key
switch is due on the dot), peers, then the overlay (routes, the VXLAN device, its FDB and
neighbour entries, the WireGuard MTU and the pod MTU, ordered so that packets keep flowing
through a routing-mode switch), then global services (eBPF maps, keyed by Frontend). Each
object has its own status and backoff; one the kernel refuses never blocks the others, and its
retry wakes the loop. A new kind of object is one more target here and one more section of
DesiredState.

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
    PeerChange,
    PeerConfig,
    FdbTarget,
    MtuTarget,
    NeighbourTarget,
    PodMtuTarget,
    RouteTarget,
    PolicyDatapath,
    ServiceLB,
    ServiceTarget,
    VxlanSpec,
    VxlanTarget,
    WireGuardDevice,
    link_exists,
    link_mtu,
)

from .objects import BACKOFF_MAX, BACKOFF_MIN, ObjectStatus, StatusTable, sync
from .peers import LINGER_S, PEER, PeerTarget  # noqa: F401 - LINGER_S: the reconciler's to tell
from .planner import DesiredState, DeviceSpec
from .policy_link import PolicyTarget

log = logging.getLogger(__name__)

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "ReconcileResult", "Reconciler"]

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
    peer_changes: list[str] = field(default_factory=list)  # (agent.peers.PeerCounts.changes)


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
        # Events the rotation stage consumes (take_events), kept across passes that fail after
        # making them: the device's key changed; (node, new key) of peers whose key was replaced.
        self._key_changed = False
        self._replaced: list[tuple[str, str]] = []
        self._added: list[str] = []  # nodes whose peer was added to the device
        self.table = StatusTable(clock)
        self.lock = threading.Lock()  # one pass at a time
        self.peers = PeerTarget(device, self.table, clock)  # one batch per pass
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
        self.policy: PolicyTarget | None = None  # network policy (attach_policy), where eBPF works

    def reconcile(self, desired: DesiredState, *, prune: bool, full: bool = False) -> ReconcileResult:
        """One pass. Pruning only when `prune` (after the first sync); `full` re-reads everything."""
        with self.lock:
            now = self._clock()
            res = ReconcileResult()
            self._device(desired, full, res)
            self._peers(desired, prune, full, now, res)
            # Skipped when nothing of it changed since its last clean sync (pruning or not: while
            # removals are held after an outage, every pass would otherwise re-read it all).
            overlay = (_overlay_key(desired), prune)
            if full or overlay != self._overlay_applied or \
                    self.table.pending_retry(OVERLAY_KINDS, now):
                errors = self._overlay(desired, prune, now, res)
                self._overlay_applied = overlay if not errors else None
            self._services(desired, prune, full, now, res)
            if self.policy is not None and desired.policy is not None:
                res.errors += self.policy.sync(desired.policy, desired.policy_veths, full)
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
        if changed and (had is None or had.private_key != want.private_key):
            self._key_changed = True  # for the rotation stage (take_events)

    def switch_device(self, desired: DesiredState) -> None:
        """Only the device's key and port (a rotation's switch due while planning fails)."""
        with self.lock:
            self._device(desired, False, ReconcileResult())

    def renew_peer(self, node: str, peer: PeerConfig) -> None:
        """Make node's peer again on the device (same key, endpoint, allowed IPs): a fresh entry
        with no handshake state, which initiates one with the next packet (agent.rotation_peer.KICK_MS)."""
        with self.lock:
            self.device.apply([PeerChange(public_key=peer.public_key, remove=True, name=node)])
            self.device.apply([PeerChange(public_key=peer.public_key, endpoint=peer.endpoint,
                                          allowed_ips=peer.allowed_ips,
                                          persistent_keepalive=peer.persistent_keepalive, name=node)])

    def take_events(self) -> tuple[bool, list[tuple[str, str]], list[str]]:
        """(the device's key changed, peers' keys replaced, nodes whose peer was added) since the last call."""
        with self.lock:
            out = (self._key_changed, self._replaced, self._added)
            self._key_changed, self._replaced, self._added = False, [], []
            return out

    # --- peers ----------------------------------------------------------------------------
    def _peers(self, desired: DesiredState, prune: bool, full: bool, now: float, res: ReconcileResult) -> None:
        out = self.peers.sync(desired.peers, desired.kept, (prune, desired.keep_cidrs, desired.keep_foreign),
                              prune=prune, full=full, now=now, staged=desired.staged)
        res.added, res.updated, res.removed, res.errors = out.added, out.updated, out.removed, res.errors + out.errors
        res.programmed, res.failed = out.programmed, res.failed + out.failed
        res.peer_changes = out.changes
        self._replaced.extend(out.replaced)  # for the rotation stage (take_events)
        self._added.extend(out.new)

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
        key = (desired.services, desired.keep_services, prune)
        if not full and key == self._services_applied and \
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

    def attach_policy(self, dp: PolicyDatapath, on_synced: Callable[[frozenset[int]], None] = lambda _v: None) -> None:
        """Enforce network policy through `dp` from now on (loaded by the agent once at start);
        `on_synced(veths)` after each sync (agent.policy_link.PolicyTarget)."""
        self.policy = PolicyTarget(dp, on_synced)

    def forget_overlay(self) -> None:
        """Make the next pass re-read everything (after the device was re-created)."""
        self._overlay_applied = None
        self.peers.forget()
        self._device_applied = None
        self._services_applied = None
        if self.services is not None:
            self.services.fresh = True
        if self.policy is not None:
            self.policy.forget()

    def next_retry(self) -> float | None:
        times = [t for t in (self.table.next_retry(), self.peers.next_retry()) if t is not None]
        return min(times, default=None)

    def objects(self) -> list[ObjectStatus]:
        return self.table.snapshot()

    def snapshot(self) -> dict[str, ObjectStatus]:
        """Each desired peer's status, by node."""
        return {st.key: st for st in self.table.snapshot() if st.kind == PEER}


def _overlay_key(d: DesiredState) -> object:
    return (d.routes, d.vxlan, tuple(sorted(d.fdb.items())), tuple(sorted(d.neighbours.items())), d.mtu, d.pod_mtu,
            d.keep_cidrs, d.keep_foreign)
