"""Where the agent meets key rotation (agent.rotation): the last stage of every pass drives
this node's rotation and plays its part in the others'.

The device's key is not set here: from this node's switch time on, the pass plans the next key
for the device and the reconciler sets it, first of all its changes. This stage then confirms
the switch to the rotator, starts handshakes at once (one packet to every peer after a switch,
to a peer whose new key was just taken, to a peer just added: agent.pokes), and asks for the record writes
the rotation needs of the registration thread, never waiting for Consul itself.

Functions over the Agent (agent.daemon) rather than methods of it: the daemon owns the loop,
this module what a rotation needs of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from wiremesh.clustermesh import overlay_address
from wiremesh.keys import PrivateKey
from wiremesh.tunnels import PeerConfig, PeerStatus, TunnelError, poke

from .planner import DesiredState
from .registration import Publication, Registration
from .rotation import Rotator

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger("wiremesh.agent")


class RecordPublisher:
    """The rotator's `publish(commit_at)`: the registration thread writes the record, the loop
    looks at the answer on a later pass (None until it came)."""

    def __init__(self, registration: Registration, rotator: Rotator) -> None:
        self.registration = registration
        self.rotator = rotator
        self._pub: Publication | None = None
        self._tag: tuple[str, str, int] = ("", "", 0)  # (rotation, next key, commit time) it was asked for

    def __call__(self, commit_at: int) -> bool | None:
        tag = (*self.rotator.publication_tag(), commit_at)
        pub = self._pub
        if pub is not None and self._tag == tag:
            if not pub.done.is_set():
                return None
            self._pub = None
            return pub.ok
        nxt = tag[1]
        on_written = (lambda: self.rotator.committed(commit_at, nxt)) if commit_at else None
        self._pub, self._tag = self.registration.ask(commit_at, on_written, nxt), tag
        return None


def device_public_key(agent: Agent) -> str | None:
    try:
        return agent.device.show().public_key if agent.device.exists() else None
    except TunnelError:
        return None


def device_peers(agent: Agent) -> dict[str, PeerStatus]:
    """The device's peers by public key ({} if it cannot be read)."""
    try:
        return dict(agent.device.show().peers)
    except TunnelError:
        return {}


def handshakes(agent: Agent) -> dict[str, float]:
    """Latest handshake (unix s) per public key on the device."""
    return {k: p.latest_handshake for k, p in device_peers(agent).items()}


def _poke(peers: Iterable[tuple[str, PeerConfig]]) -> None:
    """One packet to each peer's overlay address: WireGuard starts its handshake at once."""
    for nid, peer in peers:
        try:
            poke(overlay_address(next(iter(peer.allowed_ips))))
        except (TunnelError, StopIteration, ValueError) as e:
            log.debug("poke %s: %s", nid, e)


def rotation_pass(agent: Agent, desired: DesiredState) -> None:
    """This node's rotation, and its part in the others': after the pass has reconciled (or
    switched the device alone). What the reconciler did since the last time (a switch, peers'
    new keys) is taken from it, also from passes that failed after doing it."""
    cfg, rotator = agent.cfg, agent.rotator
    key_changed, replaced, added = agent.reconciler.take_events()
    if key_changed:
        # A peer that took the new key before this switch (this agent late, the peer on time) got
        # no answer to its own handshake and would try again only 5 s later.
        _poke(desired.peers.items())
    else:
        # A peer added (a new node, or one back after its record was gone: a partition healed)
        # gets its handshake now from one end, a moment later from the other if that did not
        # work (agent.pokes). The node at the other end may still hold a session of the entry
        # this device removed, and send into it, unanswered, for up to 15 s (WireGuard's
        # keepalive and rekey timeouts) before it made a new one: measured 10.9-12.2 s after a
        # partition healed, until this side had something to send.
        now = agent.pokes.added(((n, desired.peers[n].public_key) for n in added if n in desired.peers),
                                agent.public_key)
        _poke((n, desired.peers[n]) for n in now)
    keys = {n: p.public_key for n, p in desired.peers.items()}
    _poke((n, desired.peers[n]) for n in agent.pokes.due(lambda: handshakes(agent), keys))
    snap = agent.snapshot()
    fed = agent.federation.view()
    announced = {f"{cfg.cluster}/{n}": r for n, r in snap.nodes.items() if n != cfg.node} if snap else {}
    announced.update((f"{c}/{n}", r) for c, nodes in fed.nodes.items() for n, r in nodes.items())
    agent.proofs.watch(desired.staged, {n: announced[n].switch_at for n in desired.staged if n in announced})
    for node, key in replaced:  # we took a node's new key: start the handshake now
        if node in announced and announced[node].next_public_key == key:
            rotator.peer.took(node, key)  # a rotation's: gone back from if no handshake comes on it
        if node in desired.peers:
            _poke([(node, desired.peers[node])])
    if snap is None:
        return
    rotator.adopt(snap.nodes.get(cfg.node))

    def switched(key: PrivateKey) -> bool:
        """The device took `key` in this pass (it was planned): from now on it is the node's key."""
        if desired.device is None or desired.device.private_key != key:
            return False  # the switch time came after this pass was planned: the next one does it
        agent.key, agent.public_key = key, key.public_key().base64
        return True

    signed = set(fed.signed) | ({cfg.cluster} if snap.config is not None and snap.config.require_signed else set())
    rotator.drive(
        snap.rotations.rotations.get(cfg.node), set(desired.peers), agent.readiness.view(announced, signed),
        lambda: {n: hs.get(p.public_key, 0.0) for hs in [handshakes(agent)] for n, p in desired.peers.items()},
        switched, agent.publisher, agent.registration.republish.set, announced)
    rotator.peer.take_part(announced)
    if agent.config is not None and agent.config.rotate_every:
        rotator.schedule(agent.config.rotate_every, sorted(snap.nodes), snap.rotations.rotations, key_mtime_ms(agent))
    if rotator.peer.taken:
        peers = device_peers(agent)
        hs = {k: p.latest_handshake for k, p in peers.items()}
        for nid in rotator.peer.kicks_due(hs, {k: p.rx_bytes for k, p in peers.items()}):
            if nid in desired.peers:
                log.info("rotation of %s: no handshake on its new key yet; making its peer again", nid)
                try:
                    agent.reconciler.renew_peer(nid, desired.peers[nid])
                except TunnelError as e:
                    log.warning("rotation of %s: peer not made again: %s", nid, e)
                _poke([(nid, desired.peers[nid])])
        rotator.peer.check_taken(hs)


def staging(agent: Agent) -> bool:
    """This node's rotation is asked for or staged (its peers' readiness matters)."""
    snap = agent.snapshot()
    own = snap.rotations.rotations.get(agent.cfg.node) if snap is not None else None
    r = agent.rotator
    return (own is not None and own.state == "requested") or (r.next_key is not None and not r.switch_at)


def key_mtime_ms(agent: Agent) -> int:
    try:
        return int(agent.cfg.key_file.stat().st_mtime * 1000)
    except OSError:
        return 0
