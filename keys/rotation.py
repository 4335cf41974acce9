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
for that, so the switch is staged: the node announces its next public key with a switch time
`switch_at` a few seconds ahead; every live peer writes that it is ready (it knows the key and
will take it at `switch_at + PEER_DELAY_MS` by its own clock); only if all are ready a margin
before `switch_at` does the node switch at `switch_at`. Otherwise it announces a later time, and
after a few tries gives up cleanly (the old key stays, nothing was changed). Clock skew between
hosts must stay well under 128 ms minus PEER_DELAY_MS (NTP keeps it to milliseconds).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

LEAD_MS = 3000  # switch_at = now + LEAD_MS when a rotation is staged
READY_MARGIN_MS = 1000  # every live peer must be ready this long before switch_at
PEER_DELAY_MS = 40  # peers replace the key this long after switch_at (the node switches first)
MAX_POSTPONES = 4  # then the rotation is abandoned, naming the peers that were not ready
CONFIRM_TIMEOUT_MS = 15000  # after the switch: peers that did not handshake on the new key lag
PEER_ROLLBACK_MS = 6000  # a peer that got no handshake on the new key this long after taking it goes back
LATE_SWITCH_MS = 4000  # a node back (restarted) this late after switch_at still switches; later: abandons
# Two peers switching less than PEER_DELAY_MS apart each drop what they had queued for the other:
# each replaces the other's key (a new peer on the device: the old one goes with its queue) after
# its own switch, and before the other could handshake. Measured: 14 pings at ~600/s. So the
# switch times of nodes rotating at once are kept at least this far apart.
SWITCH_SPACING_MS = 300


@dataclass(frozen=True, slots=True)
class Step:
    """What the rotating node's agent does next."""

    action: str  # "wait" | "postpone" | "abandon" | "switch" | "done" | "fail"
    wake_at: int = 0  # unix ms: when to look again ("wait")
    lagging: tuple[str, ...] = ()


def staged_step(now: int, switch_at: int, postponed: int, live: Set[str], ready: Set[str]) -> Step:
    """Staged (next key announced for `switch_at`): switch, wait, postpone or give up."""
    missing = tuple(sorted(live - ready))
    if now >= switch_at:
        # Late (the agent was stopped over the switch time): peers took the new key at
        # switch_at + PEER_DELAY_MS and keep it PEER_ROLLBACK_MS without a handshake on it, so
        # switching now, within that, is what keeps them; later, they went back: abandon.
        return Step("switch") if now - switch_at < LATE_SWITCH_MS else Step("abandon", lagging=missing)
    if not missing:
        return Step("wait", wake_at=switch_at)
    if now < switch_at - READY_MARGIN_MS:
        return Step("wait", wake_at=switch_at - READY_MARGIN_MS)
    if postponed >= MAX_POSTPONES:
        return Step("abandon", lagging=missing)
    return Step("postpone", lagging=missing)


def switched_step(now: int, switch_at: int, live: Set[str], confirmed: Set[str]) -> Step:
    """Switched: done once every live peer made a handshake on the new key, failed (finished,
    with the laggards named) after CONFIRM_TIMEOUT_MS."""
    lagging = tuple(sorted(live - confirmed))
    if not lagging:
        return Step("done")
    if now >= switch_at + CONFIRM_TIMEOUT_MS:
        return Step("fail", lagging=lagging)
    return Step("wait", wake_at=min(now + 200, switch_at + CONFIRM_TIMEOUT_MS), lagging=lagging)


def peer_key(public_key: str, next_public_key: str, switch_at: int, now: int, refused: Set[str]) -> str:
    """The key a peer programs for a node whose record announces `next_public_key` at `switch_at`."""
    if next_public_key and switch_at and now >= switch_at + PEER_DELAY_MS and next_public_key not in refused:
        return next_public_key
    return public_key


def spaced_switch(me: str, switch_at: int, others: Mapping[str, int]) -> int:
    """The switch time for node `me` ("cluster/node"): `switch_at`, or a later one if another
    node announces a switch less than SWITCH_SPACING_MS before it.

    `others`: the switch times other nodes announce (node id -> unix ms). Of two times too close
    the later one moves (the node id breaks a tie): a node never moves for one that staged after
    it, so its peers' readiness stands, and moves only go forward."""
    t = switch_at
    for _ in range(len(others) + 1):
        clash = [o for n, o in others.items() if abs(o - t) < SWITCH_SPACING_MS and (o < t or (o == t and n < me))]
        if not clash:
            break
        t = max(clash) + SWITCH_SPACING_MS
    return t
