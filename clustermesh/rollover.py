"""Rolling a cluster's signing key over to a new one without downtime (clustermesh.anchor).

1. `announce`: the config names the new key as `next_signing_key`, signed by both keys. Agents
   accept certificates of either key, and an agent pinned to either key accepts the settings.
2. Every node is enrolled again with the new key (`wiremesh node enroll` picks it); agents take
   the new certificate and cluster.pub live, and sign their next record with it.
3. `commit`: `signing_key` = the new key, signed by both keys: an agent whose anchor is the old
   key moves it to the new one. Refused (unless forced) while a live record or lease still
   carries a certificate of the old key only: that node would be cut.

The operator's files: the new key is kept beside the current one as CLUSTER.next.key while the
roll-over is under way; the commit makes it CLUSTER.key and keeps the old one as CLUSTER.old.key.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from wiremesh.keys import SigningKey, read_signing_key

from . import layout
from .clusters import load_cluster_config
from .enroll import EnrollError, check_signing_key, update_config
from .records import ClusterConfig
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


def old_certificates(store: ConsulStore, config: ClusterConfig, now: float) -> list[str]:
    """Keys of live node records whose certificates only the current key signed (a lease of the
    old key is not needed by a node whose record carries a new certificate)."""
    trial = dataclasses.replace(config, signing_key=config.next_signing_key, next_signing_key="",
                                require_signed=True, settings_signatures=())
    index, items = store.list(layout.cluster_prefix(config.name))
    items = {k: v for k, v in items.items() if k != layout.config_key(config.name)}
    snap = parse_cluster(config.name, index, items, last_config=trial, now=now)
    nodes = layout.nodes_prefix(config.name)
    return [r.key for r in snap.rejected if r.key.startswith(nodes) and "forged" in r.reason and "certificate" in r.reason]


def commit(store: ConsulStore, cluster: str, current: SigningKey, new: SigningKey, now: float,
           force: bool = False) -> tuple[ClusterConfig, bool, list[str]]:
    """Step 3: `new` becomes the cluster's signing key. (config, changed, records left on the old key)."""
    config = load_cluster_config(store, cluster)
    if config.signing_key == new.public_key().base64:
        return config, False, []  # committed already
    check_signing_key(config, current, "--key")
    if config.next_signing_key != new.public_key().base64:
        raise EnrollError("--new", f"is not the next signing key cluster {cluster!r} announced",
                          f"announce it first: wiremesh cluster roll-signing-key {cluster} --new FILE")
    left = old_certificates(store, config, now)
    if left and not force:
        raise EnrollError("--commit", f"{len(left)} live record(s) or lease(s) still carry a certificate of the old "
                          f"key only: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}",
                          "enroll those nodes again (wiremesh node enroll), or pass --force to cut them")
    new_cfg, changed = update_config(
        store, cluster, lambda c: dataclasses.replace(c, signing_key=new.public_key().base64, next_signing_key=""),
        [current, new])
    return new_cfg, changed, left


def promote_key_files(path: Path) -> None:
    """After a commit: the next key file becomes the current one, the old one is kept beside it."""
    nxt = next_key_path(path)
    if nxt.exists():
        os.replace(path, old_key_path(path))
        os.replace(nxt, path)
