"""Nodes whose records vanished from Consul, kept a moment with their last record.

A record lives as long as its node's session. An agent that restarts on a busy host, or whose
Consul is slow, can let that session lapse (Consul drops it session_ttl after the last renewal,
and the process alone took over 3 s to start under two CPU hogs): the record goes, and comes
back a second later when the agent registers again. Removing the node's peer and route on
every other node meanwhile cut working tunnels (packets lost for 0.2-1.5 s). So a record that
vanished is planned from as it was for a short hold; if it comes back (the usual case) nothing
changed on the wire, and if not its tunnel goes when the hold ends.

Never held: a record Consul still has but that is refused now (revoked, badly signed,
invalid): only an absent record is a lapse. A present record always wins over a held one
(agent.planner.with_departed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from wiremesh.clustermesh import ClusterSnapshot, NodeRecord, layout

log = logging.getLogger("wiremesh.agent")

HOLD_MAX_S = 5.0  # at most this long (a node really gone leaves session_ttl + this after its last renewal)


class Departures:
    """node -> (its last record, when its hold ends), followed snapshot by snapshot."""

    def __init__(self, cluster: str, own: str, hold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """`own`: this agent's node in `cluster` ("" for a remote cluster's departures)."""
        self.cluster, self.own, self.hold_s = cluster, own, hold_s
        self._clock = clock
        self._held: dict[str, tuple[NodeRecord, float]] = {}

    def follow(self, old: ClusterSnapshot | None, new: ClusterSnapshot) -> None:
        """Note the nodes of `old` whose records `new` no longer has; forget those back or refused."""
        refused = {r.key for r in new.rejected}
        for name in [n for n in self._held if n in new.nodes or self._key(n) in refused]:
            rec, _ = self._held.pop(name)
            if name in new.nodes and new.nodes[name].public_key == rec.public_key:
                log.info("node %s registered again within its hold: its tunnel was kept", self._who(name))
        if old is None:
            return
        now = self._clock()
        for name, rec in old.nodes.items():
            if name == self.own or name in new.nodes or name in self._held or self._key(name) in refused:
                continue
            self._held[name] = (rec, now + self.hold_s)
            log.info("node %s's record is gone from Consul: its tunnel is kept %.1f s in case it registers again",
                     self._who(name), self.hold_s)

    def held(self) -> dict[str, NodeRecord]:
        """The records still within their hold (those past it are dropped: their tunnels go)."""
        now = self._clock()
        for name in [n for n, (_, end) in self._held.items() if end <= now]:
            del self._held[name]
            log.info("node %s did not register again within %.1f s: its tunnel goes", self._who(name), self.hold_s)
        return {n: rec for n, (rec, _) in self._held.items()}

    def next_end(self) -> float | None:
        """When the earliest hold ends (time.monotonic()): a pass then removes that node's tunnel."""
        return min((end for _, end in self._held.values()), default=None)

    def _who(self, name: str) -> str:
        return name if self.own else f"{self.cluster}/{name}"  # (a remote cluster's: no own node there)

    def _key(self, name: str) -> str:
        return layout.node_key(self.cluster, name)
