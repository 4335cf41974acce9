"""Key rotation in the agent: this node's own rotations, and its part in its peers' rotations.

The rotating side follows keys.rotation's state machine: a request in `rotations/<node>` ->
the next key in `<key_file>.next` (0600) and announced in the node's record (`next_public_key`)
-> every live peer ready (and no node before it waiting to commit) -> the commit: `switch_at`
written into the record (synchronously: the write is the point of no return) -> at `switch_at`
the device takes the new key, the key file is replaced by it (atomically), the record carries
it -> done once every live peer made a handshake on it. The peer side: on seeing an announced
next key, stage it on the device (a locked second entry: agent.staged) and write that it is
ready; the planner replaces the node's key once the node's first handshake with it shows on
that entry (never by the clock: keys.rotation); right after, one packet to the node starts the
handshake at once (made again if the handshakes crossed: KICK_MS). There is no going back: the
key is taken only once the node proved it uses it.

Everything here runs in the agent's loop thread; its Consul writes (readiness, progress) go
through a writer thread (agent.kvwriter) so that no round trip delays a switch, except the two
record publications that order the protocol (staging, commit). Crash safety: the next key
file outlives a restart; a device that already holds the next key means the switch happened
(the key file is then promoted before anything else); a committed rotation switches after a
restart, however late; a staged one goes on waiting for its peers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from wiremesh.clustermesh import ConsulError, ConsulStore, InvalidRecord, NodeRecord, layout
from wiremesh.clustermesh import Rotation, RotationReady, rotation_value, sign_request
from wiremesh.keys import KeyMaterialError, NodeIdentity, PrivateKey, read_key_file, write_key_file
from wiremesh.keys import (
    COMMIT_LEAD_MS,
    SWITCH_DEFER_MS,
    commit_order,
    committed_step,
    staged_step,
    switch_time,
    switch_waits_for,
    switched_step,
)

from .kvwriter import SyncWriter, Writer
from .rotation_peer import PeerPart
from .nodestate import write_state_file

log = logging.getLogger("wiremesh.rotation")
HOLD_DUE_MS = 300  # a change due this recently is not done yet, or just was: no pass is held for a later one


def now_ms() -> int:
    return int(time.time() * 1000)


def _active(value: bytes) -> bool:
    """A stored rotation still under way (a scheduled request must not replace it)."""
    try:
        return Rotation.from_json(value).active
    except InvalidRecord:
        return False


class Rotator:
    def __init__(self, store: ConsulStore, cluster: str, node: str, key_file: Path,
                 clock: Callable[[], int] = now_ms, writer: Writer | None = None,
                 consul_up: Callable[[], bool] = lambda: True, identity: NodeIdentity | None = None) -> None:
        self.store = store
        self.identity = identity  # signs what this node writes: progress, its own requests, readiness
        self.consul_up = consul_up  # the agent's watch of its Consul answers
        self._consul_back_at = 0  # when Consul last came back (unix ms)
        self._consul_was_up = True
        self.writer: Writer = writer or SyncWriter(store)
        self.cluster, self.node = cluster, node
        self.key_file = key_file
        self.next_file = key_file.with_name(key_file.name + ".next")
        self.epoch_file = key_file.with_name(key_file.name + ".epoch")
        self.clock = clock
        # rotating side
        self.next_key: PrivateKey | None = None
        self.switch_at = 0  # committed switch time (0: not committed)
        self.staged_at = 0  # when this run staged (or found staged) the rotation
        self._ready_seen: dict[str, int] = {}  # peer -> when its readiness was first seen (unix ms)
        self.rotation: Rotation | None = None  # ours, as last written by us
        self.epoch = self._read_epoch()
        self.wake: int | None = None
        self.switched_before_stop = False
        self._me = f"{cluster}/{node}"
        self._committing = 0  # the switch time of a commit whose write is under way (0: none)
        self._due_since = 0  # when this node's switch was first due (unix ms; 0: not yet)
        self._defer_until = 0  # the switch held until then for earlier commits (switch_due)
        self._deferred_for: list[str] = []  # (logged once per change)
        self._scheduled: Rotation | None = None  # the last rotation rotate_every asked for
        self.resume_pending = False  # resume() could not read Consul: this node's commit unknown
        self._epoch_saved = True  # the epoch above is the one its file holds
        # After this node's switch, until its rotation ends: the record as committed (old key,
        # next key, switch time, old epoch). A peer that read the new key from the record before
        # the node's first handshake with it reached it would start its own, crossing the
        # node's (both rejected; wireguard-go tries again 5 s later): peers take the key from
        # the data plane (agent.staged), the record says it once every peer did (or failed to).
        self._held: tuple[str, str, int, int] | None = None  # (old key, new key, switch time, old epoch)
        # This node's part in the other nodes' rotations (agent.rotation_peer).
        self.peer = PeerPart(cluster, node, self.writer, identity, clock, self._wake_at)

    # --- start-up ----------------------------------------------------------------------------
    def recover(self, device_public_key: str | None) -> PrivateKey | None:
        """Before the device is configured: a next key file left by a run that was stopped.

        Returns the key the device must keep: the next one if the device already holds it (the
        switch happened; the key file is promoted now), else None (the current key file rules).
        """
        if not self.next_file.exists():
            return None
        try:
            nxt = read_key_file(self.next_file)
        except KeyMaterialError as e:
            log.error("%s; dropping it (the rotation will be abandoned)", e)
            self.next_file.unlink(missing_ok=True)
            return None
        if device_public_key == nxt.public_key().base64:
            os.replace(self.next_file, self.key_file)  # the switch happened before the stop
            self._write_epoch(self.epoch + 1)
            self.switched_before_stop = True  # its rotation record may still say "committed"
            log.info("the device already uses the next key: the switch happened before a restart")
            return nxt
        self.next_key = nxt
        return None

    def resume(self) -> None:
        """At start-up, before this node's record is published again: the switch time of a
        rotation left committed, so that the record goes on announcing it (the peers took or
        will take the new key at that time: the node switches, late if it must)."""
        if self.next_key is None:
            return
        self.staged_at = self.clock()
        nxt = self.next_key.public_key()
        try:
            # The record is what peers act on: a switch time in it is a commit, even when the
            # rotation's own progress ("committed") was not written before the stop.
            item = self.store.get(layout.node_key(self.cluster, self.node))
            rec = NodeRecord.from_json(item.value, item.key) if item is not None else None
            key = layout.rotation_key(self.cluster, self.node)
            item = self.store.get(key)
            own = Rotation.from_json(item.value, key) if item is not None else None
        except (ConsulError, InvalidRecord) as e:
            log.warning("rotation: this node's rotation not read at start-up (%s); the record waits for "
                        "the first snapshot", e)
            self.resume_pending = True  # no record written before adopt(): it could withdraw a commit
            return
        if rec is not None and rec.next_public_key == nxt.base64 and rec.switch_at:
            self.switch_at = rec.switch_at
        elif own is not None and own.state == "committed" and own.switch_at and own.next_fingerprint == nxt.fingerprint:
            self.switch_at = own.switch_at
        if self.switch_at:
            log.info("rotation: committed before a restart; switching at %d as announced", self.switch_at)

    def switch_due(self, unseen: Mapping[str, int] | None = None) -> bool:
        """This node's committed rotation has reached its switch time (drive() may switch now).

        `unseen`: other nodes whose commit this agent saw and whose switch it has not seen on
        the data plane yet (node id -> switch time). One committed before this node holds its
        switch until its own shows, SWITCH_DEFER_MS at most (keys.switch_waits_for)."""
        if self.next_key is None or not self.switch_at:
            return False
        now = self.clock()
        if now < self.switch_at:
            return False
        if not self._due_since:
            self._due_since = now
        unseen = unseen or {}
        # A node waited for once is waited for until its switch shows (or the bound): its switch
        # time may move later meanwhile (a commit retried after a write of unknown outcome), and
        # going at once on seeing that switched both together (cut 15 s at 30 nodes).
        waits = sorted(set(switch_waits_for(self._me, self.switch_at, unseen)) | (set(self._deferred_for) & set(unseen)))
        if waits and now < self._due_since + SWITCH_DEFER_MS:
            if self._deferred_for != waits:
                self._deferred_for = waits
                log.info("rotation %s: switch held for %s (committed before this node, its switch not seen "
                         "yet): two switches at once cannot reach each other", self.rotation.id if self.rotation else "?",
                         ", ".join(waits))
            self._defer_until = self._due_since + SWITCH_DEFER_MS
            return False
        self._defer_until = 0
        return True

    # --- what this node announces ------------------------------------------------------------
    @property
    def held(self) -> tuple[str, str, int, int] | None:
        """The record's key fields held as committed after this node's switch (see _held)."""
        return self._held

    def announce(self, rec: NodeRecord) -> NodeRecord:
        held = self._held
        if held is not None:  # switched, not ended: as committed (see _held)
            return replace(rec, public_key=held[0], next_public_key=held[1], switch_at=held[2], key_epoch=held[3])
        nxt = self.next_key.public_key().base64 if self.next_key is not None else ""
        if nxt == rec.public_key:  # switched, the next key not dropped yet: it is the current one
            nxt = ""
        at = self.switch_at  # (the commit's own write adds its time itself: agent.registration)
        return replace(rec, next_public_key=nxt, switch_at=at if nxt else 0, key_epoch=self.epoch)

    # --- the rotating side --------------------------------------------------------------------
    def drive(self, own: Rotation | None, live: set[str], ready: Mapping[str, RotationReady],
              handshakes: Callable[[], Mapping[str, float]], switch: Callable[[PrivateKey], bool | None],
              publish: Callable[[int], bool | None], republish: Callable[[], None],
              announced: Mapping[str, NodeRecord] | None = None) -> None:
        """One step of this node's rotation, if one is asked for or under way.

        `publish(commit_at)`: write this node's record now (with `commit_at`, the commit's switch
        time in it), without waiting: None while the write is under way (ask again on a later
        pass: the agent wakes for its answer), then True once Consul took it, False if not
        (staging and commit are ordered by it); `republish`: have it written soon. `announced`: other nodes'
        records (node id -> record), for the order of commits and their switch times."""
        now = self.clock()
        self.wake = None
        others = announced or {}
        if not self._epoch_saved:  # a full state dir refused it: again, until it is saved
            self._write_epoch(self.epoch)
        up = self.consul_up()
        if up and not self._consul_was_up:
            self._consul_back_at = now
        self._consul_was_up = up
        if own is None or not own.active:
            # (A committed rotation is never withdrawn: its peers switch at its time whatever.)
            if self.next_key is not None and own is not None and own.state == "abandoned" and not self.switch_at:
                self._drop_next(republish)
            return
        if self.rotation is None or self.rotation.id != own.id:
            self.rotation = own
            self._committing = 0  # a commit under way was for another rotation: never this one's
            if own.state == "committed" and own.switch_at and self.next_key is not None:
                self.switch_at = own.switch_at  # resumed after a restart
        if self.rotation.state == "requested":
            self._stage(now, publish, republish)
            return
        if self.rotation.state in ("staged", "committed") and (self.switched_before_stop or (
                self.next_key is None and self._key_file_is(self.rotation.next_fingerprint))):
            # Stopped between the device's switch and writing it down (the next key file already
            # promoted, or promoted by recover()): the switch is done.
            self.switched_before_stop = False
            self.switch_at = 0
            if self.rotation.epoch_to > self.epoch:  # stopped before the epoch was written down
                self._write_epoch(self.rotation.epoch_to)
            log.info("rotation %s: switched before the restart; confirming", self.rotation.id)
            self._write(replace(self.rotation, state="switched", updated_at=now,
                                switch_at=self.rotation.switch_at or now))
            republish()
            self.wake = now + 100
            return
        if self.rotation.state in ("staged", "committed") and self.next_key is None:
            # The next key was lost (its file removed): nothing can be switched to.
            self._end("abandoned", "the next key file is gone", (), republish)
            return
        if self.rotation.state == "staged" and (self._committing or not self.switch_at):
            self._staged(now, live, ready, others, publish, republish)
        elif self.rotation.state in ("staged", "committed"):
            step = committed_step(now, self.switch_at)
            if step.action == "switch" and self._defer_until > now:
                # (A proof of the awaited switch wakes the loop at once; the handshake on the key
                # taken does not: looked for every 50 ms.)
                self.wake = min(self._defer_until, now + 50)
            elif step.action == "switch":
                self._switch(now, switch, republish)
            else:
                self.wake = step.wake_at
        elif self.rotation.state == "switched":
            hs = handshakes()
            confirmed = {p for p in live if hs.get(p, 0.0) * 1000 >= self.rotation.switch_at - 1000}
            if not up and live - confirmed:  # peers that missed the commit learn of it only from Consul
                self.wake = now + 500
                return
            step = switched_step(now, max(self.rotation.switch_at, self._consul_back_at), live, confirmed)
            if step.action == "done":
                self._end("done", "", (), republish, confirmed=tuple(sorted(confirmed)))
            elif step.action == "fail":
                self._end("failed", f"no handshake on the new key from {', '.join(step.lagging)}", step.lagging,
                          republish, confirmed=tuple(sorted(confirmed)))
            else:
                if tuple(sorted(confirmed)) != self.rotation.confirmed:
                    self._write(replace(self.rotation, confirmed=tuple(sorted(confirmed)), updated_at=now))
                self.wake = step.wake_at

    def _staged(self, now: int, live: set[str], ready: Mapping[str, RotationReady],
                others: Mapping[str, NodeRecord], publish: Callable[[int], bool | None],
                republish: Callable[[], None]) -> None:
        assert self.rotation is not None and self.next_key is not None
        if self._committing:  # the commit's write is under way: nothing is decided again before it ends
            self._commit(now, self._committing, len(live), publish, republish)
            return
        nxt = self.next_key.public_key().base64
        ok = {p for p, r in ready.items() if r.next_public_key == nxt}
        ahead = commit_order(self._me, [n for n, r in others.items() if r.next_public_key and not r.switch_at])
        if not self.staged_at:
            self.staged_at = now
        for p in ok & live:
            self._ready_seen.setdefault(p, now)
        step = staged_step(now, self.staged_at, live, ok, ahead)
        if step.action == "abandon":
            what = "peers not ready" if live - ok else "nodes before it never committed"
            self._end("abandoned", f"{what}: {', '.join(step.lagging)}", step.lagging, republish)
            return
        if step.action == "wait":  # (progress is not written per peer: every write wakes every agent)
            self.wake = step.wake_at
            return
        # Every live peer is ready: commit. Once the record with the switch time is written,
        # peers may act on it: the node switches at that time whatever happens next.
        at = switch_time(now + COMMIT_LEAD_MS, [r.switch_at for r in others.values() if r.next_public_key and r.switch_at])
        self._committing = at
        self._commit(now, at, len(live), publish, republish)

    def _commit(self, now: int, at: int, live: int, publish: Callable[[int], bool | None],
                republish: Callable[[], None]) -> None:
        assert self.rotation is not None
        committed = publish(at)
        if committed is None:
            self.wake = now + 1000  # (the answer wakes the loop; this only if it never comes)
            return
        self._committing = 0
        if not committed:
            log.warning("rotation %s: the switch time could not be written; trying again", self.rotation.id)
            republish()  # withdraw it, in case it was written after all
            self.wake = now + 1000
            return
        self.switch_at = at
        log.info("rotation %s: every live peer ready (%d; %s); switching at %+d ms", self.rotation.id, live,
                 self._readiness_times(), self.switch_at - self.clock())
        self._write(replace(self.rotation, state="committed", switch_at=self.switch_at, lagging=(), updated_at=now))
        self.wake = self.switch_at

    def _readiness_times(self) -> str:
        """When peers' readiness was seen, after the announcement: where a slow commit waited."""
        if not self._ready_seen or not self.staged_at:
            return "ready times unknown"
        times = sorted((t - self.staged_at, p) for p, t in self._ready_seen.items())
        mid, (last, who) = times[len(times) // 2][0], times[-1]
        return f"ready after {mid} ms (median), the last {last} ms ({who})"

    def committed(self, at: int, next_public_key: str) -> None:
        """The commit's write with switch time `at` for `next_public_key` is in Consul (called by
        the writing thread, before any other write of the record starts): every later write
        announces it."""
        if self.next_key is not None and self.next_key.public_key().base64 == next_public_key:
            self.switch_at = at

    def publication_tag(self) -> tuple[str, str]:
        """What a record write asked for belongs to: this rotation and its next key (an answer
        for another is never taken as this one's)."""
        nxt = self.next_key.public_key().base64 if self.next_key is not None else ""
        return (self.rotation.id if self.rotation is not None else "", nxt)

    def adopt(self, own: NodeRecord | None) -> None:
        """This node's record as Consul has it: a commit announced there before a restart that
        could not read it (resume) is this node's commit (it switches at that time)."""
        if not self.resume_pending:
            return
        self.resume_pending = False
        if own is not None and self.next_key is not None and not self.switch_at and own.switch_at and \
                own.next_public_key == self.next_key.public_key().base64:
            self.switch_at = own.switch_at
            log.info("rotation: committed before a restart; switching at %d as announced", self.switch_at)

    def _stage(self, now: int, publish: Callable[[int], bool | None], republish: Callable[[], None]) -> None:
        assert self.rotation is not None
        if self.next_key is None:
            made = PrivateKey.generate()
            try:
                write_key_file(self.next_file, made)  # 0600, atomic; the current key stays
            except KeyMaterialError as e:  # (a full or read-only state dir): the rotation says why
                self._end("failed", f"the next key could not be saved ({e})", (), republish)
                return
            self.next_key = made
        self.switch_at, self.staged_at = 0, now
        nxt = self.next_key.public_key()
        # The record first: a readiness word this node writes later is then ordered after it.
        done = publish(0)
        if not done:
            self.wake = now + 1000  # under way (its answer wakes the loop) or failed: again then
            return
        self._ready_seen = {}
        log.info("rotation %s: next key %s announced (%d ms after the request)", self.rotation.id, nxt.fingerprint,
                 now - self.rotation.requested_at if self.rotation.requested_at else -1)
        self._write(replace(self.rotation, state="staged", switch_at=0, epoch_from=self.epoch,
                            epoch_to=self.epoch + 1, next_fingerprint=nxt.fingerprint, updated_at=now))
        self.wake = now + 100

    def _switch(self, now: int, switch: Callable[[PrivateKey], bool | None], republish: Callable[[], None]) -> None:
        assert self.rotation is not None and self.next_key is not None
        key, at = self.next_key, self.switch_at
        # The record as committed, before the agent takes the new key as its own (`switch`):
        # the registration thread builds the record at any moment, and in between it said the
        # new key as current *and* next, a record every peer refused (the node's tunnels cut
        # for 2 s, seen at 30 nodes). The held record is the commit's, so setting it early
        # changes nothing on the wire.
        try:
            old = read_key_file(self.key_file).public_key().base64
            self._held = (old, key.public_key().base64, at, self.epoch)
        except (KeyMaterialError, OSError):
            self._held = None  # (the record then says the new key at once)
        if switch(key) is False:  # the device does not hold it yet (planned a moment before the time)
            self._held = None
            self.wake = now + 1
            return
        self.peer.switched(now)
        os.replace(self.next_file, self.key_file)
        self._write_epoch(self.epoch + 1)
        self.next_key, self.switch_at = None, 0
        self._due_since, self._defer_until, self._deferred_for = 0, 0, []
        log.info("rotation %s: switched to %s (epoch %d, %d ms after the switch time)", self.rotation.id,
                 key.public_key().fingerprint, self.epoch, self.clock() - at)
        self._write(replace(self.rotation, state="switched", switch_at=at, updated_at=now))
        republish()
        self.wake = now + 100

    def _end(self, state: str, error: str, lagging: tuple[str, ...], republish: Callable[[], None],
             confirmed: tuple[str, ...] = ()) -> None:
        assert self.rotation is not None
        self._committing = 0
        if self._held is not None:
            self._held = None
            republish()  # the record says the new key now
        if state == "abandoned":
            self._drop_next(republish)
        (log.info if state == "done" else log.warning)("rotation %s: %s%s", self.rotation.id, state,
                                                       f" ({error})" if error else "")
        self._write(replace(self.rotation, state=state, error=error, lagging=lagging,
                            confirmed=confirmed or self.rotation.confirmed, updated_at=self.clock()))

    def _drop_next(self, republish: Callable[[], None]) -> None:
        self.next_key, self.switch_at, self.staged_at, self._committing = None, 0, 0, 0
        self._due_since, self._defer_until, self._deferred_for = 0, 0, []
        self.next_file.unlink(missing_ok=True)
        republish()

    def _write(self, rot: Rotation) -> None:
        """Progress, written by the writer thread (retried there until Consul takes it)."""
        self.rotation = rot
        self.writer.put(layout.rotation_key(self.cluster, self.node), rotation_value(rot, self.identity))

    def _key_file_is(self, fingerprint: str) -> bool:
        """The current key file holds the key of this fingerprint (the switch promoted it)."""
        try:
            return bool(fingerprint) and read_key_file(self.key_file).public_key().fingerprint == fingerprint
        except (KeyMaterialError, OSError):
            return False

    def raise_epoch(self, epoch: int) -> bool:
        """Announce `epoch` from now on if it is higher (this node's key changed outside a
        rotation: its record at the old epoch is refused); True if it was raised."""
        if epoch <= self.epoch or self.next_key is not None or self._held is not None:
            return False
        log.warning("key epoch %d was already seen with another key of this node (a key changed outside a "
                    "rotation); announcing epoch %d", self.epoch, epoch)
        self._write_epoch(epoch)
        return True

    def _read_epoch(self) -> int:
        try:
            return max(0, int(self.epoch_file.read_text().strip()))
        except (OSError, ValueError):
            return 0

    def _write_epoch(self, epoch: int) -> None:
        """The new epoch, in memory at once and in its file if the state dir takes it (a full
        disk is logged once; the record announces the epoch from memory)."""
        self.epoch = epoch
        self._epoch_saved = write_state_file(self.epoch_file, f"{epoch}\n")

    # --- scheduled rotation ---------------------------------------------------------------------
    def schedule(self, every_s: int, nodes: list[str], rotations: Mapping[str, Rotation], key_age_from: int) -> None:
        """Ask for this node's own rotation when the cluster's `rotate_every` says so.

        Staggered: each node's turn comes at its own phase of the period (its rank among the
        cluster's nodes), and never while another node of the cluster is rotating, so that no
        two neighbours rotate at once. `key_age_from`: when the current key came (unix ms).
        """
        if every_s <= 0 or self.node not in nodes:
            return
        now, period = self.clock(), every_s * 1000
        if any(r.active for r in rotations.values()):
            return
        mine = rotations.get(self.node)
        since = max(mine.updated_at if mine else 0, key_age_from) or now
        phase = period * sorted(nodes).index(self.node) // max(1, len(nodes))
        earliest = since + period  # at least a period after the key came, then at the node's phase
        due = earliest + (phase - earliest) % period
        if now < due:
            self._wake_at(due)
            return
        if self._scheduled is not None and self._scheduled.updated_at >= since:
            return  # asked already: the writer thread writes it (Consul may be slow or away)
        rot = self._scheduled = Rotation.new(self.node, now)
        if self.identity is not None:  # the node's own request: signed by it (clustermesh.control)
            rot = sign_request(rot, self.cluster, self.identity.key)
        # By the writer thread, only if nobody wrote a rotation meanwhile: cas 0 (the key must not
        # exist), or the ModifyIndex of the ended one it reads just before (never over an active one).
        self.writer.put(layout.rotation_key(self.cluster, self.node), rotation_value(rot, self.identity),
                        cas=0 if mine is None else None, unless=_active)
        log.info("rotation %s: asked by the cluster's rotate_every (%d s)", rot.id, every_s)

    def hold_until(self, quiet_ms: int) -> int | None:
        """Until when (unix ms) the loop should hold a pass: this node's switch time, if it comes
        within `quiet_ms` (the pass then sets the key first, on the dot); None if it does not, or
        if it is due now (the pass does it)."""
        if self.next_key is None or not self.switch_at:
            return None
        now = self.clock()
        if now - HOLD_DUE_MS <= self.switch_at <= now:
            return None
        return self.switch_at if now < self.switch_at <= now + quiet_ms else None

    def _wake_at(self, t: int) -> None:
        if t > self.clock() and (self.wake is None or t < self.wake):
            self.wake = t
