"""The device's peers, reconciled as one batch target: one device update per pass.

Peers are keyed by node ("cluster/node"); the public key is an attribute that may change. A
pass computes the smallest diff (tunnels.peer_changes) against what this process last programmed
(O(changes)), or against the device itself on the first pass, on full passes, when pruning
starts or what it must keep changes, and when a failed peer is retried; then applies every
change in one update (batch), and only if the device refuses it, one by one so the good ones
still land. Each peer has a status and its own backoff in the shared StatusTable.

A key that a node's new key replaced (a rotation) stays on the device without allowed IPs for
LINGER_S: removing it in the same update dropped what it still held (queued, being encrypted).

A rotating node's announced next key is a second entry, locked (PeerConfig.staged), named
"<node>#next" and kept in the status table as its own kind (STAGED): not one of the node's peers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from wiremesh.tunnels import PeerChange, PeerConfig, PeerStatus, TunnelError, WireGuardDevice, as_status, peer_changes

from .objects import StatusTable

log = logging.getLogger("wiremesh.agent.reconciler")

PEER = "peer"
STAGED = "staged-peer"
STAGED_SUFFIX = "#next"
LINGER_S = 1.0  # a replaced peer stays this long without allowed IPs before it is removed
_PEERS = frozenset({PEER, STAGED})


def _kind(name: str) -> str:
    return STAGED if name.endswith(STAGED_SUFFIX) else PEER


def _twin(name: str) -> str:
    """The node's peer for its staged entry and the other way round (they may share a key for a
    moment: the staged entry becomes the node's peer in the same pass)."""
    return name[:-len(STAGED_SUFFIX)] if name.endswith(STAGED_SUFFIX) else name + STAGED_SUFFIX


@dataclass(slots=True)
class PeerCounts:
    added: int = 0
    updated: int = 0
    removed: int = 0
    errors: int = 0
    programmed: int = 0
    failed: list[str] = field(default_factory=list)
    replaced: list[tuple[str, str]] = field(default_factory=list)  # (node, new key): key changes applied
    changes: list[str] = field(default_factory=list)  # "+node", "~node", "-node" (or "-key8...") as applied
    new: list[str] = field(default_factory=list)  # nodes whose peer was added (not there before)


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
        key = self[node].public_key
        twin = self.get(_twin(node))
        if twin is None or twin.public_key != key:
            self.status.pop(key, None)
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


class PeerTarget:
    """The WireGuard device's peers: `sync` makes them the desired ones, in one batch."""

    kind = PEER

    def __init__(self, device: WireGuardDevice, table: StatusTable, clock: Callable[[], float]) -> None:
        self.device = device
        self.table = table
        self._clock = clock
        self.applied = Applied()  # node -> the peer as this process last programmed it
        self._device_read = False  # peers compared against the device itself at least once
        self._pruning: object = None  # what pruning may touch, as of the last device read
        # Old keys of replaced peers (a rotation), left on the device without allowed IPs: the
        # packets they still hold (queued, being encrypted) go out; removed at this time.
        self._lingering: dict[str, float] = {}

    def forget(self) -> None:
        """Compare against the device itself next time (it was re-created)."""
        self._device_read = False
        self.applied.clear()

    def next_retry(self) -> float | None:
        """When a lingering key is due to go, if any lingers."""
        return min(self._lingering.values(), default=None)

    def sync(self, peers: Mapping[str, PeerConfig], kept: Callable[[str], bool], pruning: object, *,
             prune: bool, full: bool, now: float, staged: Mapping[str, PeerConfig] | None = None) -> PeerCounts:
        """Make the device's peers `peers` (by node) and `staged` (rotating nodes' next keys, by
        node); with `prune`, remove the others except those with an allowed IP `kept` protects.
        `pruning`: what decides what pruning may touch (the device is read again when it changes)."""
        res = PeerCounts()
        staged_named = {f"{n}{STAGED_SUFFIX}": c for n, c in (staged or {}).items()}
        desired = {**peers, **staged_named} if staged_named else peers
        actual: dict[str, PeerStatus]
        # The device is read on full passes and whenever memory cannot tell the whole truth: the
        # first pass, when pruning starts or what it must keep changes (peers this process never
        # programmed may now go), and when a failed peer is retried (its state is unknown).
        if full or not self._device_read or pruning != self._pruning or self.table.pending_retry(_PEERS, now):
            self._pruning = pruning
            actual = dict(self.device.show().peers)
            self._device_read = True
        else:
            actual = self.applied.status
        changes = [c for c in peer_changes(actual, desired, prune=prune, applied=self.applied)
                   if not (c.remove and any(kept(ip) for ip in actual[c.public_key].allowed_ips))
                   and not (c.remove and c.public_key in self._lingering)]
        wanted = {p.public_key for p in desired.values()}
        for key, at in list(self._lingering.items()):
            if key in wanted:
                del self._lingering[key]  # desired again (a rotation went back): it stays
            elif at <= now:
                changes.append(PeerChange(public_key=key, remove=True))
        self.table.want(PEER, peers)
        self.table.want(STAGED, staged_named)
        for node in [n for n in self.applied if n not in desired]:
            if any(c.remove and c.name == node for c in changes):
                continue
            # Not desired and already gone, or a staged entry (its key may now be the node's):
            # forgotten. Kept on the device (pruning held): remembered as it is there, so that
            # the node coming back as it was (a remote cluster's Consul back without its
            # records for a moment) changes nothing on the device.
            if _kind(node) == STAGED or self.applied[node].public_key not in actual:
                del self.applied[node]
        ready = [c for c in changes if c.remove or self.table.due(_kind(c.name), c.name, now)]
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
        for node, want in desired.items():
            if node not in changed and want.public_key in present:
                if self.applied.get(node) != want:
                    self.applied[node] = want
                self.table.done(_kind(node), node)
        res.programmed = self.table.count(PEER, "done")
        return res

    def _done(self, changes: list[PeerChange], desired: Mapping[str, PeerConfig], res: PeerCounts) -> None:
        for ch in changes:
            res.changes.append(("-" if ch.remove else "~" if ch.update_only or ch.replaces or ch.recreate else "+")
                               + (ch.name or ch.public_key[:8] + "..."))
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
            kind = _kind(ch.name)
            if kind == STAGED:
                pass  # (not one of the node's peers: not counted)
            elif ch.update_only or ch.replaces:
                res.updated += 1  # a key change is an update of the node's peer
            else:
                res.added += 1
                res.new.append(ch.name)
            self.applied[ch.name] = desired[ch.name]
            self.table.done(kind, ch.name)

    def _failed(self, ch: PeerChange, e: TunnelError, now: float, res: PeerCounts) -> None:
        res.errors += 1
        name = ch.name or ch.public_key[:8]
        res.failed.append(f"{name}: {e}")
        if ch.remove:
            log.warning("removing peer %s failed: %s", name, e)  # retried on the next full pass
            return
        self.applied.pop(ch.name, None)  # unknown state: compare against the device next time
        self._device_read = False
        delay = self.table.failed(_kind(ch.name), ch.name, e, now)
        st = self.table.get(_kind(ch.name), ch.name)
        log.warning("programming peer %s failed (attempt %d, retry in %.1fs): %s", name,
                    st.attempts if st else 1, delay, e)
