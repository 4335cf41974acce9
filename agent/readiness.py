"""Peers' readiness for this node's key rotation, watched only while the rotation is staged.

Readiness words live under `ready/<cluster>/` of each cluster (layout.ready_prefix), written by
that cluster's nodes; a rotating node watches that prefix in its own and in every member
cluster's datacenter, and stops when its rotation has committed or ended. Nodes that are not
rotating watch nothing here, so a rotation's words (one per peer) wake only the node they are for.

In a cluster that requires signed records, a peer's word counts only if the peer's certified
identity signed it (clustermesh.control.verify_ready, against the certificate in the peer's
accepted record); a refused word is logged once, counted, and the peer's last good word stays.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field

from wiremesh.clustermesh import ConsulError, ConsulStore, InvalidRecord, NodeRecord, layout
from wiremesh.clustermesh import RotationReady, parse_ready, verify_ready

from .metrics import AgentMetrics, reject_label

log = logging.getLogger("wiremesh.rotation")
WATCH_WAIT_S = 30
BACKOFF_MAX_S = 5.0


@dataclass(slots=True)
class _Watch:
    cluster: str
    dc: str | None
    stop: threading.Event = field(default_factory=threading.Event)
    ready: dict[str, RotationReady] = field(default_factory=dict)


class ReadinessWatch:
    def __init__(self, store: ConsulStore, me: str, agent_stop: threading.Event, wake: Callable[[], None],
                 follow: Callable[[str, Callable[[], object]], object], metrics: AgentMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.me = me  # "cluster/node"
        self.agent_stop = agent_stop
        self.wake = wake
        self.follow_thread = follow  # starts a follower thread (agent.supervisor)
        self._lock = threading.Lock()
        self._watches: dict[str, _Watch] = {}
        self._logged: dict[str, str] = {}
        self._good: dict[str, RotationReady] = {}  # peer -> its last word that passed the checks
        self._checked: dict[str, tuple[object, ...]] = {}  # peer -> the word and certificate that passed

    def follow(self, clusters: Mapping[str, str | None]) -> None:
        """Watch the readiness prefix of these clusters (name -> datacenter, None: the local
        one); {} ends every watch. Called by the loop on every pass: idempotent."""
        with self._lock:
            for name in [n for n, w in self._watches.items() if n not in clusters or w.dc != clusters[n]]:
                self._watches.pop(name).stop.set()
            for name, dc in clusters.items():
                if name not in self._watches:
                    w = self._watches[name] = _Watch(name, dc)
                    # A stopped watch may still sit in its blocking query (up to WATCH_WAIT_S):
                    # `follow` keys each one by a generation, so its successor never collides.
                    self.follow_thread(f"ready-{name}", functools.partial(self._loop, w))

    def view(self, records: Mapping[str, NodeRecord] | None = None,
             signed: Container[str] = ()) -> dict[str, RotationReady]:
        """Every peer's ("cluster/node") word for this node's rotation, as last seen. A peer of a
        cluster in `signed` (clusters requiring signed records) counts only with a word its
        certified identity signed (`records`: peers' accepted records, by "cluster/node")."""
        with self._lock:
            words = {p: r for w in self._watches.values() for p, r in w.ready.items()}
        out: dict[str, RotationReady] = {}
        for peer, word in words.items():
            if peer.partition("/")[0] not in signed:
                out[peer] = word
                continue
            rec = (records or {}).get(peer)
            seen = (word.next_public_key, word.switch_at, word.signature, rec.certificate if rec else None)
            try:
                if self._checked.get(peer) != seen:  # (Ed25519: ~100 us a check, and views come every pass)
                    verify_ready(word, peer, self.me, rec,
                                 layout.rotation_ready_key(*peer.split("/", 1), *self.me.split("/", 1)))
                    self._checked[peer] = seen
            except InvalidRecord as e:
                self._refused(peer, e)
                if peer in self._good:
                    out[peer] = self._good[peer]
                continue
            out[peer] = self._good[peer] = word
        for gone in [p for p in self._good if p not in words]:
            del self._good[gone]
            self._checked.pop(gone, None)
        return out

    def _refused(self, peer: str, e: InvalidRecord) -> None:
        key, reason = e.key or peer, f"{e.field}: {e.reason}"
        if self._logged.get(key) != reason:
            self._logged[key] = reason
            kept = "; its last good word stays" if peer in self._good else ""
            log.warning("skipping invalid readiness word %s: %s%s", key, reason, kept)
            if self.metrics is not None:
                self.metrics.invalid_records_total.labels(reject_label(reason)).inc()

    def close(self) -> None:
        self.follow({})

    def _loop(self, w: _Watch) -> None:
        delay = 0.2
        prefix = layout.ready_prefix(w.cluster)
        while not (w.stop.is_set() or self.agent_stop.is_set()):
            try:
                for _index, items in self.store.watch(prefix, _Either(w.stop, self.agent_stop), wait_s=WATCH_WAIT_S,
                                                      dc=w.dc):
                    ready, refused = parse_ready(w.cluster, {k: v.value for k, v in items.items()}, self.me)
                    for key, reason in refused:
                        if self._logged.get(key) != reason:
                            self._logged[key] = reason
                            log.warning("skipping invalid readiness word %s: %s", key, reason)
                    with self._lock:
                        changed = ready != w.ready
                        w.ready = ready
                    if changed:
                        self.wake()
                    delay = 0.2
            except ConsulError as e:  # the last words seen stay; a rotation waits or times out
                log.debug("readiness watch of %s: %s", w.cluster, e)
            except Exception:  # noqa: BLE001 - one bad answer: this watch backs off, the agent goes on
                log.warning("readiness watch of %s failed unexpectedly; retrying", w.cluster, exc_info=True)
            w.stop.wait(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)


class _Either:
    """Set when either event is (what store.watch checks between its queries)."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.a.wait(timeout) or self.b.is_set()
