"""Signed records in the lab: each cluster's signing key in the lab's directory, and each node
enrolled as it is added (its identity key and certificate beside its WireGuard key, where the
agent looks for them by default).

A lab is signed unless it was made with `signed=False`: its clusters then accept unsigned
records, as clusters made before signing existed do (what a migration starts from).

The lab is also the operator: what it writes besides records (service definitions) it signs
with a cluster's key when there is one, and commands run in its nodes and hubs (`lab exec`)
find that key in WIREMESH_SIGNING_KEY, as in the operator's own shell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from wiremesh.clustermesh import ClusterConfig, Rotation, enroll, sign_request, sign_settings
from wiremesh.keys import SigningKey, load_or_generate_signing_key, read_signing_key

if TYPE_CHECKING:
    from .lab import Lab, Node

VALIDITY_S = 30 * 86400


def signed(lab: "Lab") -> bool:
    """Whether the lab's clusters require signed records (kept in its state from the first ask)."""
    if "signed" not in lab.state:
        # A lab made before signing existed has nodes already, and unsigned clusters.
        lab.state["signed"] = False if lab.state.get("nodes") else getattr(lab, "signed", True)
    return bool(lab.state["signed"])


def key_path(lab: "Lab", cluster: str) -> Path:
    return lab.dir / f"signing-{cluster}.key"


def cluster_config(lab: "Lab", cfg: ClusterConfig) -> ClusterConfig:
    """`cfg` signed by the lab's key for its cluster (created on first use), if the lab is signed."""
    if not signed(lab):
        return cfg
    key, _ = load_or_generate_signing_key(key_path(lab, cfg.name))
    return sign_settings(dataclasses.replace(cfg, require_signed=True, signing_key=key.public_key().base64), [key])


def operator_key(lab: "Lab", cluster: str) -> SigningKey | None:
    """The cluster's signing key, if it has one (signed service definitions, rotation requests)."""
    path = key_path(lab, cluster)
    return read_signing_key(path) if path.exists() else None


def operator_request(lab: "Lab", cluster: str, rot: Rotation) -> Rotation:
    """A rotation request as the operator writes it: signed with the cluster's key if it has one."""
    key = operator_key(lab, cluster)
    return sign_request(rot, cluster, key) if key is not None else rot


def env(lab: "Lab", cluster: str) -> list[str]:
    """WIREMESH_SIGNING_KEY for a command run in the lab, if the cluster has a signing key."""
    path = key_path(lab, cluster)
    return [f"WIREMESH_SIGNING_KEY={path}"] if path.exists() else []


def answer_key_file(lab: "Lab", cluster: str) -> str | None:
    """The signing key file the setup wizard is given for `cluster` (None: an unsigned lab)."""
    return str(key_path(lab, cluster)) if signed(lab) else None


def cert_path(node: "Node") -> Path:
    return Path(node.dir) / "node.crt"


def anchor_path(node: "Node") -> Path:
    return Path(node.dir) / "cluster.pub"


def identity_path(node: "Node") -> Path:
    return Path(node.dir) / "identity.key"


def enroll_node(lab: "Lab", node: "Node", cidr: str | None = None, key: Path | None = None) -> str | None:
    """Enroll `node` as `wiremesh node enroll` would: its certificate (node.crt), the cluster key
    that signed it (cluster.pub) and its CIDR reserved with a signed lease. `key`: another
    signing key file than the lab's (a roll-over). Nothing for a node of an unsigned cluster, unless its cluster
    has a signing key (a migration's step). Returns the certified CIDR."""
    cluster = node.cluster or lab.clusters[0]
    path = key or key_path(lab, cluster)
    if not signed(lab) and not path.exists():
        return None
    ca, _ = load_or_generate_signing_key(path)
    identity, _ = load_or_generate_signing_key(identity_path(node))
    done = lab.consul(lambda s: enroll(s, cluster, node.name, ca, identity.public_key(), time.time(), cidr,
                                       VALIDITY_S, identity), cluster)
    # The certificate, and the cluster key that signed it (the agent pins it: agent.trust).
    for out, text in ((cert_path(node), json.dumps(done.certificate.to_dict(), indent=1, sort_keys=True) + "\n"),
                      (anchor_path(node), done.cluster_key + "\n")):
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    return done.certificate.pod_cidr
