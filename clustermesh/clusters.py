"""Cluster configs in Consul: create or update one, read one."""

from __future__ import annotations

from . import layout
from .errors import CASConflict, ClusterNotFound, InvalidRecord
from .records import ClusterConfig, keep_unknown
from .store import ConsulStore


def load_cluster_config(store: ConsulStore, cluster: str) -> ClusterConfig:
    key = layout.config_key(cluster)
    item = store.get(key)
    if item is None:
        raise ClusterNotFound(f"cluster {cluster!r}: no config at {key}")
    return ClusterConfig.from_json(item.value, key)


def init_cluster(store: ConsulStore, config: ClusterConfig, *, force: bool = False) -> str:
    """Write a cluster's config. Returns 'created', 'unchanged' or 'updated'.

    Idempotent: the same config again changes nothing. A different config for an existing
    cluster needs `force`, and a change of pod CIDR or node prefix is refused while any node
    holds a lease (the leases would fall outside the new range).
    """
    key = layout.config_key(config.name)
    item = store.get(key)
    if item is None:
        if not store.put(key, config.to_json(), cas=0):
            raise CASConflict(f"cluster {config.name!r}: created by someone else meanwhile; run again")
        return "created"
    try:
        current = ClusterConfig.from_json(item.value, key)
    except InvalidRecord:
        current = None
    if current == config:
        return "unchanged"
    if not force:
        raise InvalidRecord("config", f"cluster {config.name!r} exists with other settings; pass --force to update it", key)
    if current and (current.pod_cidr, current.node_prefix_len) != (config.pod_cidr, config.node_prefix_len):
        _, held = store.list(layout.ipam_prefix(config.name))
        if held:
            raise InvalidRecord("pod_cidr", f"{len(held)} node(s) hold leases in {current.pod_cidr}; it cannot change", key)
    # What a newer agent added to the config (fields this one does not know) survives the update.
    if not store.put(key, keep_unknown(config, current).to_json(), cas=item.modify_index):
        raise CASConflict(f"cluster {config.name!r}: changed by someone else meanwhile; run again")
    return "updated"
