"""A node's part in its peers' key rotations (the rotating side is agent.rotation.Rotator).

For every next key a peer announces, this node stages it (the planner: a locked second entry,
agent.staged) and writes that it is ready, signed by its identity (`take_part`); when the
planner takes the key on the peer's proof, this node watches for the handshake on it (`took`),
makes the entry again once if the two handshakes crossed (`kicks_due`), and stops watching once
one came or PEER_WATCH_MS passed (`check_taken`): a key is never given back.

Runs in the agent's loop thread; readiness words go through the writer thread (agent.kvwriter).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from wiremesh.clustermesh import NodeRecord, RotationReady, layout, ready_value
from wiremesh.keys import PEER_WATCH_MS, NodeIdentity

from .kvwriter import Writer

log = logging.getLogger("wiremesh.rotation")

# A peer whose new key got no handshake this long after it was taken, although something came
# from the node on it, is made again on the device (once): the node's and this peer's handshake
# initiations crossed (each answers the other's and rejects the answer to its own), and
# wireguard-go would try again only after 5 s. A fresh peer entry initiates at once. With nothing
# received, it waits KICK_IDLE_MS (a loaded host's handshake may take that long): making the
# entry again drops what it holds queued.
KICK_MS = 150
KICK_IDLE_MS = 1000


class PeerPart:
    def __init__(self, cluster: str, node: str, writer: Writer, identity: NodeIdentity | None,
                 clock: Callable[[], int], wake_at: Callable[[int], None]) -> None:
        """`wake_at(t)`: have the loop run a pass at `t` (unix ms) at the latest."""
        self.cluster, self.node, self._me = cluster, node, f"{cluster}/{node}"
        self.writer, self.identity = writer, identity
        self.clock = clock
        self._wake_at = wake_at
        self.ready_sent: dict[str, str] = {}  # rotating node id -> the next key we said we are ready for
        self.taken: dict[str, tuple[str, int]] = {}  # node id -> (new key, when we took it, ms)
        self._kicked: set[str] = set()  # taken peers already made again (KICK_MS)
        self._switched_at = 0  # when this node last switched its own key (ms)

    def take_part(self, announced: Mapping[str, NodeRecord]) -> None:
        """Say we are ready for every announced next key (node id -> record); drop stale words."""
        for nid, rec in announced.items():
            if not rec.next_public_key:
                continue
            if self.ready_sent.get(nid) == rec.next_public_key:
                continue
            rcluster, _, rnode = nid.partition("/")
            self.writer.put(layout.rotation_ready_key(self.cluster, self.node, rcluster, rnode),
                            ready_value(RotationReady(rec.next_public_key), self._me, nid, self.identity))
            self.ready_sent[nid] = rec.next_public_key
        for nid in [n for n in self.ready_sent if not announced.get(n) or not announced[n].next_public_key]:
            rcluster, _, rnode = nid.partition("/")
            self.writer.delete(layout.rotation_ready_key(self.cluster, self.node, rcluster, rnode))
            del self.ready_sent[nid]
        for nid, (_key, at) in list(self.taken.items()):
            self._wake_at(at + PEER_WATCH_MS)
            if nid not in self._kicked:
                self._wake_at(at + KICK_MS)
                self._wake_at(at + KICK_IDLE_MS)

    def took(self, nid: str, new_key: str) -> None:
        """The reconciler replaced node `nid`'s key by `new_key` (a rotation): watch for its handshake."""
        self.taken[nid] = (new_key, self.clock())
        self._kicked.discard(nid)

    def switched(self, at: int) -> None:
        """This node switched its own key at `at` (ms)."""
        self._switched_at = at

    def kicks_due(self, handshakes: Mapping[str, float], received: Mapping[str, int] | None = None) -> list[str]:
        """Peers (node ids) whose new key got no handshake KICK_MS after it was taken although
        the device `received` bytes on it (or none KICK_IDLE_MS after), once each: the agent
        makes them again on the device (see KICK_MS). Never one taken before this node's own
        switch: no handshake can come until that peer takes this node's new key in turn, and
        making its entry again would drop what this node holds queued for it (58 pings lost at
        30 nodes)."""
        now, due = self.clock(), []
        for nid, (key, at) in self.taken.items():
            if nid in self._kicked or handshakes.get(key, 0.0) * 1000 >= at - 1000 or at <= self._switched_at:
                continue
            crossed = (received or {}).get(key, 1) > 0
            if now >= at + (KICK_MS if crossed else KICK_IDLE_MS):
                self._kicked.add(nid)
                due.append(nid)
        return due

    def check_taken(self, handshakes: Mapping[str, float]) -> None:
        """Stop watching taken keys that made a handshake, or that PEER_WATCH_MS passed for (a
        key is taken only on the node's proof: never given back; its laggard is the rotating
        node's to report)."""
        now = self.clock()
        for nid, (key, at) in list(self.taken.items()):
            if handshakes.get(key, 0.0) * 1000 >= at - 1000:
                del self.taken[nid]
            elif now >= at + PEER_WATCH_MS:
                log.warning("rotation of %s: no handshake on its new key %d ms after it was taken", nid, PEER_WATCH_MS)
                del self.taken[nid]
