"""The agent's view of global services' backends: one health watch per (service, cluster).

For every service the local cluster defines, the agent watches Consul's health endpoint
(`passing` only) in every member cluster through its local Consul (`dc=<datacenter>`), and
keeps each cluster's last answer. A cluster whose watch fails keeps its last backends for
`GRACE_S`; after that they are stale: they receive new connections only if no other cluster
has a healthy backend (clustermesh.services.select_backends). A watch that answers again
makes them fresh at once.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wiremesh.clustermesh import ConsulError, ConsulStore, Endpoint, ServiceHealth
from wiremesh.clustermesh import Backend, ClusterBackends
from wiremesh.tunnels import ServiceLB, TunnelError, ensure_cgroup2

from .service_plan import BackendsView

log = logging.getLogger("wiremesh.services")

GRACE_S = 10.0  # a cluster that cannot be read keeps its backends this long, then they go stale
WATCH_WAIT_S = 10
BACKOFF_MAX_S = 5.0


@dataclass(slots=True)
class _Watch:
    service: str
    cluster: str
    datacenter: str | None  # None: the local Consul's own datacenter
    stop: threading.Event = field(default_factory=threading.Event)
    backends: tuple[Backend, ...] = ()
    seen: bool = False  # answered at least once
    failing_since: float | None = None


def backends_of(cluster: str, health: ServiceHealth) -> tuple[Backend, ...]:
    """The usable instances of one answer: IPv4 with a port (the lookup is IPv4 only)."""
    return tuple(sorted(Backend(cluster, str(i.address), i.port, i.node, i.service_id)
                        for i in health.instances if i.address.version == 4 and i.port))


class ServiceBackends:
    def __init__(self, store: ConsulStore, follow: Callable[[str, Callable[[], object]], object],
                 on_change: Callable[[], None], clock: Callable[[], float] = time.monotonic,
                 grace_s: float = GRACE_S) -> None:
        self.store = store
        self.spawn = follow  # each watch a follower thread: a successor never collides with its predecessor
        self.on_change = on_change
        self.clock = clock
        self.grace_s = grace_s
        self.lock = threading.Lock()
        self.watches: dict[tuple[str, str], _Watch] = {}
        self.closed = False

    def follow(self, services: set[str], clusters: Mapping[str, str | None]) -> None:
        """Watch exactly `services` in `clusters` (cluster -> datacenter); start and stop watches."""
        want = {(s, c) for s in services for c in clusters}
        with self.lock:
            if self.closed:
                return
            for k in [k for k in self.watches if k not in want or self.watches[k].datacenter != clusters.get(k[1])]:
                self.watches.pop(k).stop.set()
            for s, c in sorted(want - set(self.watches)):
                w = self.watches[(s, c)] = _Watch(s, c, clusters[c])
                self.spawn(f"health-{s}@{c}", functools.partial(self._loop, w))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for w in self.watches.values():
                w.stop.set()

    def gather(self, services: set[str], clusters: Mapping[str, str | None]) -> BackendsView:
        """Follow `services` in `clusters` (see follow) and return their backends as of now."""
        self.follow(services, clusters)
        return BackendsView(self.view(), self.settled())

    def view(self) -> dict[str, dict[str, ClusterBackends]]:
        """service -> cluster -> its backends, stale or not, as of now."""
        now = self.clock()
        out: dict[str, dict[str, ClusterBackends]] = {}
        with self.lock:
            for (s, c), w in self.watches.items():
                stale = w.failing_since is not None and now - w.failing_since >= self.grace_s
                out.setdefault(s, {})[c] = ClusterBackends(w.backends, stale)
        return out

    def settled(self) -> dict[str, bool]:
        """service -> whether every cluster's health has been read once (or given up on, stale)."""
        now = self.clock()
        out: dict[str, bool] = {}
        with self.lock:
            for (s, _), w in self.watches.items():
                ok = w.seen or (w.failing_since is not None and now - w.failing_since >= self.grace_s)
                out[s] = out.get(s, True) and ok
        return out

    def next_change(self) -> float | None:
        """When a failing cluster's backends go stale (the loop re-plans then), if any will."""
        with self.lock:
            times = [w.failing_since + self.grace_s for w in self.watches.values()
                     if w.failing_since is not None and w.failing_since + self.grace_s > self.clock()]
        return min(times) if times else None

    def _loop(self, w: _Watch) -> None:
        delay = 0.2
        while not w.stop.is_set():
            try:
                for _, health in self.store.watch(Endpoint.health_service(w.service), w.stop, wait_s=WATCH_WAIT_S,
                                                  dc=w.datacenter):
                    with self.lock:
                        w.backends, w.seen, w.failing_since = backends_of(w.cluster, health), True, None
                    delay = 0.2
                    self.on_change()
            except ConsulError as e:
                with self.lock:
                    first = w.failing_since is None
                    if first:
                        w.failing_since = self.clock()
                if first:
                    log.warning("health of service %s in cluster %s unreadable (%s); its backends are kept for "
                                "%.0fs", w.service, w.cluster, e, self.grace_s)
                    self.on_change()
            except Exception:  # noqa: BLE001 - one bad answer: this watch backs off, the agent goes on
                log.warning("health watch of service %s in cluster %s failed unexpectedly; retrying", w.service,
                            w.cluster, exc_info=True)
            w.stop.wait(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)


def load_service_lb(cgroup: Path | None, pin_dir: Path) -> ServiceLB | None:
    """Load (or adopt, after a restart) the eBPF service lookup on `cgroup`; None if off or impossible.

    A kernel or machine that cannot run it leaves the node without global services (logged
    once), never without its tunnels.
    """
    if cgroup is None:
        return None
    try:
        ensure_cgroup2(cgroup.parent if not cgroup.exists() else cgroup)
        cgroup.mkdir(parents=True, exist_ok=True)
        lb = ServiceLB(pin_dir, cgroup).load_or_adopt()
    except (TunnelError, OSError) as e:
        log.error("service lookup unavailable on this node (%s): global services are not programmed", e)
        return None
    held = len(lb.table.snapshot())
    log.info("service lookup on %s (pins %s)%s", cgroup, pin_dir, f": adopted {held} frontend(s)" if held else "")
    return lb
