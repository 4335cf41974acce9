"""The agent's view of federated clusters: membership from the local Consul, and one watch per
remote cluster through it (`dc=<datacenter>`), each holding its last good snapshot.

A remote cluster that cannot be reached keeps its last snapshot: its tunnels stay as they
were until it answers again. A remote that was never seen since the agent started is
"frozen": whatever the device has for its pod CIDR is left alone, as the local cluster's
peers are before the first sync.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wiremesh.clustermesh import (
    ClusterSnapshot,
    EndpointsRecord,
    ConsulError,
    ConsulStore,
    Membership,
    MeshMember,
    NodeRecord,
    ParseCache,
    layout,
    parse_cluster,
    parse_mesh,
)


from .departures import HOLD_MAX_S, Departures
from .metrics import AgentMetrics

log = logging.getLogger("wiremesh.federation")
MESH_MIN_INTERVAL_S = 1.0
WATCH_WAIT_S = 10  # short: a cut WAN link is noticed within this, not after 30 s
BACKOFF_MAX_S = 5.0


@dataclass(slots=True)
class Remote:
    member: MeshMember
    stop: threading.Event = field(default_factory=threading.Event)
    snapshot: ClusterSnapshot | None = None
    up: bool = False
    refused: str | None = None  # why its nodes are not programmed (and pruned), if they are not
    waiting: str | None = None  # why its state is frozen as it was (no valid config there yet)
    # Its nodes whose records vanished a moment ago (a session that lapsed on a busy host): kept
    # planned for a short hold, as a local cluster's are (agent.departures).
    departures: Departures | None = None


@dataclass(frozen=True, slots=True)
class FederationView:
    """What the planner needs: accepted remote clusters' nodes, and what to leave alone."""

    nodes: dict[str, dict[str, NodeRecord]]  # cluster -> node -> record
    members: dict[str, MeshMember]
    frozen_cidrs: frozenset[str]  # pod CIDRs of remotes not yet seen: never pruned
    mesh_synced: bool  # False: membership unknown yet, every foreign peer is kept
    signed: frozenset[str] = frozenset()  # remote clusters whose config requires signed records
    departed: dict[str, dict[str, NodeRecord]] = field(default_factory=dict)  # cluster -> node -> last record, held
    endpoints: dict[str, dict[str, EndpointsRecord]] = field(default_factory=dict)  # cluster -> node -> its pods


