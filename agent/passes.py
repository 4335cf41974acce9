"""One pass of the agent's reconcile loop, stage by stage, each guarded.

    snapshot   take the newest cluster snapshot (config, rejected records, own record)
    inputs     each input's owner hands over its part, frozen into one PassInputs value:
               the snapshot, federation (remote clusters' nodes), service backends' health,
               this node's key (the next one from its switch time on) and rotation state
    plan       plan(inputs) -> DesiredState: device, peers, routes, VXLAN, FDB, neighbours,
               pod MTU, services (pure: agent.planner)
    reconcile  one reconciler over one target contract (update / delete / prune) per kind
               of kernel object (agent.reconciler, tunnels.targets)
    report     status, metrics, log lines
    rotation   this node's key rotation and its part in the others' (agent.rotation_link)

A new kind of kernel object (policy maps, tc programs on pod veths, a flow ring buffer) is one
more section of DesiredState and `plan`, and one more target in the reconciler: nothing else
here changes. Followers (health watches, readiness) are started and stopped in `inputs`, by
their owners, never in `plan`.

A stage that raises ends the pass: counted (`wiremesh_pass_errors_total{stage}`), logged once
per distinct error (its traceback at -v), and the loop tries again after a backoff (0.2 s
doubling to 5 s; a clean pass resets it). Nothing here waits for Consul: writes go through the
registration and writer threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from wiremesh.clustermesh import NodeRecord
from wiremesh.tunnels import DeviceNotFound, TunnelError

from .federation import FederationView
from .planner import DesiredState, DeviceSpec, LocalNode, PassInputs, plan
from .reconciler import ReconcileResult
from .rotation import now_ms
from .policy_link import local_pods
from .rotation_link import rotation_pass, staging
from .watchdog import Watchdog

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger("wiremesh.agent")
T = TypeVar("T")

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
SLOW_PASS_S = 0.05  # a pass this long is logged with its stages' times (at most every SLOW_LOG_EVERY_S)
SLOW_LOG_EVERY_S = 10.0


def announced_next_keys(nodes: Mapping[str, NodeRecord], departed: Mapping[str, NodeRecord],
                        fed: FederationView) -> set[str]:
    """Every next key a record the planner uses announces, held ones included. A node whose
    session lapsed just after its switch is held with its commit record (old key, next key); its
    proven switch must stay proven (agent.staged forgets proofs of keys no longer announced), or
    the hold gives the old key back its allowed IPs: a 1.8 s hole at 30 nodes in the rotation bench."""
    records = [*nodes.values(), *departed.values(),
               *(rec for ns in fed.nodes.values() for rec in ns.values()),
               *(rec for ns in fed.departed.values() for rec in ns.values())]
    return {rec.next_public_key for rec in records if rec.next_public_key}


def unseen_switches(cluster: str, me: str, nodes: Mapping[str, NodeRecord], fed: FederationView,
                    proven: frozenset[str], settling: Collection[str] = (),
                    taking: Collection[str] = ()) -> dict[str, int]:
    """Other nodes whose commit this agent sees and whose switch it has not seen settle on the
    data plane yet: node id -> switch time (agent.rotation.Rotator.switch_due). Settled: the
    switch proven and, once this node took the new key, a handshake on it (`settling`: node
    ids whose taken key has none yet; `taking`: next keys proven since the last pass planned,
    which this pass takes, so no handshake can be on them yet). A switch right after a
    neighbour's proof, before that handshake, dropped what both had queued for each other (9
    pings under a CPU hog; 58 at 30 nodes when the switch came in the very pass that took the
    neighbour's key: its handshake had not started, and the node's own switch then left it
    waiting for the neighbour to take the new key in turn)."""
    def unseen(nid: str, r: NodeRecord) -> bool:
        return bool(r.switch_at and r.next_public_key and (
            r.next_public_key not in proven or r.next_public_key in taking or nid in settling))
    out = {f"{cluster}/{n}": r.switch_at for n, r in nodes.items() if n != me and unseen(f"{cluster}/{n}", r)}
    out.update((f"{c}/{n}", r.switch_at) for c, ns in fed.nodes.items() if c != cluster for n, r in ns.items()
               if unseen(f"{c}/{n}", r))
    return out


POLICY_WAIT_S = 30.0  # after a start, network policy waits this long at most for every member cluster


class PassFailed(Exception):
    """A stage of the pass raised; the loop retries after a backoff."""


class Pass:
    """The loop's pass and what it keeps between passes (its backoff, the planner's memo)."""

    def __init__(self, agent: Agent, watchdog: Watchdog | None = None) -> None:
        self.agent = agent
        self.watchdog = watchdog  # told when a pass starts and ends (a stuck one is logged with its stack)
        self.memo: dict[str, object] = {}  # planner's per-node parts, reused for unchanged records
        self.failures = 0  # passes failed in a row
        self.retry_at: float | None = None  # time.monotonic() of the retry after a failed pass
        self._logged: dict[str, str] = {}  # stage -> the error last logged for it
        self.desired: DesiredState | None = None  # as of the last planned pass (status endpoint)
        self._times: dict[str, float] = {}  # stage -> seconds, of the pass under way
        self._slow_logged = 0.0
        # Next keys proven as of the last pass that took them (reconciled and told the rotator):
        # one proven since is taken by the pass under way, with no handshake on it yet.
        self.planned_proofs: frozenset[str] = frozenset()

    def run(self, full: bool) -> bool:
        """One pass; False if a stage failed (and the retry is scheduled)."""
        t0 = time.perf_counter()
        self._times = {}
        if self.watchdog:
            self.watchdog.pass_started()
        try:
            self._run(full)
        except PassFailed as e:
            if str(e) in ("snapshot", "inputs", "plan"):
                self._switch_anyway()
            self.failures += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (self.failures - 1))
            self.retry_at = time.monotonic() + delay
            return False
        finally:
            if self.watchdog:
                self.watchdog.pass_ended()
            took = time.perf_counter() - t0
            self.agent.metrics.loop_blocked_seconds.observe(took)
            if took >= SLOW_PASS_S and time.monotonic() - self._slow_logged >= SLOW_LOG_EVERY_S:
                self._slow_logged = time.monotonic()
                log.info("slow pass%s: %.0f ms (%s)", " (full)" if full else "", took * 1000,
                         ", ".join(f"{k} {v * 1000:.0f}" for k, v in self._times.items()))
        if self.failures:
            log.info("pass succeeded again after %d failed", self.failures)
        self.failures, self.retry_at, self._logged = 0, None, {}
        return True

    def _stage(self, name: str, fn: Callable[..., T], *args: object) -> T:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a pass that raises is retried, never the end of the loop
            self.agent.metrics.pass_errors_total.labels(name).inc()
            msg = f"{type(e).__name__}: {e}"
            if self._logged.get(name) != msg:
                self._logged[name] = msg
                log.warning("pass failed at %s (retrying with backoff): %s", name, msg)
                log.debug("traceback of the failed %s stage", name, exc_info=True)
            raise PassFailed(name) from e
        finally:
            self._times[name] = time.perf_counter() - t0

    def _run(self, full: bool) -> None:
        a = self.agent
        self._stage("snapshot", a.intake)
        inputs = self._stage("inputs", self.gather)
        if inputs is None:
            return  # nothing to plan from yet (no snapshot)
        desired = self._stage("plan", plan, inputs, self.memo)
        self.desired = desired
        res = self._stage("reconcile", self.apply, desired, full)
        if res is None:
            return
        self._stage("report", a.report, desired, res, full)
        self._stage("rotation", rotation_pass, a, desired)
        self.planned_proofs = inputs.proven_keys

    def _switch_anyway(self) -> None:
        """This node's switch time came while a stage before the reconciler failed: the device
        takes the next key all the same (with the last plan's peers), never later than planned."""
        a, r = self.agent, self.agent.rotator
        if not r.switch_due() or r.next_key is None or self.desired is None or self.desired.device is None:
            return
        desired = replace(self.desired, device=DeviceSpec(r.next_key, self.desired.device.listen_port))
        try:
            self._stage("switch", a.reconciler.switch_device, desired)
            self._stage("rotation", rotation_pass, a, desired)
        except PassFailed:
            pass

    # --- stages -------------------------------------------------------------------------------
    def gather(self) -> PassInputs | None:
        """Each input from its owner, frozen. Followers start and stop here, never in planning."""
        a = self.agent
        snap = a.snapshot()
        if snap is None or a.config is None or a.key is None:
            return None
        fed = a.federation.view()
        clusters: dict[str, str | None] = {a.cfg.cluster: None}
        clusters.update((n, m.datacenter) for n, m in fed.members.items() if n != a.cfg.cluster)
        backends = a.service_backends.gather(set(snap.services), clusters) if a.reconciler.services else None
        # Peers' readiness is watched only while it matters: this node's rotation staged.
        a.readiness.follow(clusters if staging(a) else {})
        r = a.rotator
        departed = a.departures.held()
        proven = a.proofs.proven(announced_next_keys(snap.nodes, departed, fed))
        unseen = unseen_switches(a.cfg.cluster, a.cfg.node, snap.nodes, fed, proven, r.peer.taken,
                                 proven - self.planned_proofs) if r.switch_at else {}
        key = r.next_key if r.switch_due(unseen) and r.next_key is not None else a.key  # the switch: planned like the rest
        local = LocalNode(name=a.cfg.node, cluster=a.cfg.cluster, config=a.config,
                          device=DeviceSpec(key, a.listen_port), pod_cidr=a.pod_cidr, underlay_mtu=a.underlay_mtu,
                          persistent_keepalive=a.cfg.persistent_keepalive, wg_device=a.cfg.interface)
        found = local_pods(a.cni)
        a.endpoints.publish(found)  # (published where no datapath loaded too; written only when it changed)
        pods = found if a.reconciler.policy is not None else None
        if pods is not None:
            a.pods = pods
        waits = time.monotonic() - a.created_at < POLICY_WAIT_S
        return PassInputs(local, snap, fed, backends, now_ms(), proven_keys=proven, departed=departed, pods=pods,
                          policy_waits=waits)

    def apply(self, desired: DesiredState, full: bool) -> ReconcileResult | None:
        a = self.agent
        a.save_pod_mtu(desired.pod_mtu)  # before pods get it: the CNI plugin gives new pods the same
        t0 = time.perf_counter()
        try:
            if full:
                a.ensure_device(desired)
            return a.reconciler.reconcile(desired, prune=a.may_prune(), full=full)
        except DeviceNotFound:
            if a.stop_event.is_set():
                return None  # stopping: never start a new wireguard-go on the way out
            log.warning("device %s is gone; creating it again", a.cfg.interface)
            a.ensure_device(desired)
            a.reconciler.forget_overlay()
            return a.reconciler.reconcile(desired, prune=a.may_prune(), full=True)
        except TunnelError:
            a.metrics.sync_errors_total.labels("dataplane").inc()
            raise
        finally:
            a.metrics.reconcile_seconds.observe(time.perf_counter() - t0)
