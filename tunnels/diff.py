"""The smallest set of peer changes that turns a device's peers into the desired ones."""

from __future__ import annotations

from collections.abc import Mapping

from .model import PeerChange, PeerConfig, PeerStatus


def as_status(applied: Mapping[str, PeerConfig]) -> dict[str, PeerStatus]:
    """What the device holds if everything `applied` (by node) is still there, by public key."""
    return {c.public_key: PeerStatus(public_key=c.public_key, endpoint=c.endpoint, allowed_ips=c.allowed_ips,
                                     persistent_keepalive=c.persistent_keepalive, staged=c.staged)
            for c in applied.values()}


def peer_changes(
    actual: Mapping[str, PeerStatus],
    desired: Mapping[str, PeerConfig],
    *,
    prune: bool,
    applied: Mapping[str, PeerConfig] | None = None,
) -> list[PeerChange]:
    """Diff the device's peers (by public key) against the desired ones (by node), pure.

    A peer is a node: its public key is an attribute. A node whose key changed keeps its place
    in one step: the new key is added with the node's endpoint and allowed IPs (which move to
    it) and the old key is removed in the same update, never a gap and never both listed.

    `applied` is what this process last programmed for each node. An endpoint is written only
    for a new peer, or when the node's record changed it since it was applied: WireGuard roams a
    peer's endpoint to wherever its authenticated packets come from, and rewriting it on every
    pass would undo that (a peer behind NAT would be reset each time). With no memory of a node
    (the agent restarted), a peer that has an endpoint keeps it.

    Allowed IPs are written only when the set differs; peers nobody desires are removed only
    with `prune`: before the first full sync from Consul the agent does not know which are stale.

    A staged peer (a rotating node's next key, PeerConfig.staged) that becomes the node's peer is
    made again unlocked (PeerChange.recreate) and takes the allowed IPs of the node's old key.
    """
    applied = applied or {}
    by_key = {want.public_key: node for node, want in desired.items()}
    claimed: set[str] = set()
    changes: list[PeerChange] = []
    for node in sorted(desired):
        want = desired[node]
        have = actual.get(want.public_key)
        before = applied.get(node)
        if have is None or (have.staged and not want.staged):
            old = None if want.staged else _previous_key(node, want, actual, by_key, claimed, before)
            if old is not None:
                claimed.add(old)
            changes.append(PeerChange(
                public_key=want.public_key, endpoint=(have.endpoint if have else None) or want.endpoint,
                allowed_ips=want.allowed_ips, persistent_keepalive=want.persistent_keepalive or None, replaces=old,
                recreate=have is not None, staged=True if want.staged else None, name=node))
            continue
        record_moved = before is not None and before.endpoint != want.endpoint
        endpoint = want.endpoint if want.endpoint and (have.endpoint is None or record_moved) else None
        if endpoint == have.endpoint:
            endpoint = None
        allowed = want.allowed_ips if want.allowed_ips != have.allowed_ips else None
        keepalive = want.persistent_keepalive if want.persistent_keepalive != have.persistent_keepalive else None
        staged = True if want.staged and not have.staged else None
        if endpoint is None and allowed is None and keepalive is None and staged is None:
            continue
        changes.append(PeerChange(public_key=want.public_key, endpoint=endpoint, allowed_ips=allowed,
                                  persistent_keepalive=keepalive, update_only=True, staged=staged, name=node))
    # A staged (locked) peer nobody desires goes even before pruning may: it carries nothing,
    # and only this agent makes them (an abandoned rotation's next key).
    for key in sorted(k for k, have in actual.items() if have.staged and k not in by_key and k not in claimed
                      and not prune):
        names = [n for n, c in applied.items() if c.public_key == key]
        changes.append(PeerChange(public_key=key, remove=True, name=names[0] if names else ""))
    if prune:
        for key in sorted(set(actual) - set(by_key) - claimed):
            names = [n for n, c in applied.items() if c.public_key == key]
            changes.append(PeerChange(public_key=key, remove=True, name=names[0] if names else ""))
    return changes


def _previous_key(node: str, want: PeerConfig, actual: Mapping[str, PeerStatus], by_key: Mapping[str, str],
                  claimed: set[str], before: PeerConfig | None) -> str | None:
    """The key `node` holds on the device today, if it is a different one (a rotation)."""
    if before is not None and before.public_key != want.public_key:
        if before.public_key in actual and before.public_key not in by_key and before.public_key not in claimed:
            return before.public_key
    # No memory (a restarted agent): the stray peer that holds exactly this node's allowed IPs.
    for key, have in sorted(actual.items()):
        if key not in by_key and key not in claimed and have.allowed_ips and have.allowed_ips == want.allowed_ips:
            return key
    return None