class Federation:
    def __init__(self, store: ConsulStore, local: str, stop: threading.Event, on_change: Callable[[], None],
                 metrics: AgentMetrics, local_pod_cidr: Callable[[], str | None] = lambda: None,
                 spawn: Callable[[str, Callable[[], object]], object] | None = None,
                 follow: Callable[[str, Callable[[], object]], object] | None = None,
                 hold_s: float = HOLD_MAX_S) -> None:
        self.store = store
        self.hold_s = hold_s  # how long a remote node whose record vanished stays planned
        self.local = local
        self.stop = stop
        self.on_change = on_change
        self.metrics = metrics
        self.lock = threading.Lock()
        self.remotes: dict[str, Remote] = {}
        self.membership: Membership | None = None
        self.local_pod_cidr = local_pod_cidr  # the local cluster's live config, to check its mesh record
        self._last_good: dict[str, MeshMember] = {}
        self._logged: dict[str, str] = {}
        self._spawn = spawn or _thread  # the mesh watch: a loop for the agent's life
        self._follow = follow or _thread  # one per remote cluster, keyed by a generation (never collide)
        # When a remote cluster last came back after being unreachable (time.monotonic()): its
        # nodes' sessions may have expired meanwhile, their records reappear only as their
        # agents register again; the agent holds removals for a while after it.
        self.rejoined_at = 0.0

    def start(self) -> None:
        self._spawn("mesh-watch", self._mesh_loop)

    def close(self) -> None:
        """End every remote cluster's watch (with the agent's stop event, which ends the mesh watch)."""
        with self.lock:
            for r in self.remotes.values():
                r.stop.set()

    def view(self) -> FederationView:
        with self.lock:
            nodes, frozen, signed, departed, endpoints = {}, set(), set(), {}, {}
            for name, r in self.remotes.items():
                if r.refused:
                    continue
                if r.snapshot is None or r.waiting:
                    frozen.add(r.member.pod_cidr)
                else:
                    nodes[name] = dict(r.snapshot.nodes)
                    endpoints[name] = dict(r.snapshot.endpoints)
                    if r.departures is not None and (held := r.departures.held()):
                        departed[name] = held
                    if r.snapshot.config is not None and r.snapshot.config.require_signed:
                        signed.add(name)
            members = dict(self.membership.members) if self.membership else {}
            return FederationView(nodes, members, frozenset(frozen), self.membership is not None, frozenset(signed),
                                  departed, endpoints)

    def next_departure_end(self) -> float | None:
        """When the earliest hold of a remote node ends (time.monotonic()): a pass is due then."""
        with self.lock:
            ends = [e for r in self.remotes.values() if r.departures is not None
                    and (e := r.departures.next_end()) is not None]
        return min(ends, default=None)

    def status(self) -> dict[str, dict[str, object]]:
        with self.lock:
            return {n: {"datacenter": r.member.datacenter, "id": r.member.id, "pod_cidr": r.member.pod_cidr,
                        "reachable": r.up, "synced": r.snapshot is not None, "refused": r.refused,
                        "waiting": r.waiting,
                        "nodes": len(r.snapshot.nodes) if r.snapshot else 0}
                    for n, r in sorted(self.remotes.items())}

    def _once(self, key: str, msg: str, level: int = logging.WARNING) -> None:
        if self._logged.get(key) != msg:
            self._logged[key] = msg
            log.log(level, "%s", msg)

    # --- membership -----------------------------------------------------------------------
    def _mesh_loop(self) -> None:
        delay = 0.2
        while not self.stop.is_set():
            try:
                # At most one read a second: an absent prefix (a cluster in no mesh) answers with the
                # index of the whole KV store, so every write anywhere would wake this watch.
                for _, items in self.store.watch(layout.mesh_prefix(), self.stop, wait_s=WATCH_WAIT_S,
                                                 min_interval_s=MESH_MIN_INTERVAL_S):
                    m = parse_mesh(items, self.local, self._last_good)
                    self._last_good = {layout.mesh_key(n): mem for n, mem in m.members.items()}
                    self._take_membership(m)
                    delay = 0.2
            except ConsulError as e:
                self._once("mesh", f"mesh membership watch failed ({e}); federation kept as it is")
            except Exception:  # noqa: BLE001 - keep watching whatever one snapshot did
                log.exception("mesh membership watch failed unexpectedly")
            self.stop.wait(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)

    def _take_membership(self, m: Membership) -> None:
        for rej in m.refused:
            self._once(rej.key, f"refusing cluster record {rej.key}: {rej.reason}")
            self.metrics.invalid_records_total.labels("mesh").inc()
        local_ok = not m.members or self.local in m.members
        if not local_ok:
            self._once("mesh-local", f"this cluster ({self.local}) is not a member of the mesh; no federation")
        live = self.local_pod_cidr()
        if local_ok and m.members and live is not None and self.local in m.members and \
                m.members[self.local].pod_network != ipaddress.ip_network(live):
            # The overlap checks ran against the mesh record: with a different live range they
            # prove nothing, and a remote could take over local pod routes.
            self._once("mesh-local", f"this cluster's mesh record says pod_cidr {m.members[self.local].pod_cidr}, "
                                     f"its config {live}: no federation until they agree (run wiremesh setup)")
            local_ok = False
        wanted = {n: mem for n, mem in m.members.items() if n != self.local} if local_ok else {}
        with self.lock:
            if self.stop.is_set():
                return  # stopping: start no new watch
            self.membership = m
            for name in list(self.remotes):
                r = self.remotes[name]
                if name not in wanted or wanted[name] != r.member:
                    r.stop.set()
                    del self.remotes[name]
                    log.info("cluster %s left the mesh (or changed); its tunnels go", name)
            for name, mem in wanted.items():
                if name not in self.remotes:
                    r = Remote(mem, departures=Departures(name, "", self.hold_s))
                    self.remotes[name] = r
                    self._follow(f"watch-{name}", functools.partial(self._remote_loop, r))
                    log.info("watching cluster %s (datacenter %s, id %d, pod CIDR %s)", name, mem.datacenter,
                             mem.id, mem.pod_cidr)
        self.on_change()

    # --- one remote cluster ---------------------------------------------------------------
    def _remote_loop(self, r: Remote) -> None:  # noqa: C901 - one loop, its error cases
        name, dc = r.member.name, r.member.datacenter
        delay = 0.2
        last_config = None
        stop = r.stop  # set when the cluster leaves the mesh, and by close() when the agent stops
        cache = ParseCache()
        while not stop.is_set():
            try:
                for index, items in self.store.watch(layout.cluster_prefix(name), stop, wait_s=WATCH_WAIT_S, dc=dc):
                    snap = parse_cluster(name, index, items, last_config=last_config, cache=cache)
                    last_config = snap.config
                    self._take_remote(r, snap)
                    delay = 0.2
            except ConsulError as e:
                if r.up or r.snapshot is None:
                    self._once(f"remote-{name}", f"cluster {name} (datacenter {dc}) unreachable ({e}); "
                                                 "its tunnels are kept as they are")
                r.up = False
                self.metrics.remote_up.labels(name).set(0)
            except Exception:  # noqa: BLE001
                log.exception("watch of cluster %s failed unexpectedly", name)
            stop.wait(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)

    def _take_remote(self, r: Remote, snap: ClusterSnapshot) -> None:
        name = r.member.name
        refused = waiting = None
        if snap.config is None:
            waiting = (f"cluster {name} has no valid config in datacenter {r.member.datacenter}; "
                       "its tunnels are kept as they are")
            self._once(f"waiting-{name}", waiting)
        elif snap.config.pod_network != r.member.pod_network:
            refused = (f"cluster {name}'s config says pod_cidr {snap.config.pod_cidr}, its mesh record "
                       f"{r.member.pod_cidr}: refused until they agree")
        for rej in snap.rejected:
            self._once(rej.key, f"skipping invalid record {rej.key} (cluster {name}): {rej.reason}")
        if refused:
            self._once(f"refused-{name}", refused)
        elif not r.up:
            self._once(f"remote-{name}", f"cluster {name} is reachable ({len(snap.nodes)} nodes)", logging.INFO)
            if r.snapshot is not None:
                self.rejoined_at = time.monotonic()
        with self.lock:
            if r.stop.is_set():
                return
            if r.departures is not None and not (refused or waiting):
                r.departures.follow(r.snapshot, snap)
            r.snapshot, r.up, r.refused, r.waiting = snap, True, refused, waiting
        self.metrics.remote_up.labels(name).set(1)
        self.on_change()


def _thread(name: str, fn: Callable[[], object]) -> threading.Thread:
    """Without a supervisor (unit tests): a plain daemon thread."""
    t = threading.Thread(target=fn, name=name, daemon=True)
    t.start()
    return t
