"""Rolling a cluster's signing key over to a new one without downtime (clustermesh.anchor).

1. `announce`: the config names the new key as `next_signing_key`, signed by both keys. Agents
   accept certificates of either key, and an agent pinned to either key accepts the settings.
2. Every node is enrolled again with the new key (`wiremesh node enroll` picks it); agents take
   the new certificate and cluster.pub live, and sign their next record with it.
3. `commit`: `signing_key` = the new key, signed by both keys: an agent whose anchor is the old
   key moves it to the new one. Refused (unless forced) while a live record or lease still
   carries a certificate of the old key only (that node would be cut), or while a rotation
   vouched for by the old key only is under way (it would stall). Before the config changes,
   the service definitions are signed again with the new key (during the announcement either
   key vouches, after it only the new one: unsigned again they would vanish from every agent);
   after it, finished rotation records that only the old key vouches for (history, refused
   from then on) are deleted.

The operator's files: the new key is kept beside the current one as CLUSTER.next.key while the
roll-over is under way; the commit makes it CLUSTER.key and keeps the old one as CLUSTER.old.key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from wiremesh.keys import SigningKey, read_signing_key

from . import layout
from .clusters import load_cluster_config
from .control import sign_service
from .enroll import EnrollError, check_signing_key, update_config
from .errors import InvalidRecord
from .records import ClusterConfig
from .rotation import Rotation
from .services import ServiceDef
from .snapshot import parse_cluster
from .store import ConsulStore


def next_key_path(path: Path) -> Path:
    """Where the key being rolled over to is kept beside the current key file."""
    return path.with_name(path.name.removesuffix(".key") + ".next.key")


def old_key_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".key") + ".old.key")


def cluster_signers(config: ClusterConfig, path: Path) -> list[SigningKey]:
    """The keys a change of `config`'s signing settings is signed with: the one in `path` (the
    cluster's signing key, checked), and during a roll-over the next one beside it."""
    key = read_signing_key(path)
    check_signing_key(config, key, "--key")
    keys = [key]
    if config.next_signing_key:
        nxt_path = next_key_path(path)
        other = read_signing_key(nxt_path) if nxt_path.exists() else None
        pubs = {k.public_key().base64 for k in keys + ([other] if other else [])}
        if other is None or {config.signing_key, config.next_signing_key} != pubs:
            raise EnrollError("--key", f"cluster {config.name!r} is rolling its signing key over: a change is "
                              f"signed by both keys ({path} and {nxt_path})",
                              f"finish it first: wiremesh cluster roll-signing-key {config.name} --commit")
        keys.append(other)
    return keys


def announce(store: ConsulStore, cluster: str, current: SigningKey, new: SigningKey) -> tuple[ClusterConfig, bool]:
    """Step 1: `new` becomes the cluster's next signing key (its certificates are valid from now)."""
    config = load_cluster_config(store, cluster)
    check_signing_key(config, current, "--key")
    if current.public_key() == new.public_key():
        raise EnrollError("--new", "is the cluster's current signing key")
    if config.next_signing_key not in ("", new.public_key().base64):
        raise EnrollError("--new", f"cluster {cluster!r} is already rolling over to another key",
                          "commit that roll-over first (or announce with that key again)")
    return update_config(store, cluster, lambda c: dataclasses.replace(c, next_signing_key=new.public_key().base64),
                         [current, new])


@dataclass
class OldKeyOnly:
    """What only the current key vouches for: the commit's obstacles and its work."""

    records: list[str] = field(default_factory=list)  # live node records and leases (their nodes would be cut)
    services: list[str] = field(default_factory=list)  # service definitions (signed again before the commit)
    active: list[str] = field(default_factory=list)  # rotations under way (they would stall)
    finished: list[str] = field(default_factory=list)  # finished rotation records (deleted after the commit)


