"""Where the agent meets key rotation (agent.rotation): after every pass of the loop, this
node's rotation is driven and its part in the others' is played; the device's switch and the
handshakes the state machine reads come from here.

Functions over the Agent (agent.daemon) rather than methods of it: the daemon owns the loop,
this module what a rotation needs of it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from wiremesh.clustermesh import overlay_address
from wiremesh.keys import PrivateKey
from wiremesh.tunnels import TunnelError, poke

from .planner import DesiredState

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger("wiremesh.agent")


def device_public_key(agent: Agent) -> str | None:
    try:
        return agent.device.show().public_key if agent.device.exists() else None
    except TunnelError:
        return None


def handshakes(agent: Agent) -> dict[str, float]:
    """Latest handshake (unix s) per public key on the device."""
    try:
        return {k: p.latest_handshake for k, p in agent.device.show().peers.items()}
    except TunnelError:
        return {}


def rotation_pass(agent: Agent, desired: DesiredState, replaced: list[tuple[str, str]]) -> None:
    """This node's rotation, and its part in the others': after every pass of the loop."""
    cfg, rotator = agent.cfg, agent.rotator
    for node, key in replaced:  # we took a rotating node's new key: start the handshake now
        rotator.took(node, key)
        try:
            poke(overlay_address(next(iter(desired.peers[node].allowed_ips))))
        except (TunnelError, KeyError, StopIteration, ValueError) as e:
            log.debug("poke %s: %s", node, e)
    snap = agent.snapshot()
    if snap is None:
        return
    fed = agent.federation.view()
    announced = {f"{cfg.cluster}/{n}": r for n, r in snap.nodes.items() if n != cfg.node}
    announced.update((f"{c}/{n}", r) for c, nodes in fed.nodes.items() for n, r in nodes.items())
    own = snap.rotations.rotations.get(cfg.node)
    staging = (own is not None and own.state == "requested") or (rotator.next_key is not None and not rotator.switch_at)
    # Peers' readiness is watched only while it matters: this node's rotation staged.
    agent.readiness.follow({cfg.cluster: None, **{n: m.datacenter for n, m in fed.members.items()
                                                  if n != cfg.cluster}} if staging else {})
    rotator.drive(
        own, set(desired.peers), agent.readiness.view(),
        lambda: {n: hs.get(p.public_key, 0.0) for hs in [handshakes(agent)] for n, p in desired.peers.items()},
        lambda key: switch_key(agent, key), agent.registration.publish_now, agent.registration.republish.set,
        announced)
    rotator.take_part(announced)
    if agent.config is not None and agent.config.rotate_every:
        rotator.schedule(agent.config.rotate_every, sorted(snap.nodes), snap.rotations.rotations, key_mtime_ms(agent))
    if rotator.taken and rotator.check_taken(handshakes(agent)):
        agent.wake()  # went back to an old key: plan again at once


def key_mtime_ms(agent: Agent) -> int:
    try:
        return int(agent.cfg.key_file.stat().st_mtime * 1000)
    except OSError:
        return 0


def switch_key(agent: Agent, key: PrivateKey) -> None:
    """The device takes `key` (a rotation's switch): from now on it is this node's key.

    Then one packet to every peer, so that this node starts its handshakes at once: a peer
    that took the new key before this switch (this agent late, the peer on time) got no
    answer to its own handshake and would try again only 5 s later."""
    agent.device.configure(key, agent.listen_port)
    agent.key, agent.public_key = key, key.public_key().base64
    last = agent.last_desired()
    for nid, peer in (last.peers.items() if last is not None else ()):
        try:
            poke(overlay_address(next(iter(peer.allowed_ips))))
        except (TunnelError, StopIteration, ValueError) as e:
            log.debug("poke %s: %s", nid, e)
