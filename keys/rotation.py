"""The key-rotation state machine of the rotating node (pure: no I/O, no clock of its own).

Why this order (measured on these machines, see DESIGN.md): setting a new private key ends a
device's sessions for SENDING, but packets still arriving on the old sessions are decrypted.
A peer that removes the old public key can no longer decrypt anything sent on the old
sessions. So the rotating node switches first and its peers replace its key a moment later:

- peer -> node keeps flowing on the old sessions, which the node still decrypts;
- node -> peer waits in wireguard-go's per-peer queue (128 packets) for the handshake that the
  peer starts as soon as it has replaced the key (it sends one packet at once).

Nothing is lost as long as every peer replaces the key within (128 / packet rate) of the switch
(128 ms at 1 000 packets/s). Consul's propagation delay (50 ms to over 1 s) cannot be trusted
for that. Each peer holds the announced next key as a second, locked peer entry (a preshared
key the node does not use: agent.staged); the node's first handshake initiation with its new
key arrives there right after its switch, proves it (only the node holds that key) and cannot
complete, so the node's packets stay queued; the peer then takes the key (agent.planner, within
POLL + one pass: 10-30 ms measured) and its own handshake completes at once. A peer never takes
the key by its clock: taken before the node's initiation came, its handshake would cross the
node's (each side answers the other's initiation and rejects the answer to its own;
wireguard-go then waits 5 s), and taken before the node really switched (its commit's write
slow, its switch late: seen 2.5 s late on a starved host), nothing would answer. If the node's
first initiation is lost, wireguard-go sends it again 5 s later; Consul's copy of the record
(the new key as its public key) ends it too. The switch is agreed on first all the same, so
that the node's neighbours never switch at once and its peers watch the data plane closely
around that time (agent.staged):

1. staged: the node announces its next public key (no switch time yet); every live peer writes
   that it is ready (it knows the key).
2. committed: once every live peer is ready, the node picks `switch_at` (COMMIT_LEAD_MS ahead)
   and writes it into its record. That write is the point of no return: the node switches at
   `switch_at` whatever happens after it (a restart switches late, a Consul outage does not
   matter: nothing more is read or written), and peers take the new key on the node's proof.
   A switch time is never moved or withdrawn,
   so a peer can never take a key the node did not switch to. Before the commit nothing is
   decided: the node gives up cleanly (abandoned, the old key stays) if its peers are not ready
   within READY_TIMEOUT_MS.
3. switched, then done once every live peer made a handshake on the new key (or failed,
   naming the laggards, after CONFIRM_TIMEOUT_MS: the new key stays, never half).

A peer that missed the commit (Consul stopped the moment it landed) learns of the switch from
the data plane: it holds the announced next key as a locked second peer entry from the staged
step on, and the node's first handshake initiation with its new key shows there (agent.staged;
`peer_key`'s `proven`).

Two neighbours switching less than SWITCH_SPACING_MS apart each drop what they had queued for
the other (each replaces the other's key, a new peer on the device, after its own switch and
before the other could handshake; measured: 14 pings at ~600/s). So commits are ordered: a node
commits only when no node it sees staged and not yet committed comes before it (`commit_order`),
and picks a switch time apart from every switch time committed (`switch_time`). Every write a
node makes after seeing something is ordered after that something in Consul, and a node commits
only on seeing every peer's readiness, so of two nodes staged at once the later one always sees
the earlier one's commit before its own. Switch times alone do not keep the switches apart: a
node switches when its commit's write returns, late when Consul is slow. So a node whose switch
is due also waits (SWITCH_DEFER_MS at most) until every switch committed before its own has
settled on its data plane: proven, and a handshake made on the key it took (`switch_waits_for`). Clock skew between hosts matters only to how
closely peers watch the data plane around a switch time (agent.staged.LEAD_MS).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

COMMIT_LEAD_MS = 1000  # switch_at = commit + this: every live peer has seen the commit by then
READY_TIMEOUT_MS = 15000  # staged this long with peers not ready: abandoned (nothing was changed)
ORDER_TIMEOUT_MS = 3 * READY_TIMEOUT_MS  # waiting this long for nodes before it to commit: abandoned
CONFIRM_TIMEOUT_MS = 15000  # after the switch: peers that did not handshake on the new key lag
PEER_WATCH_MS = 6000  # a peer watches a key it took this long for a handshake (agent.rotation_peer.KICK_MS)
SWITCH_SPACING_MS = 300  # switch times of different nodes are at least this far apart
SWITCH_DEFER_MS = 2000  # a node's switch waits at most this long for the switches committed before it


@dataclass(frozen=True, slots=True)
class Step:
    """What the rotating node's agent does next."""

    action: str  # "wait" | "commit" | "abandon" | "switch" | "done" | "fail"
    wake_at: int = 0  # unix ms: when to look again ("wait"); 0: at the next change
    lagging: tuple[str, ...] = ()