def old_key_only(store: ConsulStore, config: ClusterConfig, now: float) -> OldKeyOnly:
    """The cluster's values that the next key alone would refuse (a trial parse with it)."""
    trial = dataclasses.replace(config, signing_key=config.next_signing_key, next_signing_key="",
                                require_signed=True, settings_signatures=())
    index, items = store.list(layout.cluster_prefix(config.name))
    items = {k: v for k, v in items.items() if k != layout.config_key(config.name)}
    snap = parse_cluster(config.name, index, items, last_config=trial, now=now)
    nodes, services, rotations = (layout.nodes_prefix(config.name), layout.services_prefix(config.name),
                                  layout.rotations_prefix(config.name))
    out = OldKeyOnly()
    for r in snap.rejected:
        if r.key.startswith(nodes) and "forged" in r.reason and "certificate" in r.reason:
            out.records.append(r.key)
        elif r.key.startswith(services):
            out.services.append(r.key)
        elif r.key.startswith(rotations):
            try:
                active = Rotation.from_json(items[r.key].value).active
            except InvalidRecord:
                continue  # refused under either key: not the roll-over's business
            (out.active if active else out.finished).append(r.key)
    return out


def old_certificates(store: ConsulStore, config: ClusterConfig, now: float) -> list[str]:
    """Keys of live node records whose certificates only the current key signed (a lease of the
    old key is not needed by a node whose record carries a new certificate)."""
    return old_key_only(store, config, now).records


@dataclass
class Committed:
    config: ClusterConfig
    changed: bool
    cut: list[str] = field(default_factory=list)  # records left on the old key (--force)
    resigned: list[str] = field(default_factory=list)  # service definitions signed with the new key
    dropped: list[str] = field(default_factory=list)  # finished rotation records deleted


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")


def commit(store: ConsulStore, cluster: str, current: SigningKey, new: SigningKey, now: float,
           force: bool = False) -> Committed:
    """Step 3: `new` becomes the cluster's signing key."""
    config = load_cluster_config(store, cluster)
    if config.signing_key == new.public_key().base64:
        return Committed(config, False)  # committed already
    check_signing_key(config, current, "--key")
    if config.next_signing_key != new.public_key().base64:
        raise EnrollError("--new", f"is not the next signing key cluster {cluster!r} announced",
                          f"announce it first: wiremesh cluster roll-signing-key {cluster} --new FILE")
    left = old_key_only(store, config, now)
    if left.records and not force:
        raise EnrollError("--commit", f"{len(left.records)} live record(s) or lease(s) still carry a certificate of "
                          f"the old key only: {_shown(left.records)}",
                          "enroll those nodes again (wiremesh node enroll), or pass --force to cut them")
    if left.active and not force:
        raise EnrollError("--commit", f"{len(left.active)} rotation(s) vouched for by the old key only are under "
                          f"way: {_shown(left.active)}", "wait for them to end (wiremesh keys rotate NODE --wait), "
                          "or pass --force to stall them")
    resigned = [key for key in left.services if _resign_service(store, key, new)]
    new_cfg, changed = update_config(
        store, cluster, lambda c: dataclasses.replace(c, signing_key=new.public_key().base64, next_signing_key=""),
        [current, new])
    dropped = []
    if changed:
        _, items = store.list(layout.rotations_prefix(cluster))
        for key in left.finished:
            item = items.get(key)
            if item is not None and store.delete(key, cas=item.modify_index):
                dropped.append(key)
    return Committed(new_cfg, changed, left.records, resigned, dropped)


def _resign_service(store: ConsulStore, key: str, new: SigningKey) -> bool:
    """Sign the definition at `key` with `new` (compare-and-set on what was read); False if it is
    gone or not a definition (left as it is: refused either way)."""
    item = store.get(key)
    if item is None:
        return False
    try:
        svc = ServiceDef.from_json(item.value, key)
    except InvalidRecord:
        return False
    return bool(store.put(key, sign_service(svc, new).to_json(), cas=item.modify_index))


def promote_key_files(path: Path) -> None:
    """After a commit: the next key file becomes the current one, the old one is kept beside it."""
    nxt = next_key_path(path)
    if nxt.exists():
        os.replace(path, old_key_path(path))
        os.replace(nxt, path)
