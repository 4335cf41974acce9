"""Asking a node for a key rotation: the request `wiremesh keys rotate` writes (`rotations/<node>`
in state requested), signed with the operator's key when it has it (clustermesh.control).

A request is created with check-and-set and never written over an active rotation: two commands
asking for the same node at once make one rotation, and the second follows the first's. In a
cluster that requires signed records, a stored record its agents refuse is no rotation: it is
replaced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from wiremesh.clustermesh import (
    CASConflict,
    ClusterConfig,
    ConsulStore,
    ControlMemo,
    InvalidRecord,
    KVItem,
    Rotation,
    Trust,
    layout,
    sign_request,
)
from wiremesh.errors import WiremeshError
from wiremesh.keys import SigningKey, VerifyKey

from .output import info

_CAS_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Request:
    rotation: Rotation
    joined: bool  # an active rotation was there already (another command's, or a scheduled one)


def request_rotation(store: ConsulStore, cluster: str, node: str, now_ms: int, signer: SigningKey | None = None,
                     verify: Callable[[str, bytes, Rotation], None] | None = None) -> Request:
    """Ask `node` to rotate its key (signed by `signer`, the operator's key, if given); if it is
    rotating already, that rotation is the answer. `verify`: a signed cluster's check
    (clustermesh.control); a record its agents refuse is no rotation, and is replaced."""
    key = layout.rotation_key(cluster, node)
    for _ in range(_CAS_ATTEMPTS):
        item = store.get(key)
        if item is not None:
            current = _stored_rotation(item, node)
            try:
                if verify is not None:
                    verify(key, item.value, current)
            except InvalidRecord as e:
                info(f"{node}: its rotation record is refused by the cluster's agents ({e.field}: {e.reason}); "
                     "replacing it")
            else:
                if current.active:
                    return Request(current, joined=True)
        new = Rotation.new(node, now_ms)
        if signer is not None:
            new = sign_request(new, cluster, signer)
        # Create only if absent; replace an ended one only if nobody wrote it since it was read.
        if store.put(key, new.to_json(), cas=item.modify_index if item is not None else 0):
            return Request(new, joined=False)
    raise CASConflict(f"rotation of {node}: {key} kept changing under this command; run again")


def _stored_rotation(item: KVItem, node: str) -> Rotation:
    try:
        rot = Rotation.from_json(item.value, item.key)
        if rot.node != node:
            raise InvalidRecord("node", f"{rot.node!r} does not match the key's node {node!r}", item.key)
        return rot
    except InvalidRecord as e:
        err = WiremeshError(f"rotation of {node}: the record in Consul is invalid ({e}); left alone")
        err.hint = f"if no agent is running it, remove it: consul kv delete {item.key}"
        raise err from None


def verifier(config: ClusterConfig | None, memo: ControlMemo) -> Callable[[str, bytes, Rotation], None] | None:
    """How a signed cluster's agents check a rotation record (None: an unsigned cluster takes any)."""
    if config is None or not config.require_signed or not config.signing_key:
        return None
    return memo.rotation_check(Trust(config, VerifyKey.from_base64(config.signing_key), time.time()))


