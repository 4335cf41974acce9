"""Enrolling nodes in a signed cluster: the cluster's signing key, node certificates, revocation.

The operator keeps the cluster's signing key (a 0600 file; by default
~/.config/wiremesh/signing/CLUSTER.key, or $WIREMESH_SIGNING_KEY_DIR/CLUSTER.key) and gives
each node a certificate for its identity key and one pod CIDR. The cluster config in Consul
holds only the public half (`signing_key`), whether unsigned records are refused
(`require_signed`); every change to it is a check-and-set write. Revoked serials live in a list of
their own (revocation.py), pruned as their certificates expire.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wiremesh.keys import MAX_VALIDITY_S, Certificate, NodeIdentity, SigningKey, VerifyKey, issue

from . import layout
from .anchor import settings_doc, sign_settings, signed_by
from .clusters import load_cluster_config
from .errors import CASConflict, ClusterMeshError, ConsulReason, InvalidRecord, TransactionFailed
from .ipam import leases
from .records import ClusterConfig, NodeRecord, check_node_name
from .revocation import Revocations, certificate_expiries, check_serial, plan_change, stored_chunks
from .signed import cluster_key, lease_value, parse_lease
from .store import ConsulStore

DEFAULT_VALIDITY_S = 365 * 86400


class EnrollError(ClusterMeshError):
    """A node cannot be enrolled, or the cluster's signing settings cannot change; `field` says why."""

    def __init__(self, field: str, reason: str, hint: str | None = None) -> None:
        self.field, self.reason, self.hint = field, reason, hint
        super().__init__(f"{field}: {reason}")