def staged_step(now: int, staged_at: int, live: Set[str], ready: Set[str], ahead: Set[str]) -> Step:
    """Staged (next key announced, no switch time): commit, wait, or give up.

    `ahead`: nodes staged and not yet committed that come before this one (commit_order)."""
    missing = tuple(sorted(live - ready))
    if not missing and not ahead:
        return Step("commit")
    if missing and now >= staged_at + READY_TIMEOUT_MS:
        return Step("abandon", lagging=missing)
    if not missing and now >= staged_at + ORDER_TIMEOUT_MS:
        return Step("abandon", lagging=tuple(sorted(ahead)))
    return Step("wait", wake_at=staged_at + (READY_TIMEOUT_MS if missing else ORDER_TIMEOUT_MS),
                lagging=missing or tuple(sorted(ahead)))


def committed_step(now: int, switch_at: int) -> Step:
    """Committed: switch at `switch_at`, or at once if that passed (the agent was stopped)."""
    return Step("switch") if now >= switch_at else Step("wait", wake_at=switch_at)


def switched_step(now: int, since: int, live: Set[str], confirmed: Set[str]) -> Step:
    """Switched: done once every live peer made a handshake on the new key, failed (finished,
    with the laggards named) CONFIRM_TIMEOUT_MS after `since`: the switch, or Consul's return
    if it was away meanwhile (a peer that missed the commit learns the key only from Consul)."""
    lagging = tuple(sorted(live - confirmed))
    if not lagging:
        return Step("done")
    if now >= since + CONFIRM_TIMEOUT_MS:
        return Step("fail", lagging=lagging)
    return Step("wait", wake_at=min(now + 200, since + CONFIRM_TIMEOUT_MS), lagging=lagging)


def commit_order(me: str, staged: Iterable[str]) -> frozenset[str]:
    """Of the nodes ("cluster/node") seen staged and not committed, those that commit before `me`."""
    return frozenset(n for n in staged if n < me)


def switch_waits_for(me: str, switch_at: int, unseen: Mapping[str, int]) -> list[str]:
    """Of the nodes whose commit this node saw but not yet their switch (node -> switch time),
    those committed before it: this node's switch waits for theirs (at most SWITCH_DEFER_MS).

    Switch times are spaced, but a switch comes when its commit's write returns, and a slow
    Consul returned two commits 4 s late and 110 ms apart: the two nodes switched at once, each
    addressed its first initiation to the other's old key, which the other no longer had, and
    neither proved the other's switch (12 s without a tunnel between them, at 30 nodes). The
    later node always sees the earlier one's commit before its own (see above), so waiting for
    the earlier one's switch to show on the data plane keeps every switch apart."""
    return sorted(n for n, at in unseen.items() if (at, n) < (switch_at, me))


def switch_time(earliest: int, committed: Iterable[int]) -> int:
    """The first time from `earliest` at least SWITCH_SPACING_MS away from every committed one."""
    t = earliest
    for o in sorted(committed):
        if abs(o - t) < SWITCH_SPACING_MS:
            t = o + SWITCH_SPACING_MS  # sorted: a later clash can only move it further on
    return t


def peer_key(public_key: str, next_public_key: str, proven: Set[str] = frozenset()) -> str:
    """The key a peer programs for a node whose record announces `next_public_key`: the current
    one until the node's handshake initiation with the next one reached this peer's device
    (`proven`: it switched), then the next one."""
    if next_public_key and next_public_key in proven:
        return next_public_key
    return public_key
