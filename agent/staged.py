"""A rotating node's switch, proven by the data plane (the peer side of a rotation).

Consul tells a peer when a node commits its switch; a peer that missed the commit (Consul
stopped the moment it landed, or slow to propagate it) would keep the node's old key and lose
everything the node sends after its switch. So each peer also holds the node's announced next
key as a second peer entry, locked (tunnels.STAGED_PSK) and without allowed IPs (the planner's
`DesiredState.staged`). The first handshake initiation the node sends with its new key can come
only from the node, and only after its switch: wireguard-go consumes it on the locked entry
(its rx_bytes grow) but cannot complete it, so the node keeps what it sends queued (128 packets)
instead of having it dropped here. This module sees that, and the next pass takes the key
(keys.peer_key's `proven`): the entry is made again unlocked with the node's allowed IPs, and
this peer's own handshake completes at once. Measured on wireguard-go 0.0.20220316: the
initiation shows on the locked entry 9-13 ms after the switch; 0 of 3 000 pings lost at 200/s.

The watch is a thread (`run`) that wakes the loop when a staged entry was used. It reads the
device every POLL_S only while a switch may be happening: from LEAD_MS before a committed
switch time until the switch is seen (TAIL_MS after it at most), or while Consul is away from
this agent and a node it staged may have committed unseen; otherwise every SLOW_POLL_S (a
commit seen late). Read every POLL_S all the time, 30 agents of a 30-node lab with five nodes
staged at once spent most of two cores on it. At start-up, and whenever a new next key is
announced, `proven` reads the device once itself: a peer whose agent restarted after taking a
key keeps it (the device has a handshake on it) instead of locking it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from wiremesh.tunnels import PeerConfig, PeerStatus, TunnelError, WireGuardDevice

log = logging.getLogger("wiremesh.rotation")

POLL_S = 0.02  # how often the device is read while a switch may be happening (N's queue: 128 packets)
# Otherwise, while staged entries exist. A peer said it is ready: the node may commit at once,
# and a commit this agent sees late (a slow Consul answer, a long pass) would leave the node's
# switch unseen until the next read: at 1 s, 87 pings lost at 100/s in the 30-node bench
# (the proof came 1.5 s after the switch; the node queues 128 packets). At 0.25 s, each agent
# reads its device 4 times a second while staged keys wait, not 50.
SLOW_POLL_S = 0.25
LEAD_MS = 200  # a committed switch time's window opens this long before it (clock skew, a late pass)
# It closes when the node's switch is proven, at the latest this long after the switch time: a
# node switches late when its host is starved (its commit's write slow, a UAPI call that hung):
# 3.5 s late seen in a 30-node lab, 5.6 s under a CPU hog, where a 3 s window left the peers
# polling once a second and the node's queue (128 packets) overflowed for a second.
TAIL_MS = 15000


def hot(keys: Mapping[str, int], now_ms: int, consul_up: bool) -> tuple[set[str], float]:
    """Of the staged keys (key -> its node's switch time, 0: no commit seen), those whose switch
    may be happening now, and how long (s) until the next window opens (at most SLOW_POLL_S)."""
    out: set[str] = set()
    wait = SLOW_POLL_S
    for key, at in keys.items():
        if not at:
            if not consul_up:
                out.add(key)
        elif at - LEAD_MS <= now_ms <= at + TAIL_MS:
            out.add(key)
        elif now_ms < at - LEAD_MS:
            wait = min(wait, (at - LEAD_MS - now_ms) / 1000)
    return out, wait


def used(peers: Mapping[str, PeerStatus], keys: Iterable[str], *, locked: bool = False) -> set[str]:
    """Of `keys`, those the device has received from (a handshake message or a packet); with
    `locked`, only those still staged on it (a key taken meanwhile is no news)."""
    out = set()
    for k in keys:
        p = peers.get(k)
        if p is not None and (p.rx_bytes > 0 or p.latest_handshake > 0) and (p.staged or not locked):
            out.add(k)
    return out


class SwitchProofs:
    """Next keys their nodes were seen using. The loop calls `proven` (inputs) and `watch`
    (after planning); the watch thread `run`s beside it."""

    def __init__(self, device: WireGuardDevice, wake: Callable[[], None],
                 consul_up: Callable[[], bool] = lambda: True) -> None:
        self._device = device
        self._wake = wake
        self._consul_up = consul_up
        self._lock = threading.Lock()
        self._proven: set[str] = set()
        self._checked: set[str] = set()  # announced next keys the loop looked up on the device once
        self._watch: dict[str, int] = {}  # staged key -> its node's switch time (0: none seen)
        self._changed = threading.Event()
        self._news = threading.Event()  # set: proofs the loop has not planned with yet

    def proven(self, announced: set[str]) -> frozenset[str]:
        """Of the next keys nodes announce, those proven. A key announced for the first time is
        looked up on the device at once (an agent restarted after taking it)."""
        new = announced - self._checked
        self._checked = (self._checked & announced) | new
        found: set[str] = set()
        if new:
            try:
                found = used(self._device.show().peers, new)
            except TunnelError:
                self._checked -= new  # (looked up again on the next pass)
        with self._lock:
            self._proven = (self._proven & announced) | found
            self._news.clear()
            return frozenset(self._proven)

    def news(self) -> bool:
        """A proof came that the loop has not planned with yet: a pass is due at once (one held
        for a key change due shortly would let the node's queue overflow)."""
        return self._news.is_set()

    def wait_news(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a proof (a held pass ends at once for one)."""
        return self._news.wait(max(0.0, timeout))

    def watch(self, staged: Mapping[str, PeerConfig], switch_times: Mapping[str, int]) -> None:
        """The staged entries as now planned (by node), with each node's switch time as this
        agent knows it (by node; absent or 0: no commit seen): their keys are watched."""
        keys = {p.public_key: switch_times.get(nid, 0) for nid, p in staged.items()}
        if keys != self._watch:
            self._watch = keys
            self._changed.set()

    def run(self, stop: threading.Event) -> None:
        """The watch thread (see the module's docstring)."""
        last_full = 0.0
        while not stop.is_set():
            with self._lock:
                keys = {k: at for k, at in self._watch.items() if k not in self._proven}
            if not keys:
                self._changed.wait(SLOW_POLL_S)
                self._changed.clear()
                continue
            hot_keys, wait = hot(keys, int(time.time() * 1000), self._consul_up())
            look = hot_keys
            if time.monotonic() - last_full >= SLOW_POLL_S:
                look, last_full = set(keys), time.monotonic()
            if look:
                self._look(look)
            pause = POLL_S if hot_keys else min(wait, SLOW_POLL_S - (time.monotonic() - last_full))
            self._changed.wait(max(POLL_S, pause))
            self._changed.clear()

    def _look(self, keys: set[str]) -> None:
        try:
            seen = used(self._device.show().peers, keys, locked=True)
        except TunnelError:
            return
        if seen:
            with self._lock:
                self._proven |= seen
                self._news.set()
            log.info("rotation: %d node(s) seen using their next key on the data plane; taking it", len(seen))
            self._wake()