def signing_key_dir() -> Path:
    env = os.environ.get("WIREMESH_SIGNING_KEY_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "wiremesh" / "signing"


def default_signing_key_path(cluster: str) -> Path:
    return signing_key_dir() / f"{cluster}.key"


def update_config(store: ConsulStore, cluster: str, change: Callable[[ClusterConfig], ClusterConfig],
                  sign: Sequence[SigningKey] = ()) -> tuple[ClusterConfig, bool]:
    """Apply `change` to the stored config with check-and-set; (new config, whether it changed).

    With `sign` (the cluster's signing key, and during a roll-over the next one), the signing
    settings are signed again with a higher serial when they change or are not signed by these
    keys yet (clustermesh.anchor): agents that pinned the cluster key refuse any other change."""
    key = layout.config_key(cluster)
    for _ in range(8):
        item = store.get(key)
        current = load_cluster_config(store, cluster) if item is None else ClusterConfig.from_json(item.value, key)
        new = change(current)
        if sign and (settings_doc(new) != settings_doc(current) or new.settings_signatures != current.settings_signatures
                     or not all(signed_by(new, k.public_key().base64) for k in sign)):
            new = sign_settings(dataclasses.replace(new, signing_serial=max(new.signing_serial,
                                                                            current.signing_serial)), sign)
        if new == current:
            return current, False
        if store.put(key, dataclasses.replace(new, extra=current.extra, schema=current.schema).to_json(),
                     cas=item.modify_index if item else 0):
            return new, True
    raise CASConflict(f"cluster {cluster!r}: its config kept changing meanwhile; run again")


def attach_signing_key(store: ConsulStore, cluster: str, key: VerifyKey | SigningKey, force: bool = False) -> bool:
    """Store `key` as the cluster's signing key (require_signed untouched), its settings signed by
    it when it is the private key; True if it changed."""
    pub = key.public_key() if isinstance(key, SigningKey) else key

    def change(cfg: ClusterConfig) -> ClusterConfig:
        if cfg.signing_key and cfg.signing_key != pub.base64 and not force:
            raise EnrollError("signing_key", f"cluster {cluster!r} already has another signing key "
                              f"({VerifyKey.from_base64(cfg.signing_key).fingerprint})",
                              "roll it over without downtime: wiremesh cluster roll-signing-key "
                              f"{cluster} --new NEW.key (--force replaces it at once: every certificate made "
                              "with the old key stops verifying, and agents that pinned it refuse the change)")
        if cfg.signing_key != pub.base64:
            cfg = dataclasses.replace(cfg, next_signing_key="")
        return dataclasses.replace(cfg, signing_key=pub.base64)
    return update_config(store, cluster, change, [key] if isinstance(key, SigningKey) else ())[1]


def check_signing_key(config: ClusterConfig, key: SigningKey, field: str = "--signing-key") -> None:
    if not config.signing_key:
        raise EnrollError(field, f"cluster {config.name!r} has no signing key",
                          f"attach one: wiremesh cluster signing-key {config.name} --create")
    if key.public_key().base64 not in (config.signing_key, config.next_signing_key):
        raise EnrollError(field, f"not cluster {config.name!r}'s signing key (that is "
                          f"{VerifyKey.from_base64(config.signing_key).fingerprint}, this is "
                          f"{key.public_key().fingerprint})")


@dataclass(frozen=True, slots=True)
class Enrolled:
    certificate: Certificate
    lease: str  # "held" (the node's own lease), "reserved" (written now), or "" (not written)
    cluster_key: str = ""  # the public key that signed it: the node's trust anchor (agent's cluster.pub)


def choose_cidr(store: ConsulStore, config: ClusterConfig, node: str, cidr: str | None) -> tuple[str, bool]:
    """The CIDR to certify for `node`: `cidr` if given (and free or its own), else the one it holds,
    else the lowest free one; and whether a lease of it exists already."""
    held = leases(store, config.name)
    if cidr is not None:
        try:
            net = ipaddress.ip_network(cidr, strict=True)
        except ValueError as e:
            raise EnrollError("--cidr", f"{cidr!r} is not a network CIDR ({e})") from None
        if net.version != config.pod_network.version or not net.subnet_of(config.pod_network):  # type: ignore[arg-type]
            raise EnrollError("--cidr", f"{net} is outside cluster {config.name!r}'s pod CIDR {config.pod_cidr}")
        if net.prefixlen != config.node_prefix_len:
            raise EnrollError("--cidr", f"{net} is not a /{config.node_prefix_len} (the cluster's node prefix)")
        owner = held.get(str(net))
        if owner not in (None, node):
            raise EnrollError("--cidr", f"{net} is leased to node {owner!r}")
        return str(net), owner is not None
    mine = sorted((c for c, o in held.items() if o == node), key=ipaddress.ip_network)
    if mine:
        return mine[0], True
    taken = [ipaddress.ip_network(c) for c in held]
    for net in config.pod_network.subnets(new_prefix=config.node_prefix_len):
        if not any(t.overlaps(net) for t in taken):
            return str(net), False
    raise EnrollError("--cidr", f"every /{config.node_prefix_len} of {config.pod_cidr} is leased")


def enroll(store: ConsulStore, cluster: str, node: str, signing_key: SigningKey, identity: VerifyKey, now: float,
           cidr: str | None = None, valid_for_s: int = DEFAULT_VALIDITY_S,
           identity_key: SigningKey | None = None) -> Enrolled:
    """A certificate for `node`, and its CIDR reserved in IPAM (signed, if the identity key is at hand)."""
    try:
        check_node_name(node, "NODE")
    except InvalidRecord as e:
        raise EnrollError("NODE", e.reason) from None
    config = load_cluster_config(store, cluster)
    check_signing_key(config, signing_key)
    for _ in range(8):
        chosen, exists = choose_cidr(store, config, node, cidr)
        cert = issue(signing_key, cluster, node, identity, chosen, valid_for_s, now)
        anchor = signing_key.public_key().base64
        if exists:
            if identity_key is not None:  # its lease signed again with the new certificate
                item = store.get(layout.ipam_key(cluster, chosen))
                if item is not None and not store.put(item.key, lease_value(chosen, NodeIdentity(cert, identity_key)),
                                                      cas=item.modify_index):
                    continue
            return Enrolled(cert, "held", anchor)
        value = lease_value(chosen, NodeIdentity(cert, identity_key)) if identity_key is not None else node
        if store.put(layout.ipam_key(cluster, chosen), value, cas=0):
            return Enrolled(cert, "reserved", anchor)
    raise CASConflict(f"cluster {cluster!r}: other nodes kept taking the free CIDRs meanwhile; run again")


@dataclass(frozen=True, slots=True)
class Revoked:
    """What a revocation left: the list, the serials added, those pruned (expired), and the
    serials moved out of the config's own `revoked` list (the layout before chunks)."""

    revocations: Revocations
    added: list[str]
    pruned: list[str]
    migrated: list[str]
    legacy: tuple[str, ...] = ()  # serials still in the config's list (only if an older writer added some meanwhile)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.pruned or self.migrated)


def revoke(store: ConsulStore, cluster: str, serials: list[str], *, now: float | None = None,
           not_after: int | None = None, sign: Sequence[SigningKey] = ()) -> Revoked:
    """Add certificate serials to the cluster's revocation list, and prune it.

    Each serial is kept until its certificate expires (PRUNE_AFTER_S later): the expiry of the
    certificate a live record or lease carries (signed by the cluster), else `not_after`, else the
    longest a certificate can last (MAX_VALIDITY_S from now). Serials of the config's own list are
    moved into the chunks first, then out of the config, so none is ever in neither."""
    now = time.time() if now is None else now
    for serial in serials:
        try:
            check_serial(serial, "SERIAL")
        except InvalidRecord as e:
            raise EnrollError("SERIAL", e.reason) from None
    config = load_cluster_config(store, cluster)
    legacy = tuple(s for s in config.revoked if s not in serials)
    # (the current key's certificates; during a roll-over the next key's get the default expiry)
    known = certificate_expiries(_certificates(store, cluster), (cluster_key(config) or (None,))[0])
    default = int(now) + MAX_VALIDITY_S if not_after is None else not_after
    add = {s: known.get(s, default) for s in serials}
    add.update({s: known.get(s, int(now) + MAX_VALIDITY_S) for s in legacy})
    for _ in range(8):
        _, items = store.list(layout.revoked_prefix(cluster))
        try:
            stored = stored_chunks(cluster, items)
        except InvalidRecord as e:
            raise EnrollError(e.field, f"{e.key}: {e.reason}", "fix or delete that key (its serials would be lost "
                              "otherwise), then run again") from None
        change = plan_change(cluster, stored, add, now)
        try:
            for txn in change.txns:
                store.txn(txn)
        except TransactionFailed as e:
            if e.reason == ConsulReason.CONFLICT:
                continue  # another writer changed a chunk meanwhile: read again (adding twice is harmless)
            raise
        break
    else:
        raise CASConflict(f"cluster {cluster!r}: its revocation list kept changing meanwhile; run again")
    moved = set(config.revoked)
    left = config.revoked
    if moved:
        new, _ = update_config(store, cluster, lambda c: dataclasses.replace(
            c, revoked=tuple(s for s in c.revoked if s not in moved)), sign)
        left = new.revoked
    return Revoked(change.revocations, [s for s in change.added if s not in moved], change.pruned,
                   sorted(moved), left)


def revocation_list(store: ConsulStore, cluster: str) -> tuple[Revocations, tuple[str, ...]]:
    """The cluster's revocation list as stored: the chunks' serials, and the config's own list."""
    config = load_cluster_config(store, cluster)
    _, items = store.list(layout.revoked_prefix(cluster))
    try:
        return stored_chunks(cluster, items).revocations, config.revoked
    except InvalidRecord as e:
        raise EnrollError(e.field, f"{e.key}: {e.reason}", "fix or delete that key") from None


def _certificates(store: ConsulStore, cluster: str) -> list[object]:
    """The certificates live records and leases of the cluster carry (unchecked)."""
    docs: list[object] = []
    _, items = store.list(layout.nodes_prefix(cluster))
    for key, item in items.items():
        try:
            docs.append(NodeRecord.from_json(item.value, key).certificate)
        except InvalidRecord:
            pass
    _, items = store.list(layout.ipam_prefix(cluster))
    for key, item in items.items():
        try:
            held = parse_lease(item.value, key)
        except InvalidRecord:
            continue
        if held.doc is not None:
            docs.append(held.doc.get("certificate"))
    return docs


def node_serials(store: ConsulStore, cluster: str, node: str) -> list[str]:
    """Serials of the certificates a node's live record and its leases carry."""
    found: list[str] = []
    item = store.get(layout.node_key(cluster, node))
    docs: list[object] = []
    if item is not None:
        try:
            docs.append(NodeRecord.from_json(item.value).certificate)
        except InvalidRecord:
            pass
    _, items = store.list(layout.ipam_prefix(cluster))
    for key, lease in items.items():
        try:
            held = parse_lease(lease.value, key)
        except InvalidRecord:
            continue
        if held.node == node and held.doc is not None:
            docs.append(held.doc.get("certificate"))
    for doc in docs:
        serial = doc.get("serial") if isinstance(doc, dict) else None
        if isinstance(serial, str) and serial not in found:
            found.append(serial)
    return found
