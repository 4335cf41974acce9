"""Keeping this node's record in Consul: a session (TTL, behavior=delete) renewed by the agent,
and the record written under it, again whenever Consul lost either.

Consul invalidates a session up to twice its TTL after the last renewal, so it is asked for
half of `session_ttl`: a crashed node's record is gone within session_ttl. A restarted agent
adopts the session of its previous run if that still lives, so the record never disappears
and no peer drops this node's tunnel.

With `consul.session_node` the session is made on that Consul node (the one name a per-node
ACL token may hold sessions for) and tied to its TTL only; the agent registers that node in
the catalog first if no Consul agent has (a host whose agent talks to the servers directly).

A node with a certificate (agent.identity) signs every record it writes with its identity key,
so each new WireGuard key (rotation) is vouched for without a new certificate.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from wiremesh.clustermesh import (
    ConsulError,
    ConsulReason,
    ConsulStore,
    ConsulUnavailable,
    NodeRecord,
    SessionExpired,
    layout,
)

from wiremesh.clustermesh import sign_record

from .config import AgentConfig
from .nodestate import write_state_file
from .errors import AgentError
from .identity import load_identity
from .metrics import AgentMetrics

log = logging.getLogger("wiremesh.agent")
BACKOFF_MAX_S = 5.0
CONSUL_TTL_MIN_DEFAULT = 10  # Consul's default session_ttl_min
# A commit not started this soon after it was asked for is given up (the rotation picks a new
# switch time): it was picked a second ahead, and a write that lands after it is a late switch.
COMMIT_START_WITHIN_S = 0.3


@dataclass(slots=True)
class Publication:
    """A write of the record asked of the registration thread; `done` once Consul answered.

    `commit_at`: a key rotation's switch time, carried by this write only (the commit); once it
    is written, `on_written` runs on the registration thread before any other write of the
    record can start (the rotator then announces that time in every later write)."""

    commit_at: int = 0
    on_written: Callable[[], None] | None = None
    next_key: str = ""  # the next public key the commit was decided for
    asked_at: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False


class Registration:
    def __init__(self, store: ConsulStore, cfg: AgentConfig, record: Callable[[], NodeRecord],
                 metrics: AgentMetrics, stop: threading.Event, on_published: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.cfg = cfg
        self.record = record
        self.metrics = metrics
        self.stop = stop
        self.republish = threading.Event()  # set: write the record again at once
        self._publishing = threading.Lock()  # one write at a time, each of the newest record
        self._asked: Publication | None = None  # the write the loop thread asked for, if any
        self._ask_lock = threading.Lock()
        self.on_published = on_published  # an asked-for write was answered (wakes the agent's loop)
        self.session_id: str | None = None
        self.consul_ttl = max(1, math.ceil(cfg.session_ttl / 2))
        # The record Consul last took from this thread, and under which session: the same record
        # again is not written (every write wakes every agent of the cluster; a rotation asked
        # for six writes where three differ). `forget_written` when Consul's copy is not ours.
        self._written: tuple[str, NodeRecord] | None = None
        self._recent: deque[tuple[float, NodeRecord]] = deque(maxlen=8)  # (time.monotonic(), record) written
        # None: unsigned records (and for stand-ins of AgentConfig in tests, which name no key files)
        self.identity = load_identity(cfg) if isinstance(cfg, AgentConfig) else None
        # The agent bootstraps its lease before this loop runs; it leases the certificate's CIDR.
        if self.identity is not None:
            log.info("signing records as %r", self.identity)
        self._cert_mark = self._certificate_mark()

    def _certificate_mark(self) -> tuple[int, int] | None:
        if not isinstance(self.cfg, AgentConfig):
            return None
        try:
            st = self.cfg.certificate_path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def reload_identity(self) -> bool:
        """Take a certificate enrolled again (a roll-over of the cluster key, a renewal) without a
        restart; True if the identity changed (the record is then signed again)."""
        mark = self._certificate_mark()
        if self.identity is None or mark is None or mark == self._cert_mark:
            return False
        self._cert_mark = mark
        try:
            identity = load_identity(self.cfg)
        except AgentError as e:
            log.warning("certificate changed but not taken: %s", e)
            return False
        if identity is None or identity.certificate == self.identity.certificate:
            return False
        self.identity = identity
        log.info("took the new certificate: signing records as %r", identity)
        return True

    @property
    def session_name(self) -> str:
        return f"wiremesh-agent {self.cfg.cluster}/{self.cfg.node}"

    @property
    def _session_file(self) -> Path:
        return self.cfg.state_dir / "session"

    def _saved_session(self) -> str | None:
        try:
            return self._session_file.read_text().strip() or None
        except OSError:
            return None

    def _save_session(self, session_id: str) -> None:
        write_state_file(self._session_file, session_id + "\n")  # a full state dir: kept in memory

    def ensure_session(self) -> str:
        if self.session_id:
            return self.session_id
        key = layout.node_key(self.cfg.cluster, self.cfg.node)
        item = self.store.get(key)
        saved = self._saved_session()
        if item and item.session and item.session == saved:
            # Our previous run (killed, or restarted quickly) still holds the record: adopt its
            # session, so the record never disappears and no peer drops this node's tunnel. Only
            # the session this node wrote down: another agent misconfigured with the same node
            # name must fail `acquire`, not share the record.
            try:
                self.store.session_renew(item.session)
                self.session_id = item.session
                log.info("adopted session %s of a previous run", item.session[:8])
                return item.session
            except SessionExpired:
                pass
        node = self.cfg.consul.session_node
        if node and not self.store.catalog_node_exists(node):
            self.store.catalog_register_node(node, self.cfg.underlay_address, {"wiremesh-cluster": self.cfg.cluster})
            log.info("registered Consul node %s for this agent's sessions", node)
        try:
            self.session_id = self.store.session_create(self.session_name, self.consul_ttl, behavior="delete",
                                                        node=node)
        except ConsulError as e:
            if e.reason is not ConsulReason.SESSION_TTL or self.consul_ttl >= CONSUL_TTL_MIN_DEFAULT:
                raise
            log.warning("Consul refused a %ds session TTL (its session_ttl_min is higher); using %ds, so a "
                        "crashed node's record lasts up to %ds", self.consul_ttl, CONSUL_TTL_MIN_DEFAULT,
                        2 * CONSUL_TTL_MIN_DEFAULT)
            self.consul_ttl = CONSUL_TTL_MIN_DEFAULT
            self.session_id = self.store.session_create(self.session_name, self.consul_ttl, behavior="delete",
                                                        node=node)
        log.info("created session %s (consul ttl %ds)", self.session_id[:8], self.consul_ttl)
        self._save_session(self.session_id)
        return self.session_id

    def ask(self, commit_at: int = 0, on_written: Callable[[], None] | None = None,
            next_key: str = "") -> Publication:
        """Have the record written by the registration thread now; the caller never waits.

        For writes that order a protocol (a key rotation's staging and commit): the caller
        looks at the Publication on a later pass. A newer request replaces one not started."""
        pub = Publication(commit_at, on_written, next_key)
        with self._ask_lock:
            old, self._asked = self._asked, pub
        if old is not None:
            old.done.set()  # replaced before it was written: not ok
        self.republish.set()
        return pub

    def publish(self) -> None:
        with self._ask_lock:
            pub, self._asked = self._asked, None
        if pub is not None and pub.commit_at and time.monotonic() - pub.asked_at > COMMIT_START_WITHIN_S:
            log.warning("rotation commit not written: the registration thread came to it %.1f s late",
                        time.monotonic() - pub.asked_at)
            self._answer(pub, False)
            pub = None
        try:
            with self._publishing:  # the record is built inside: a write never undoes a newer one
                carried = self._publish(pub.commit_at if pub is not None else 0, pub.next_key if pub is not None else "")
                if pub is not None and carried and pub.on_written is not None:
                    pub.on_written()
        except BaseException:
            if pub is not None:
                self._answer(pub, False)
            raise
        if pub is not None:
            self._answer(pub, carried)

    def _answer(self, pub: Publication, ok: bool) -> None:
        pub.ok = ok
        pub.done.set()
        self.on_published()

    def _publish(self, commit_at: int = 0, next_key: str = "") -> bool:
        """Write the record; True unless a commit was asked for a next key it no longer holds."""
        session = self.ensure_session()
        rec = self.record()
        carried = not commit_at
        if commit_at and rec.next_public_key and rec.next_public_key == next_key:
            rec = replace(rec, switch_at=commit_at)  # the commit's own write (for the key it was decided for)
            carried = True
        if self._written == (session, rec):
            return carried  # Consul has it already (the same record, under the same session)
        unsigned = rec
        if self.identity is not None:
            rec = sign_record(rec, self.identity)
        key = layout.node_key(self.cfg.cluster, self.cfg.node)
        # One try: the loop tries again at once, and renews the session between two tries (the
        # store's own retries held this thread 7 s on a stalled Consul: the session lapsed).
        if not self.store.put(key, rec.to_json(), acquire=session, retry=False):
            item = self.store.get(key)
            holder = item.session[:8] if item and item.session else "?"
            raise AgentError(f"{key} is held by another session ({holder}): is another agent running as {self.cfg.node}?")
        self._written = (session, unsigned)
        self._recent.append((time.monotonic(), unsigned))
        self.metrics.registrations_total.inc()
        log.info("published %s (endpoint %s, pod CIDR %s)", key, rec.endpoint, rec.pod_cidr)
        return carried

    def wrote_recently(self, rec: NodeRecord, within_s: float = 3.0) -> bool:
        """`rec` is a record this thread wrote within `within_s` (a watch that shows it while a
        newer one is on its way is behind, not overwritten)."""
        now = time.monotonic()
        return any(now - t <= within_s and r == rec for t, r in self._recent)

    def forget_written(self) -> None:
        """Consul's copy of the record is not what this thread last wrote (gone, overwritten):
        the next publication writes it whatever it holds."""
        self._written = None

    @property
    def _interval(self) -> float:
        """Between two renewals of the session."""
        return max(0.5, self.consul_ttl / 3)

    def _short_timeouts(self) -> None:
        # A request of this thread stuck longer than a renewal interval (a partitioned link) is
        # worth less than a new one once the link heals: time out then, and try again.
        if hasattr(self.store, "set_thread_timeout"):
            self.store.set_thread_timeout(min(self.store.options.timeout, max(1.0, self._interval)))

    def keep_previous(self, until: threading.Event) -> None:
        """Until `until` is set (the agent is set up) or the agent stops, renew the session this
        node's previous run wrote down, if any; `loop` then adopts it as it finds the record
        under it. Returns only then: nothing is published before the record can be built.

        Run first thing at start: the restarted agent's bootstrap can wait seconds for a slow
        Consul, and its start alone took over 3 s on a busy host, while Consul drops the
        session session_ttl after its last renewal; with it, the record and every peer's tunnel
        to this node. Renewing a session id of our own state dir takes nothing from anyone: a
        record held by another session stays that session's."""
        saved = self._saved_session()
        if saved:
            self._short_timeouts()
        renewed, next_at = False, 0.0
        while not until.is_set() and not self.stop.is_set():
            if saved and time.monotonic() >= next_at:
                try:
                    self.store.session_renew(saved, retry=False)
                    if not renewed:
                        log.info("renewing session %s of a previous run while starting", saved[:8])
                    renewed, next_at = True, time.monotonic() + self._interval
                except SessionExpired:
                    saved = None  # gone already: the loop registers anew
                except ConsulError as e:
                    log.debug("renewing session %s of a previous run: %s", saved[:8], e)
                    next_at = time.monotonic() + 0.2
            until.wait(0.05)

    def loop(self) -> None:
        delay = 0.2
        published = False
        interval = self._interval
        self._short_timeouts()
        # Renewals are due by the clock, whatever else the loop does: a rotation publishes the
        # record again every second or so, and a record's write is no renewal (`acquire` does
        # not touch the TTL). Publishing instead of renewing let sessions lapse right after a
        # rotation in a 30-node lab (Consul drops a session 2 x TTL after its last renewal).
        session, renew_at = None, 0.0
        while not self.stop.is_set():
            # Tries are `delay` apart from start to start: one that failed at once (Consul
            # refused) waits it out, one that timed out (a SYN lost while partitioned) is made
            # again at once. A renewal begun just before a partition healed timed out 1 s later
            # and the next began 0.67 s after that: 1.3-1.4 s from the heal to the record back.
            tried_at = time.monotonic()
            try:
                if self.reload_identity():
                    self.forget_written()  # (signed again with the new certificate)
                    self.republish.set()
                if not published or self.republish.is_set():
                    self.republish.clear()
                    self.publish()
                    published = True
                if self.session_id != session:  # a new session: as good as renewed now
                    session, renew_at = self.session_id, time.monotonic() + interval
                elif time.monotonic() >= renew_at:
                    assert self.session_id
                    # No retries inside: one stuck through a partition (5 s timeout a try) held
                    # the renewal ~10 s past the heal; the loop retries at once with backoff.
                    self.store.session_renew(self.session_id, retry=False)
                    self.metrics.session_renewals_total.inc()
                    renew_at = time.monotonic() + interval
                delay = 0.2
                self.republish.wait(max(0.0, renew_at - time.monotonic()))
                continue
            except SessionExpired:
                log.warning("session %s expired; registering again", (self.session_id or "?")[:8])
                self.session_id, published = None, False
                delay = 0.0
            except (ConsulError, AgentError) as e:
                log.warning("registration: %s (retry in %.1fs)", e, self._wait(tried_at, delay))
                published = False if not isinstance(e, ConsulUnavailable) else published
                self.metrics.sync_errors_total.labels("register").inc()
            except Exception:  # noqa: BLE001 - a bug must not end the registration for good
                log.exception("registration failed unexpectedly (retry in %.1fs)", self._wait(tried_at, delay))
                published = False
                self.metrics.sync_errors_total.labels("register").inc()
            if self.stop.wait(self._wait(tried_at, delay)):
                return
            # Never longer between tries than between renewals: after a partition heals the
            # record must be back before the session's TTL would matter (peers drop it then).
            delay = min(BACKOFF_MAX_S, interval, max(0.2, delay * 2))

    @staticmethod
    def _wait(tried_at: float, delay: float) -> float:
        """What is left of `delay` counted from the start of the try at `tried_at`."""
        return max(0.0, tried_at + delay - time.monotonic())

    def remove(self) -> None:
        """End the session: behavior=delete removes the record, so peers drop this node at once.

        Call it after the loop has ended (so no new session can appear behind it).
        """
        session, self.session_id = self.session_id, None
        if not session:
            return
        try:
            self.store.session_destroy(session)
            self._session_file.unlink(missing_ok=True)
            log.info("removed the node record (session %s destroyed)", session[:8])
        except ConsulError as e:
            log.warning("could not remove the node record (%s); it expires with the session TTL", e)
