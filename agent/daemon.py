"""The node agent: publish this node, watch the cluster, keep the dataplane in the desired state.

Threads (each started, tracked and joined by agent.supervisor):
- registration (agent.registration): keeps a Consul session (TTL, behavior=delete) alive and
  the node record published under it; re-creates both when Consul lost them; makes the record
  writes a key rotation asks for.
- watch: blocking queries on the cluster's prefix; each answer becomes a validated, immutable
  snapshot handed to the reconcile loop through a mailbox. The watches never change the agent.
- federation: one watch for the mesh membership and one follower per remote cluster.
- kv-writer: Consul writes the loop must not wait for (readiness, rotation progress).
- staged-watch (agent.staged): while a peer rotates its key, reads the device every 20 ms for
  the peer's first handshake with its new key (its switch, proven by the data plane).
- reconcile: the one loop that owns the agent's state; each pass is agent.passes (inputs ->
  plan -> reconcile -> report -> rotation). It wakes on a snapshot, a federation change, an
  object's retry, a rotation's time, SIGHUP, or the periodic full pass that repairs drift.
- watchdog (agent.watchdog): logs a standstill of the whole process (a starved host) and the
  stack of a pass stuck for seconds, so a late switch names its cause.

Nothing here removes a peer or route before the first full snapshot has arrived, and a Consul
outage only stops updates: the last good state stays programmed. A thread that dies makes
/healthz fail naming it, and the agent exit non-zero soon after (systemd or the lab restarts
it): never half-running.
"""

from __future__ import annotations

from http.server import ThreadingHTTPServer
import ipaddress
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any


from wiremesh.clustermesh import (
    Anchor,
    ClusterConfig,
    ClusterSnapshot,
    ConsulError,
    ConsulStore,
    NodeRecord,
    ParseCache,
    keep_unknown,
    layout,
    overlay_address,
    parse_cluster,
)
from wiremesh.keys import PrivateKey, load_or_generate
from wiremesh.errors import WiremeshError
from wiremesh.tunnels import (
    enable_forwarding,
    ensure_address,
    ensure_link_up,
    mtu_of_address,
    open_device,
    vtep_mac,
)

from wiremesh.tunnels import CniState, policy_ready

from . import __version__
from .config import AgentConfig
from .departures import HOLD_MAX_S, Departures
from .errors import AgentError
from .federation import Federation
from .metrics import AgentMetrics, reject_label, serve
from .nodestate import bootstrap, save_node_state
from .report import object_report, peer_report
from .registration import Registration
from .passes import Pass
from .planner import DesiredState, tunnel_mtu
from .pokes import Pokes
from .policy_link import EndpointsPublisher, VerdictCollector, load_policy
from .policy_plan import LocalEndpoint
from .reconciler import ReconcileResult, Reconciler
from .kvwriter import KVWriter
from .readiness import ReadinessWatch
from .rotation import Rotator, now_ms
from .rotation_link import RecordPublisher, device_public_key
from .services import ServiceBackends, load_service_lb
from .staged import SwitchProofs
from .supervisor import FATAL_GRACE_S, Mailbox, Supervisor
from .watchdog import Watchdog
from .trust import TrustState, load_pin, pin_anchor

log = logging.getLogger("wiremesh.agent")

WATCH_WAIT_S = 30
BACKOFF_MAX_S = 5.0
QUIET_MS = 250  # no pass starts this close before a key changes on the device (agent.rotation)
REJOIN_GRACE_TTLS = 2  # removals held this many session TTLs (+ backoff) after Consul came back
EXIT_THREAD_DIED = 70  # EX_SOFTWARE: a thread of the agent died; restart it


AGENT_NICE = -5  # the agent (and the wireguard-go it starts) ahead of ordinary work on a busy host


