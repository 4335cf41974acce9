"""The smallest set of peer changes that turns a device's actual peers into the desired ones."""

from __future__ import annotations

from collections.abc import Mapping

from .model import PeerChange, PeerConfig, PeerStatus


def peer_changes(
    actual: Mapping[str, PeerStatus],
    desired: Mapping[str, PeerConfig],
    *,
    prune: bool,
) -> list[PeerChange]:
    """Diff peers keyed by public key (pure).

    An endpoint is sent only if it differs (WireGuard roams endpoints on its own, so a
    needless write would undo roaming), allowed IPs only if the set differs, and peers not
    desired are removed only when `prune` is set: before the first full sync from Consul the
    agent does not know which peers are stale, so it must not remove any.
    """
    changes: list[PeerChange] = []
    for key in sorted(desired):
        want = desired[key]
        have = actual.get(key)
        if have is None:
            changes.append(
                PeerChange(
                    public_key=key,
                    endpoint=want.endpoint,
                    allowed_ips=want.allowed_ips,
                    persistent_keepalive=want.persistent_keepalive or None,
                )
            )
            continue
        endpoint = want.endpoint if want.endpoint and want.endpoint != have.endpoint else None
        allowed = want.allowed_ips if want.allowed_ips != have.allowed_ips else None
        keepalive = (
            want.persistent_keepalive
            if want.persistent_keepalive != have.persistent_keepalive
            else None
        )
        if endpoint is None and allowed is None and keepalive is None:
            continue
        changes.append(
            PeerChange(
                public_key=key,
                endpoint=endpoint,
                allowed_ips=allowed,
                persistent_keepalive=keepalive,
                update_only=True,
            )
        )
    if prune:
        for key in sorted(set(actual) - set(desired)):
            changes.append(PeerChange(public_key=key, remove=True))
    return changes
