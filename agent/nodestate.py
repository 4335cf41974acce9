"""The node's state file (state_dir/state.json): its cluster config, pod CIDR and pod MTU.

The agent writes it after every change it learns from Consul, so that a restart while Consul
is down (or holds something invalid) starts from what worked; the CNI plugin reads the pod
CIDR and MTU from it. Written atomically (temporary file, then rename).

A node with a certificate leases the CIDR its certificate names, with a signed lease
(clustermesh.ipam.lease_certified).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from wiremesh.clustermesh import (ClusterConfig, ConsulError, ConsulStore, ConsulUnavailable, InvalidRecord,
                                  lease_certified, lease_pod_cidr, load_cluster_config, overlay_address)
from wiremesh.errors import WiremeshError
from wiremesh.keys import NodeIdentity

log = logging.getLogger("wiremesh.agent")
BACKOFF_MAX_S = 5.0


def load_node_state(path: Path, cluster: str, node: str) -> tuple[ClusterConfig, str, int | None] | None:
    """(config, pod CIDR, pod MTU) as last saved for this cluster and node; None if unusable."""
    try:
        d = json.loads(path.read_text())
        if d.get("cluster") != cluster or d.get("node") != node:
            return None
        mtu = d.get("pod_mtu")
        return ClusterConfig.from_json(json.dumps(d["config"])), str(d["pod_cidr"]), mtu if isinstance(mtu, int) else None
    except (OSError, ValueError, KeyError, TypeError, WiremeshError):
        return None


def save_node_state(path: Path, cluster: str, node: str, config: ClusterConfig, pod_cidr: str,
                    pod_mtu: int | None) -> bool:
    d = {"cluster": cluster, "node": node, "pod_cidr": pod_cidr, "overlay_ip": overlay_address(pod_cidr),
         "pod_mtu": pod_mtu, "config": json.loads(config.to_json())}
    return write_state_file(path, json.dumps(d, indent=1) + "\n")


_unwritable: dict[Path, str] = {}


def write_state_file(path: Path, text: str) -> bool:
    """Write a small state file atomically; False (logged once per file and reason) if the state
    dir refuses it (full, read-only): the agent goes on from memory, the old file stays whole,
    and the next write tries again. The state dir is a cache of what Consul holds: losing a
    write costs a slower start after the next restart, never the dataplane."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        why = e.strerror or str(e)
        if _unwritable.get(path) != why:
            _unwritable[path] = why
            log.warning("state dir: cannot save %s (%s); going on from memory", path, why)
        return False
    if _unwritable.pop(path, None) is not None:
        log.info("state dir: %s saved again", path)
    return True


def bootstrap(store: ConsulStore, cluster: str, node: str, path: Path, stop: threading.Event,
              identity: NodeIdentity | None = None) -> tuple[ClusterConfig, str, int | None] | None:
    """The cluster config and this node's pod-CIDR lease, from Consul (saved to `path`).

    Waits for an unreachable Consul (backing off, up to 5 s between tries) unless a saved copy
    lets the node go on: one that has run before starts from it, so neither a Consul outage nor
    a bad write there blocks a restart. None if `stop` was set while waiting.
    """
    cached = load_node_state(path, cluster, node)
    if cached is not None and identity is not None and cached[1] != identity.certificate.pod_cidr:
        cached = None  # enrolled (again) for another CIDR: the saved lease is no longer this node's
    got: list[tuple[ClusterConfig, str, int | None]] = []

    def attempt() -> None:
        try:
            config = load_cluster_config(store, cluster)
            if identity is not None:
                pod_cidr = lease_certified(store, config, identity, time.time())
            else:
                pod_cidr = lease_pod_cidr(store, config, node)
            mtu = cached[2] if cached else None
            save_node_state(path, cluster, node, config, pod_cidr, mtu)
            got.append((config, pod_cidr, mtu))
        except (ConsulError, InvalidRecord, ValueError) as e:
            if cached is None:
                raise
            log.warning("Consul: %s; starting from the cached lease %s", e, cached[1])
            got.append(cached)

    def waiting(state: RetryCallState) -> None:
        log.warning("waiting for Consul: %s (retry in %.1fs)", state.outcome.exception() if state.outcome else "?",
                    state.upcoming_sleep)

    def sleep(seconds: float) -> None:
        stop.wait(seconds)  # SIGTERM ends the wait at once

    try:
        Retrying(retry=retry_if_exception_type(ConsulUnavailable), wait=wait_exponential(0.2, max=BACKOFF_MAX_S),
                 stop=lambda _: stop.is_set(), sleep=sleep, before_sleep=waiting, reraise=True)(attempt)
    except ConsulUnavailable:
        if stop.is_set():
            return None
        raise
    return got[-1]
