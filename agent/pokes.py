"""Who starts a new tunnel's handshake: one side at once, the other only if that did not work.

A peer just added to the device (a new node, a node back after a partition) is sent one packet
so that WireGuard starts its handshake at once: the node at the other end may still hold a
session of an entry this device removed and send into it, unanswered, for up to 15 s.

But when both ends add each other at the same moment (a node joining, both sides of a healed
partition) and both start a handshake, the two initiations cross: each side answers the other's
and so drops its own handshake state, the answer to its own is then refused, and wireguard-go
tries again only 5 s later (REKEY_TIMEOUT). Seen as a first ping lost for 4-5 s after `lab up`.
And an initiation sent before the other end has this node as a peer is dropped there, with the
same 5 s wait.

So the end with the lower public key pokes at once; the other waits DEFER_S and pokes only if no
handshake came meanwhile (the first initiation was dropped, or the other end never added this
node again: it still sends into its old session). Both ends decide alike from the two keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

DEFER_S = 0.25


class Pokes:
    """Peers to poke: at once (returned by `added`) or deferred (returned by `due`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deferred: dict[str, tuple[float, str]] = {}  # node -> (when, its public key then)

    def added(self, peers: Iterable[tuple[str, str]], own_key: str) -> list[str]:
        """Of the (node, public key) pairs just added, the nodes to poke now; the others wait."""
        now, out = self._clock(), []
        for node, key in peers:
            if own_key < key:
                out.append(node)
                self._deferred.pop(node, None)
            else:
                self._deferred[node] = (now + DEFER_S, key)
        return out

    def next_due(self) -> float | None:
        """When the next deferred poke is due (monotonic), None if none waits."""
        return min((t for t, _ in self._deferred.values()), default=None)

    def due(self, handshakes: Callable[[], Mapping[str, float]], keys: Mapping[str, str]) -> list[str]:
        """The deferred nodes whose time came and that still have no handshake on the key they
        were added with (`keys`: node -> its public key planned now; `handshakes`: read only if
        one is due). A node whose key changed meanwhile is dropped: its change pokes it anew."""
        now = self._clock()
        ripe = [n for n, (t, _) in self._deferred.items() if t <= now]
        if not ripe:
            return []
        hs = handshakes()
        out = []
        for node in ripe:
            _, key = self._deferred.pop(node)
            if keys.get(node) == key and not hs.get(key):
                out.append(node)
        return out
