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

The watch is a thread (`run`) that reads the device every POLL_S while staged entries exist,
and wakes the loop when one of them was used. At start-up, and whenever a new next key is
announced, `proven` reads the device once itself: a peer whose agent restarted after taking a
key keeps it (the device has a handshake on it) instead of locking it again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping

from wiremesh.tunnels import PeerConfig, PeerStatus, TunnelError, WireGuardDevice

log = logging.getLogger("wiremesh.rotation")

POLL_S = 0.02  # how often the device is read while staged entries exist (N's queue: 128 packets)


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

    def __init__(self, device: WireGuardDevice, wake: Callable[[], None]) -> None:
        self._device = device
        self._wake = wake
        self._lock = threading.Lock()
        self._proven: set[str] = set()
        self._checked: set[str] = set()  # announced next keys the loop looked up on the device once
        self._watch: frozenset[str] = frozenset()
        self._changed = threading.Event()

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
            return frozenset(self._proven)

    def watch(self, staged: Mapping[str, PeerConfig]) -> None:
        """The staged entries as now planned: their keys are watched."""
        keys = frozenset(p.public_key for p in staged.values())
        if keys != self._watch:
            self._watch = keys
            self._changed.set()

    def run(self, stop: threading.Event) -> None:
        """The watch thread: reads the device every POLL_S while staged entries exist."""
        while not stop.is_set():
            keys = self._watch
            with self._lock:
                keys = keys - self._proven
            if not keys:
                self._changed.wait(1.0)
                self._changed.clear()
                continue
            try:
                seen = used(self._device.show().peers, keys, locked=True)
            except TunnelError:
                seen = set()
            if seen:
                with self._lock:
                    self._proven |= seen
                log.info("rotation: %d node(s) seen using their next key on the data plane; taking it", len(seen))
                self._wake()
            stop.wait(POLL_S)
