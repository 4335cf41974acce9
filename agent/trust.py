"""What this agent trusts and remembers, across restarts: its cluster's signing key (the anchor)
and the newest record it accepted of each node, and the last good version of each network policy.

The anchor is pinned by the node's own config (`cluster_signing_key`, or `cluster_key_file`:
by default cluster.pub beside key_file, which `wiremesh node enroll` writes). A node enrolled
before pinning existed and has no such file pins the key that signed its own certificate (no
other key can have). The anchor moves on from the pinned key only through a signed roll-over
(clustermesh.anchor); state_dir/anchor.json remembers where it is, and the last signing settings
accepted. state_dir/nodes-seen.json remembers each node's newest accepted key and epoch
(clustermesh.claims), so an old record written back is refused after a restart too.

state_dir/policies-good.json keeps every policy as last accepted from Consul: a record made
invalid while the agent was down must not open what its last good version closed (the
snapshot's parser stands it in for a refused value, clustermesh.policy_records); a policy
deleted from Consul goes from it with the first snapshot. It protects what this agent saw and
saved before it stopped (a state dir that took the write).

These files are small, written atomically (agent.nodestate.write_state_file) and only read back
by this agent: an unreadable one is logged and ignored (the agent then starts from its pin).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from wiremesh.clustermesh import Anchor, ClusterConfig, InvalidRecord, Policy, Seen, parse_policy, resolve_anchor
from wiremesh.errors import WiremeshError
from wiremesh.keys import CERT_DOMAIN, KeyMaterialError, NodeIdentity, VerifyKey

from .config import AgentConfig
from .errors import ConfigError
from .nodestate import write_state_file

log = logging.getLogger("wiremesh.agent")
ANCHOR_FILE = "anchor.json"
SEEN_FILE = "nodes-seen.json"
POLICIES_FILE = "policies-good.json"
MAX_PIN_BYTES = 256


def load_pin(cfg: AgentConfig, src: str = "agent.toml") -> str | None:
    """The cluster signing key this node's config or enrollment pins (base64), or None."""
    if cfg.cluster_signing_key:
        return cfg.cluster_signing_key
    path = cfg.cluster_key_path
    if cfg.cluster_key_file is None and not path.exists():
        return None
    try:
        text = path.read_bytes()[:MAX_PIN_BYTES + 1]
    except OSError as e:
        raise ConfigError(src, "cluster_key_file", f"{path}: {e.strerror or e}") from None
    try:
        if len(text) > MAX_PIN_BYTES:
            raise KeyMaterialError("too long for a public key")
        return VerifyKey.from_base64(text.decode("ascii", "replace").strip(), "cluster_key_file").base64
    except KeyMaterialError as e:
        raise ConfigError(src, "cluster_key_file", f"{path}: not a signing public key "
                                                   f"({str(e).split(': ', 1)[-1]})") from None


def pin_from_certificate(identity: NodeIdentity, config: ClusterConfig) -> str | None:
    """Of the keys `config` names, the one that signed this node's own certificate (or None)."""
    cert = identity.certificate
    for k in (config.signing_key, config.next_signing_key):
        if not k:
            continue
        try:
            VerifyKey.from_base64(k, "signing_key").verify(CERT_DOMAIN, cert.body(), cert.signature, "certificate")
        except KeyMaterialError:
            continue
        return k
    return None


class TrustState:
    """The anchor and the nodes seen, as saved in the state dir."""

    def __init__(self, state_dir: Path, cluster: str) -> None:
        self.anchor_file = state_dir / ANCHOR_FILE
        self.seen_file = state_dir / SEEN_FILE
        self.policies_file = state_dir / POLICIES_FILE
        self.cluster = cluster

    def _read(self, path: Path) -> dict[str, object] | None:
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("state dir: %s unreadable (%s); ignored", path, e)
            return None
        return d if isinstance(d, dict) else None

    def load_anchor(self) -> Anchor | None:
        d = self._read(self.anchor_file)
        if d is None:
            return None
        try:
            return Anchor.from_dict(d)
        except (KeyError, TypeError, ValueError, InvalidRecord, WiremeshError) as e:
            log.warning("state dir: %s is not an anchor (%s); starting from the pinned key", self.anchor_file, e)
            return None

    def save_anchor(self, anchor: Anchor) -> bool:
        return write_state_file(self.anchor_file, json.dumps(anchor.to_dict(), indent=1, sort_keys=True) + "\n")

    def _entries(self, path: Path, field: str) -> dict[str, object]:
        """`field` of a {"cluster": ..., field: {...}} file of this cluster ({} if not that)."""
        d = self._read(path)
        if d is None or d.get("cluster") != self.cluster or not isinstance(d.get(field), dict):
            return {}
        return d[field]  # type: ignore[return-value]

    def _write_entries(self, path: Path, field: str, entries: Mapping[str, object]) -> bool:
        return write_state_file(path, json.dumps({"cluster": self.cluster, field: entries}, separators=(",", ":")) + "\n")

    def load_seen(self) -> dict[str, Seen]:
        seen: dict[str, Seen] = {}
        for name, v in self._entries(self.seen_file, "nodes").items():
            try:
                seen[str(name)] = Seen.from_dict(v)
            except ValueError:
                continue
        return seen

    def save_seen(self, seen: Mapping[str, Seen]) -> bool:
        return self._write_entries(self.seen_file, "nodes", {n: s.to_dict() for n, s in sorted(seen.items())})

    def load_policies(self) -> dict[str, Policy]:
        """The policies last in force (record key -> policy); one that no longer parses is dropped."""
        out: dict[str, Policy] = {}
        for key, doc in self._entries(self.policies_file, "policies").items():
            try:  # (as a document: a record near the size limit must not be dropped for it here)
                out[str(key)] = parse_policy(doc, str(key))
            except InvalidRecord as e:
                log.warning("state dir: %s: %s; dropped", self.policies_file, e)
        return out

    def save_policies(self, policies: Mapping[str, Policy]) -> bool:
        return self._write_entries(self.policies_file, "policies", {
            k: {**p.as_dict(), **({"signature": p.signature} if p.signature else {})} for k, p in sorted(policies.items())})


def pin_anchor(trust: TrustState, pin: str | None, identity: NodeIdentity | None,
               config: ClusterConfig) -> Anchor | None:
    """The anchor at start-up: pinned by config or enrollment (as it moved on since: saved); with
    no pin, the saved one; else the key that signed this node's own certificate; else None."""
    saved = trust.load_anchor()
    if saved is not None and saved.cluster != trust.cluster:
        saved = None
    if pin is None and saved is not None:
        pin = saved.pinned
    if pin is None and identity is not None:
        pin = pin_from_certificate(identity, config)
        if pin is not None:
            log.info("pinned cluster signing key %s: it signed this node's certificate",
                     VerifyKey.from_base64(pin).fingerprint)
    if pin is None:
        if config.require_signed:
            log.warning("no cluster signing key pinned (cluster_key_file): this cluster's signing settings are "
                        "taken from Consul unchecked")
        return None
    anchor = resolve_anchor(trust.cluster, pin, saved)
    if anchor != saved:
        trust.save_anchor(anchor)
    log.info("cluster signing key %s pinned (signing settings accepted up to serial %d)", anchor.fingerprint,
             anchor.serial)
    return anchor