def _raise_priority() -> None:
    """Run ahead of ordinary processes (nice AGENT_NICE), as time daemons do: a key switch is timed
    to the millisecond, and on a host whose cores are busy a pass waited 100-1 500 ms for a CPU
    (measured under two CPU hogs): the node's switch came after its peers had taken the key.
    Called before any thread starts (Linux nice is per thread; new threads and the wireguard-go
    the agent starts inherit it). Without the privilege, it says so once and goes on. With the
    kernel's autogroups, nice counts only within a session: the agent leaves its own session's
    alone (it may be an operator's terminal; a systemd service has a cgroup of its own, and the
    lab's keeper sets it), and gives wireguard-go's new session its nice (tunnels.sched)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > AGENT_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, AGENT_NICE)
    except OSError as e:
        log.info("scheduling priority not raised (%s): key switches may come late on a busy host", e.strerror or e)


class StoppedEarly(AgentError):
    """SIGTERM arrived while the agent was still waiting for Consul: a clean exit."""


def full_pass_now(asked: bool, due: bool, proof_waiting: bool, postponed: bool = False) -> bool:
    """Whether the pass about to run is a full one: `asked` (SIGHUP, a new listen port, a failed
    full pass's retry) or the periodic resync `due`, unless a peer's switch was just proven
    (`proof_waiting`): the pass that takes its key must be quick, the node queues only 128
    packets for this one, and a full resync re-reads the device and every route (2.6 s seen at
    30 nodes under load, 87 pings lost). The resync then comes with the next pass: it is put
    off once only (`postponed`: the last pass was put off), so passes that keep failing before
    they take the proof never hold off the resync that may repair them."""
    return asked or (due and (postponed or not proof_waiting))


class Agent:
    def __init__(self, cfg: AgentConfig, store: ConsulStore | None = None) -> None:
        self.cfg = cfg
        self.store = store or ConsulStore(cfg.consul)
        self.metrics = AgentMetrics()
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._full_pass = threading.Event()  # SIGHUP: re-read everything on the next pass
        self._lock = threading.Lock()
        self._snapshot: ClusterSnapshot | None = None  # the newest snapshot the loop has taken
        self._stored_own: NodeRecord | None = None  # this node's record as Consul has it
        self._own_cache: tuple[object, NodeRecord] | None = None
        self._inbox: Mailbox[ClusterSnapshot] = Mailbox(self._wake)
        # Records that vanished (a session lapsed while its agent restarted): planned from a moment longer.
        self.departures = Departures(cfg.cluster, cfg.node, min(float(cfg.session_ttl), HOLD_MAX_S))
        self._taking: ClusterSnapshot | None = None  # a snapshot whose intake failed: taken again
        self._passes = [0, 0]  # reconcile passes done: all, full (drift repair); for /healthz
        self.supervisor = Supervisor(self.stop_event)
        self._first_sync = False
        self._consul_ok = False
        self._rejoined_at = 0.0  # when the local Consul came back after an outage (time.monotonic())
        self.created_at = time.monotonic()  # (network policy waits for remote clusters this long at most: POLICY_WAIT_S)
        self._logged_rejects: dict[str, str] = {}
        self._peers = (0, 0)  # desired, programmed: as of the last reconcile
        self._last_republish = 0.0
        self._logged_once: dict[str, str] = {}
        self.key: PrivateKey | None = None
        self.public_key = ""
        self.config: ClusterConfig | None = None
        self.pod_cidr: str | None = None
        self.underlay_mtu: int | None = None
        self.device = open_device(cfg.interface, cfg.backend, state_dir=cfg.state_dir)
        self.registration = Registration(self.store, cfg, self._record, self.metrics, self.stop_event,
                                         on_published=self._wake.set)
        cni = self.cni = CniState(cfg.state_dir)
        self.pods: tuple[LocalEndpoint, ...] = ()  # this node's pods as the last pass gathered them (policy)
        self.reconciler = Reconciler(self.device, pods=lambda: [(p.netns, p.container_id, p.ifname)
                                                                for p in cni.attachments()])
        self.service_backends = ServiceBackends(self.store, self.supervisor.follow, self._wake.set)
        self.kv_writer = KVWriter(self.store, self.stop_event)  # writes that must not hold up the loop
        self.rotator = Rotator(self.store, cfg.cluster, cfg.node, cfg.key_file, writer=self.kv_writer,
                               consul_up=lambda: self._consul_ok, identity=self.registration.identity)
        self.publisher = RecordPublisher(self.registration, self.rotator)
        self.endpoints = EndpointsPublisher(cfg.cluster, cfg.node, self.kv_writer, self.registration.identity)
        self.proofs = SwitchProofs(self.device, self._wake.set, consul_up=lambda: self._consul_ok)
        self.pokes = Pokes()  # new peers' first handshakes (agent.rotation_link)
        self.readiness = ReadinessWatch(self.store, f"{cfg.cluster}/{cfg.node}", self.stop_event, self._wake.set,
                                        self.supervisor.follow, metrics=self.metrics)
        self.federation = Federation(self.store, cfg.cluster, self.stop_event, self._wake.set, self.metrics,
                                     local_pod_cidr=lambda: self.config.pod_cidr if self.config else None,
                                     spawn=self.supervisor.spawn, follow=self.supervisor.follow,
                                     hold_s=self.departures.hold_s)
        self.watchdog = Watchdog(on_stall=lambda _s: self.metrics.process_stalls_total.inc())
        self.loop_pass = Pass(self, self.watchdog)
        # The cluster signing key this node pinned (agent.trust); None: the signing settings are
        # taken from Consul as they are (an unsigned cluster, or a node never enrolled).
        self.trust = TrustState(cfg.state_dir, cfg.cluster)
        self.pin = load_pin(cfg) if isinstance(cfg, AgentConfig) else None
        self.anchor: Anchor | None = None
        self.pod_mtu: int | None = None
        self._pod_mtu_saved = True  # the pod MTU above is the one state.json holds
        self._http: ThreadingHTTPServer | None = None

    # --- start-up -------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.cfg.state_dir / "state.json"

    @property
    def listen_port(self) -> int:
        assert self.config is not None
        return self.cfg.listen_port or self.config.wg_port

    def _bootstrap_from_consul(self) -> None:
        """Cluster config and pod-CIDR lease. Waits for Consul unless a cached copy lets us go on."""
        got = bootstrap(self.store, self.cfg.cluster, self.cfg.node, self.state_file, self.stop_event,
                        identity=self.registration.identity)
        if got is None:
            raise StoppedEarly("stopped before Consul answered")
        self.config, self.pod_cidr, self.pod_mtu = got
        self._pin_anchor()

    def _pin_anchor(self) -> None:
        assert self.config is not None
        self.anchor = pin_anchor(self.trust, self.pin, self.registration.identity, self.config)
        if self.anchor is not None:
            self.config = self.anchor.strict(self.config)  # until the first snapshot brings signed settings

    def _save_cached(self) -> bool:
        assert self.config is not None and self.pod_cidr is not None
        return save_node_state(self.state_file, self.cfg.cluster, self.cfg.node, self.config, self.pod_cidr, self.pod_mtu)

    def _record(self) -> NodeRecord:
        """This node's record; fields a newer agent added to the stored one are kept in it."""
        if self.rotator.resume_pending:  # (a write now could withdraw a commit made before a restart)
            raise AgentError("this node's rotation commit is not known yet: the record waits for the first snapshot")
        return keep_unknown(self._own_record(), self._stored_own)

    def _own_record(self) -> NodeRecord:
        """Built once per (port, pod CIDR, key): it is compared with the stored one on every snapshot."""
        assert self.key and self.pod_cidr
        r = self.rotator
        inputs = (self.listen_port, self.pod_cidr, self.public_key, r.next_key, r.switch_at, r.epoch, r.held)
        if self._own_cache is None or self._own_cache[0] != inputs:
            self._own_cache = (inputs, self._build_record())
        return self._own_cache[1]

    def _build_record(self) -> NodeRecord:
        assert self.key and self.pod_cidr
        host = self.cfg.underlay_address
        endpoint = f"[{host}]:{self.listen_port}" if ":" in host else f"{host}:{self.listen_port}"
        rec = NodeRecord(
            name=self.cfg.node, cluster=self.cfg.cluster, endpoint=endpoint,
            public_key=self.public_key, pod_cidr=self.pod_cidr,
            overlay_ip=overlay_address(self.pod_cidr),
            key_epoch=0, vtep_mac=vtep_mac(overlay_address(self.pod_cidr)), agent_version=__version__,
        )
        return self.rotator.announce(rec)

    def setup(self) -> None:
        _raise_priority()
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key, generated = load_or_generate(self.cfg.key_file)
        kept = self.rotator.recover(device_public_key(self))
        if kept is not None:  # the device took the next key before a stop: it is the node's key now
            self.key = kept
        self.public_key = self.key.public_key().base64  # derived once: planning needs it on every pass
        log.info("%s key %s (public %s)", "generated" if generated else "loaded",
                 self.cfg.key_file, self.key.public_key().fingerprint)
        self._bootstrap_from_consul()
        self.rotator.resume()  # a rotation left staged goes on being announced from the first record
        self.underlay_mtu = mtu_of_address(self.cfg.underlay_address)
        if self.underlay_mtu is None:
            log.warning("no interface holds underlay_address %s; peers will not reach this node",
                        self.cfg.underlay_address)
        enable_forwarding()
        lb = load_service_lb(self.cfg.service_cgroup, self.cfg.pin_dir)
        if lb is not None:
            self.reconciler.attach_services(lb)
        dp = load_policy(self.cfg.pin_dir)
        if dp is None:
            policy_ready.clear_ready(self.cfg.state_dir)  # (CNI ADD then waits for nothing)
        else:
            self.reconciler.attach_policy(dp, self._policy_synced)
            self.metrics.registry.register(VerdictCollector(
                dp.counts, lambda: self.loop_pass.desired.policy_rules if self.loop_pass.desired else {}))
        self.ensure_device()

    def _policy_synced(self, veths: frozenset[int]) -> None:
        """The pods whose veths are under policy now: the CNI plugin's ADD waits for its pod's.
        A full or read-only state dir fails the ADDs that wait (logged once), never the pass."""
        try:
            policy_ready.write_ready(self.cfg.state_dir, {p.host_ifname: p.ifindex for p in self.pods if p.ifindex in veths})
        except OSError as e:
            self._once("policy-ready", f"state dir: cannot write {policy_ready.ready_file(self.cfg.state_dir)} "
                                       f"({e.strerror or e}); new pods wait for it in vain")

    def ensure_device(self, desired: DesiredState | None = None) -> None:
        """Create the device if it is missing and give it identity, port, address, MTU and link up.

        Each step reads first and changes only what differs, so running it on a healthy device
        changes nothing (it runs on every full pass, and whenever the device went missing). At
        start-up (no plan yet) the device gets the node's key and the cluster's address and MTU.
        """
        assert self.config and self.key and self.pod_cidr
        existed = self.device.exists()
        self.device.create()
        # Identity and port only at start-up: in a pass the reconciler's device step sets them
        # (and tells the rotation stage when the key changed, for its handshakes).
        changed = self.device.configure(self.key, self.listen_port) if desired is None else False
        ip = ipaddress.ip_address(overlay_address(self.pod_cidr))
        address = desired.address if desired is not None and desired.address else f"{ip}/{ip.max_prefixlen}"
        mtu = desired.mtu if desired is not None else tunnel_mtu(self.config, self.underlay_mtu)
        ensure_address(self.cfg.interface, address)
        # The MTU is set here only on a new device: later changes go through the reconciler,
        # which orders them around a routing-mode switch.
        ensure_link_up(self.cfg.interface, mtu if not existed else None)
        if not existed or changed:
            log.info("device %s (%s backend) %s%s, overlay %s, listen port %d", self.cfg.interface,
                     self.device.backend, "kept" if existed else "created", ", identity set" if changed else "",
                     address, self.listen_port)

    # --- watch ----------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        delay = 0.2
        prefix = layout.cluster_prefix(self.cfg.cluster)
        cache = ParseCache()  # records are parsed again only when their ModifyIndex changed
        # The policies last in force stand in for records refused at start (agent.trust).
        cache.policies = self.trust.load_policies()
        kept_policies = dict(cache.policies)
        last_config = self.config  # the watch's own: as of its last snapshot (the loop owns self.config)
        anchor, seen = self.anchor, self.trust.load_seen()
        saved = True
        while not self.stop_event.is_set():
            try:
                for index, items in self.store.watch(prefix, self.stop_event, wait_s=WATCH_WAIT_S):
                    snap = parse_cluster(self.cfg.cluster, index, items, last_config=last_config, cache=cache,
                                         anchor=anchor, seen=seen)
                    last_config = snap.config or last_config
                    if snap.anchor is not None and snap.anchor != anchor:
                        if anchor is not None and snap.anchor.key != anchor.key:
                            log.warning("cluster signing key rolled over to %s (signed by %s)",
                                        snap.anchor.fingerprint, anchor.fingerprint)
                        anchor = self.anchor = snap.anchor
                        saved = False
                    if not saved and anchor is not None:
                        saved = self.trust.save_anchor(anchor)
                    if snap.seen != seen:
                        seen = dict(snap.seen)
                        self.trust.save_seen(seen)
                    if snap.policies != kept_policies and self.trust.save_policies(snap.policies):
                        kept_policies = dict(snap.policies)
                    if not self._consul_ok:
                        log.info("Consul watch is up (index %d, %d nodes)", snap.index, len(snap.nodes))
                        if self._first_sync:  # back after an outage: records may be re-registering
                            self._rejoined_at = time.monotonic()
                    self._consul_ok = True
                    self.metrics.consul_up.set(1)
                    self._inbox.put(snap)  # the reconcile loop takes it (and wakes for it)
                    delay = 0.2
            except ConsulError as e:
                if self._consul_ok:
                    log.warning("lost Consul (%s): keeping the dataplane as it is", e)
                self._consul_ok = False
                self.metrics.consul_up.set(0)
            except Exception:  # noqa: BLE001 - keep watching whatever one snapshot did
                log.exception("watch failed unexpectedly; the dataplane is kept as it is")
            self.metrics.sync_errors_total.labels("watch").inc()
            self.stop_event.wait(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)

    def intake(self) -> None:
        """The pass's first stage: the newest snapshot, if one came (one whose intake failed is
        taken again on the retry, unless a newer one came meanwhile)."""
        snap = self._inbox.take() or self._taking
        if snap is None:
            return
        self._taking = snap
        self._take_snapshot(snap)
        self._taking = None

    def _take_snapshot(self, snap: ClusterSnapshot) -> None:
        """Follow a new snapshot: log what it rejected, adopt its config. Only the loop calls this."""
        rejected = {r.key: r.reason for r in snap.rejected}
        for key, reason in rejected.items():
            if self._logged_rejects.get(key) != reason:
                log.warning("skipping invalid record %s: %s", key, reason)
                self.metrics.invalid_records_total.labels(reject_label(reason)).inc()
        self._logged_rejects = rejected
        self.metrics.invalid_records.set(len(rejected))
        if snap.config is not None and snap.config != self.config:
            old_port = self.listen_port if self.config else None
            if self.config is not None:
                log.info("cluster config changed")
            self.config = snap.config
            if old_port is not None and old_port != self.listen_port:
                self._full_pass.set()  # the device's port follows on the next pass,
                self.registration.republish.set()  # and peers learn the new endpoint
        own_key = layout.node_key(self.cfg.cluster, self.cfg.node)
        mine = snap.nodes.get(self.cfg.node)
        if mine is not None:
            self._stored_own = mine
        kept = self.cfg.node in snap.kept  # an old record of this node was written back: ours again
        seen = snap.seen.get(self.cfg.node)
        if own_key in rejected and rejected[own_key].startswith("key_epoch") and seen is not None \
                and self.public_key not in (seen.key, seen.next_key) and self.rotator.raise_epoch(seen.epoch + 1):
            # This node's key changed without a rotation (its key file replaced by hand): a new key
            # at an epoch already seen with another is refused everywhere (the old record is kept
            # in its place). A higher epoch is not.
            self.registration.republish.set()
        elif own_key in rejected and not kept:
            pass  # logged above; writing it again would not make it valid
        elif self.registration.session_id and self.pod_cidr and (kept or mine != self._record()):
            # Gone (Consul lost it, someone deleted it) or overwritten: write ours again, at
            # most once a second whatever the watch delivers (an old one written back: at once).
            # A record this agent wrote a moment ago is the watch running behind a newer write,
            # which follows: nothing to write (a rotation's writes come quickly one after another).
            now = time.monotonic()
            if not kept and mine is not None and self.registration.wrote_recently(mine):
                pass
            elif kept or now - self._last_republish >= 1.0:
                self._last_republish = now
                self.registration.forget_written()
                self.registration.republish.set()
        if self.pod_cidr and snap.leases and snap.leases.get(self.pod_cidr) not in (None, self.cfg.node):
            self._once("lease", f"pod CIDR {self.pod_cidr} is now leased to {snap.leases[self.pod_cidr]!r} in "
                                "Consul; this node's record will be refused until that is resolved")
        self.departures.follow(self._snapshot, snap)
        with self._lock:
            self._snapshot = snap
            self._first_sync = True
        self.metrics.synced()

    def _once(self, key: str, msg: str) -> None:
        if self._logged_once.get(key) != msg:
            self._logged_once[key] = msg
            log.warning("%s", msg)

    # --- reconcile ---------------------------------------------------------------------------
    def reconcile_once(self, full: bool = False) -> bool:
        """One pass of the loop (agent.passes); False if it failed (retried with backoff)."""
        return self.loop_pass.run(full)

    def save_pod_mtu(self, mtu: int | None) -> None:
        """Record the pod MTU for the CNI plugin (new pods get it); tried again until saved."""
        if mtu is None or (mtu == self.pod_mtu and self._pod_mtu_saved):
            return
        if mtu != self.pod_mtu:
            log.info("pod MTU %s -> %d", self.pod_mtu, mtu)
            self.pod_mtu = mtu
        self._pod_mtu_saved = self._save_cached()

    def desired(self) -> DesiredState | None:
        """The desired state as of the last planned pass."""
        return self.loop_pass.desired

    def report(self, desired: DesiredState, res: ReconcileResult, full: bool) -> None:
        """The pass's report stage: status, metrics, what changed, the pod MTU for the CNI plugin."""
        self._peers = (len(desired.peers), res.programmed)
        self._passes[0] += 1
        self._passes[1] += 1 if full else 0
        for s in desired.skipped:
            key, msg = f"skipped:{s.split(':', 1)[0]}", f"left out: {s}"
            if s.startswith("service ") and " backend " in key and self._logged_once.get(key) != msg:
                self.metrics.invalid_records_total.labels("backend").inc()  # (agent.service_plan.admitted)
            self._once(key, msg)
        self.metrics.peers_desired.set(len(desired.peers))
        self.metrics.peers_programmed.set(res.programmed)
        for op, n in (("add", res.added), ("update", res.updated), ("remove", res.removed)):
            if n:
                self.metrics.peer_changes_total.labels(op).inc(n)
        if res.added or res.updated or res.removed or res.routes_added or res.routes_removed:
            shown = res.peer_changes[:6] + ([f"... {len(res.peer_changes) - 6} more"] if len(res.peer_changes) > 6 else [])
            log.info("reconciled: +%d ~%d -%d peers, +%d -%d routes (%d/%d programmed)%s", res.added, res.updated,
                     res.removed, res.routes_added, res.routes_removed, res.programmed, len(desired.peers),
                     f" [{' '.join(shown)}]" if shown else "")
        if res.errors:
            self.metrics.sync_errors_total.labels("dataplane").inc(res.errors)
        self.metrics.objects_in_error.set(self.reconciler.table.errors())

    def _prune_held_until(self) -> float:
        """Removals wait this long (time.monotonic()) after Consul, local or a remote cluster's,
        came back from an outage: sessions that expired meanwhile took their nodes' records with
        them, and those reappear only as each agent registers again (within its session TTL and
        registration backoff). A peer is never cut for that."""
        return max(self._rejoined_at, self.federation.rejoined_at) + REJOIN_GRACE_TTLS * self.cfg.session_ttl \
            + BACKOFF_MAX_S

    def may_prune(self) -> bool:
        return self._first_sync and time.monotonic() >= self._prune_held_until()

    # --- what agent.rotation_link reads ------------------------------------------------------
    def snapshot(self) -> ClusterSnapshot | None:
        with self._lock:
            return self._snapshot

    def last_desired(self) -> DesiredState | None:
        return self.loop_pass.desired

    def wake(self) -> None:
        self._wake.set()

    def _reconcile_loop(self) -> None:
        next_full = time.monotonic() + self.cfg.resync_interval
        postponed = False  # the last pass was to be a full one and was not (full_pass_now)
        while not self.stop_event.is_set():
            # Sleep until something happens: a snapshot, a federation change, SIGHUP, stop, the
            # earliest retry of an object that failed, or the next full pass.
            rot = self.rotator.wake
            rot_mono = time.monotonic() + max(0, rot - now_ms()) / 1000 if rot else None
            held = self._prune_held_until()  # removals held after an outage: a pass when the hold ends
            retry = min((t for t in (self.reconciler.next_retry(), self.service_backends.next_change(), rot_mono,
                                     held if held > time.monotonic() else None, self.loop_pass.retry_at,
                                     self.departures.next_end(), self.federation.next_departure_end(),
                                     self.pokes.next_due()) if t),
                        default=None)
            timeout = min(next_full, retry if retry else next_full) - time.monotonic()
            self._wake.wait(max(0.0, timeout))
            precise = self.rotator.hold_until(QUIET_MS)
            if precise is not None and not self.proofs.news():  # (a node's proven switch is never held)
                # This node's key changes on the device at `precise` (its switch): a pass
                # started now could still be planning then (100-200 ms on a loaded host, measured),
                # and the change would come late. Wait for it; the pass then does it first. A
                # peer's switch proven meanwhile ends the wait: its queue would overflow.
                self.proofs.wait_news((precise - now_ms()) / 1000)
            self._wake.clear()
            if self.stop_event.is_set():
                return
            due = time.monotonic() >= next_full
            full = full_pass_now(self._full_pass.is_set(), due, self.proofs.news(), postponed)
            postponed = due and not full
            self._full_pass.clear()
            if not self.reconcile_once(full=full) and full:
                self._full_pass.set()  # the retry is a full pass too
            elif full:
                next_full = time.monotonic() + self.cfg.resync_interval

    # --- health ---------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        device_ok = False
        try:
            device_ok = self.device.exists()
        except WiremeshError:
            pass
        detail = {
            "node": self.cfg.node, "cluster": self.cfg.cluster, "device": device_ok,
            "first_sync": self._first_sync, "consul": self._consul_ok,
            "registered": self.registration.session_id is not None,
            "peers_desired": self._peers[0],
            "peers_programmed": self._peers[1],
            "passes": self._passes[0], "full_passes": self._passes[1],
            "clusters": self.federation.status(),
        }
        dead = dict(self.supervisor.dead)
        if dead:
            detail["dead_threads"] = dead  # the agent exits soon, to be restarted
        failing = self.loop_pass.failures
        if failing:
            detail["failed_passes"] = failing  # in a row; retried with backoff
        ok = device_ok and self._first_sync and not dead
        detail["status"] = ("failed: thread " + ", ".join(sorted(dead)) + " died") if dead else \
            "ok" if ok and self._consul_ok and not failing else ("degraded" if ok else "starting")
        return ok, detail

    # --- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self.cfg.health_bind:  # first, so /healthz answers "starting" while Consul is awaited
            try:
                self._http = serve(self.cfg.health_bind, self.metrics, self.health,
                                   lambda: peer_report(self.reconciler, self.loop_pass.desired),
                                   lambda: object_report(self.reconciler, self.cfg.node, self.cfg.cluster,
                                                         self.supervisor.alive()))
            except OSError as e:
                raise AgentError(f"health_address {self.cfg.health_address}: {e.strerror or e}") from None
        # First: the previous run's session is renewed while the agent sets up (its record, which
        # every peer follows, must outlive a slow start); the loop then adopts it.
        set_up = threading.Event()

        def register() -> None:
            self.registration.keep_previous(set_up)
            self.registration.loop()
        self.supervisor.spawn("register", register)
        try:
            self.setup()
        except BaseException:
            self.stop_event.set()  # the agent ends here, its register thread with it
            raise
        set_up.set()
        self.kv_writer.start(self.supervisor.spawn)
        self.federation.start()
        for name, fn in (("watch", self._watch_loop), ("reconcile", self._reconcile_loop),
                         ("staged-watch", lambda: self.proofs.run(self.stop_event)),
                         ("watchdog", lambda: self.watchdog.run(self.stop_event))):
            self.supervisor.spawn(name, fn)
        if self.reconciler.policy is not None:  # a CNI ADD wakes the loop (tunnels.policy_ready)
            self.supervisor.spawn("policy-wake", lambda: policy_ready.serve_wake(
                self.cfg.state_dir, self._wake.set, self.stop_event,
                lambda e: self._once("policy-wake", f"state dir: no wake socket for the CNI plugin "
                                                    f"({e.strerror or e}); new pods wait for the next pass")))

    def shutdown(self, remove_record: bool = True) -> None:
        """Stop every loop; with `remove_record`, end the session so the record goes at once.

        The record is removed only once the registration and reconcile loops have really ended
        (nothing can then publish it again or touch the device). Watches may sit in a blocking
        query for up to its wait: they hand nothing to anyone any more, and are daemon threads.
        """
        self.kv_writer.flush(timeout=1.0)  # a rotation's last progress, if Consul takes it at once
        self.stop_event.set()
        self._wake.set()
        self.kv_writer.close()
        self.registration.republish.set()
        self.federation.close()
        self.service_backends.close()
        self.readiness.close()
        left = self.supervisor.join(["register", "reconcile"], timeout=10)
        if left:
            log.error("threads %s did not stop; the record is left to expire with its session", ", ".join(left))
        elif remove_record:
            self.registration.remove()
        watching = self.supervisor.join(timeout=1.0)
        if watching:
            log.debug("left in blocking queries at exit: %s", ", ".join(watching))
        if self._http:
            self._http.shutdown()
            self._http.server_close()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (0), or until a thread died (EXIT_THREAD_DIED, after
        FATAL_GRACE_S in which /healthz names it). SIGHUP forces a full reconcile pass."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        def hup(*_: object) -> None:
            self._full_pass.set()
            self._wake.set()
        signal.signal(signal.SIGHUP, hup)
        try:
            self.start()
        except StoppedEarly:
            log.info("stopped before Consul answered")
            return 0
        # The main thread waits for a signal (it sets stop_event) or a thread's death.
        while not self.stop_event.wait(0.5):
            if self.supervisor.died.is_set():
                dead = ", ".join(f"{n} ({why})" for n, why in sorted(self.supervisor.dead.items()))
                log.critical("thread %s died: /healthz fails; exiting in %.0f s to be restarted", dead, FATAL_GRACE_S)
                if self.stop_event.wait(FATAL_GRACE_S):
                    break
                # The record stays (its session is adopted by the next run): peers keep the tunnel.
                self.shutdown(remove_record=False)
                return EXIT_THREAD_DIED
        log.info("stopping")
        self.shutdown(remove_record=True)
        return 0
