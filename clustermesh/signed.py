"""Signed records: what a node signs, and the checks that tell a record or lease its cluster
vouches for from one anybody with write access to Consul could have made.

A node record carries the node's certificate and `node_signature`, the node's identity-key
signature over the canonical JSON of everything else in the record (WireGuard key, next key,
endpoint, pod CIDR, unknown fields: all of it). A signed lease is a JSON object
`{"node", "pod_cidr", "certificate", "signature"}` in place of the plain node name.

In a cluster with `require_signed`, a record is accepted only if its certificate was signed by
the cluster's signing key, is valid now, is not revoked, names this cluster, the record's node
and its pod CIDR, and the node's identity key signed the record. The same holds for a lease
(its CIDR is the key's). Checks that need no clock are split from those that do, so a watch
verifies signatures only when a value or the cluster's key changes (`Verified`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass, replace
from typing import Any

from wiremesh.keys import CERT_DOMAIN, LEASE_DOMAIN, RECORD_DOMAIN, Certificate, CertificateError, NodeIdentity, VerifyKey

from .errors import InvalidRecord
from .records import MAX_RECORD_BYTES, ClusterConfig, NodeRecord, check_node_name

SIGNATURE_FIELD = "node_signature"


def sign_record(rec: NodeRecord, identity: NodeIdentity) -> NodeRecord:
    """`rec` with `identity`'s certificate, signed by its identity key."""
    unsigned = replace(rec, certificate=identity.certificate.to_dict(), node_signature="")
    return replace(unsigned, node_signature=identity.sign(RECORD_DOMAIN, json.loads(unsigned.to_json())))


def lease_value(cidr: str, identity: NodeIdentity) -> str:
    """The value of a signed lease of `cidr` for `identity`'s node."""
    doc: dict[str, Any] = {"node": identity.certificate.node, "pod_cidr": cidr,
                           "certificate": identity.certificate.to_dict()}
    doc["signature"] = identity.sign(LEASE_DOMAIN, doc)
    return json.dumps(doc, sort_keys=True)


@dataclass(frozen=True, slots=True)
class Lease:
    """One IPAM lease as stored: the owner's name, and its signed form if it has one."""

    node: str
    doc: Mapping[str, Any] | None = None  # the signed lease's JSON object; None: a plain node name

    @property
    def signed(self) -> bool:
        return self.doc is not None


def parse_lease(value: bytes, key: str | None = None) -> Lease:
    """A lease's value: a node name (unsigned), or a signed lease's JSON object."""
    if len(value) > MAX_RECORD_BYTES:
        raise InvalidRecord("value", f"{len(value)} bytes is over the {MAX_RECORD_BYTES}-byte limit", key)
    if not value.lstrip().startswith(b"{"):
        return Lease(check_node_name(value.decode("utf-8", "replace"), "value", key))
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRecord("value", "not a node name nor a signed lease (JSON)", key) from None
    if not isinstance(doc, dict):
        raise InvalidRecord("value", "a signed lease must be a JSON object", key)
    for name in doc:
        if name not in ("node", "pod_cidr", "certificate", "signature"):
            raise InvalidRecord("value", f"unknown field {str(name)[:32]!r} in a signed lease", key)
    return Lease(check_node_name(doc.get("node"), "node", key), doc)


ClusterKeys = VerifyKey | tuple[VerifyKey, ...]


def cluster_key(config: ClusterConfig) -> tuple[VerifyKey, ...] | None:
    """The keys whose certificates the cluster accepts: its signing key, and during a roll-over
    (clustermesh.anchor) the next one."""
    if not config.signing_key:
        return None
    keys = [config.signing_key] + ([config.next_signing_key] if config.next_signing_key else [])
    return tuple(VerifyKey.from_base64(k, "signing_key") for k in keys)


def keys_id(config: ClusterConfig) -> str:
    """What the checks of a certificate depend on in the config (the cache of `Verified`)."""
    return f"{config.signing_key} {config.next_signing_key}"


def _certificate(doc: object, signing_key: ClusterKeys | None, cluster: str, key: str | None) -> Certificate:
    """The certificate in `doc`, signed by the cluster (form and signature; no clock)."""
    if doc is None:
        raise InvalidRecord("certificate", f"missing: cluster {cluster!r} requires signed records", key)
    if signing_key is None:
        raise InvalidRecord("certificate", f"cluster {cluster!r} has no signing_key to check it against", key)
    keys = signing_key if isinstance(signing_key, tuple) else (signing_key,)
    try:
        cert = Certificate.from_dict(doc)
        for i, ck in enumerate(keys):
            try:
                ck.verify(CERT_DOMAIN, cert.body(), cert.signature, "certificate")
                break
            except CertificateError:
                if i == len(keys) - 1:
                    raise
    except CertificateError as e:
        where = "certificate" if e.field == "certificate" else f"certificate.{e.field}"
        reason = "forged: not signed by the cluster's signing key" if "does not verify" in e.reason else e.reason
        raise InvalidRecord(where, reason, key) from None
    if cert.cluster != cluster:
        raise InvalidRecord("certificate", f"is for cluster {cert.cluster!r}, not {cluster!r}", key)
    return cert


def _signed_by(cert: Certificate, domain: bytes, doc: Mapping[str, Any], signature: object, field: str,
               key: str | None) -> None:
    if signature in (None, ""):
        raise InvalidRecord(field, "missing: the record carries a certificate but no signature", key)
    try:
        cert.verify_signed(domain, doc, signature)
    except CertificateError as e:
        reason = "forged: not signed by the certificate's identity key" if "does not verify" in e.reason else e.reason
        raise InvalidRecord(field, reason, key) from None


def verify_record(rec: NodeRecord, raw: bytes | str, signing_key: ClusterKeys | None, key: str | None = None) -> Certificate:
    """The checks of a signed record that need no clock; its certificate if they pass."""
    if rec.certificate is None and not rec.node_signature:
        raise InvalidRecord(SIGNATURE_FIELD, f"missing: cluster {rec.cluster!r} requires signed records", key)
    cert = _certificate(rec.certificate, signing_key, rec.cluster, key)
    if cert.node != rec.name:
        raise InvalidRecord("certificate", f"is node {cert.node!r}'s, not {rec.name!r}'s", key)
    if cert.pod_cidr != rec.pod_cidr:
        raise InvalidRecord("pod_cidr", f"{rec.pod_cidr} is outside the node's certificate ({cert.pod_cidr})", key)
    doc = json.loads(raw)  # parsed before by NodeRecord.from_json: a JSON object within the size limit
    doc.pop(SIGNATURE_FIELD, None)
    _signed_by(cert, RECORD_DOMAIN, doc, rec.node_signature, SIGNATURE_FIELD, key)
    return cert


def verify_lease(lease: Lease, cidr: str, cluster: str, signing_key: ClusterKeys | None,
                 key: str | None = None) -> Certificate:
    """The checks of a signed lease that need no clock; its certificate if they pass."""
    if lease.doc is None:
        raise InvalidRecord("signature", f"missing: cluster {cluster!r} requires signed leases", key)
    cert = _certificate(lease.doc.get("certificate"), signing_key, cluster, key)
    if cert.node != lease.node:
        raise InvalidRecord("certificate", f"is node {cert.node!r}'s, not {lease.node!r}'s", key)
    if lease.doc.get("pod_cidr") != cidr or cert.pod_cidr != cidr:
        raise InvalidRecord("pod_cidr", f"{cidr} is outside the node's certificate ({cert.pod_cidr})", key)
    _signed_by(cert, LEASE_DOMAIN, {k: v for k, v in lease.doc.items() if k != "signature"},
               lease.doc.get("signature"), "signature", key)
    return cert


def check_valid(cert: Certificate, config: ClusterConfig, now: float, key: str | None = None,
                revoked: Container[str] = ()) -> None:
    """The checks that depend on the clock and on the revocation list: `revoked` (the cluster's
    list, clustermesh.revocation) and the config's own `revoked` (the layout before it)."""
    if cert.serial in revoked or cert.serial in config.revoked:
        raise InvalidRecord("certificate", f"serial {cert.serial} is revoked", key)
    # (No "now" in the reasons: a refused record is logged again only when its reason changes.)
    if now < cert.not_before:
        raise InvalidRecord("certificate", f"not valid before {_utc(cert.not_before)} (is this host's clock behind?)",
                            key)
    if now >= cert.not_after:
        raise InvalidRecord("certificate", f"expired at {_utc(cert.not_after)}", key)


def _utc(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class Verified:
    """Signature checks of a watch's records and leases, kept per key while neither the value
    (ModifyIndex) nor the cluster's signing key changes: Ed25519 costs ~100 us a check."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[int, str, Certificate | InvalidRecord]] = {}
        self._seen: set[str] = set()

    def get(self, key: str, index: int, signing_key: str, check: Any) -> Certificate:
        self._seen.add(key)
        hit = self._done.get(key)
        if hit is None or hit[0] != index or hit[1] != signing_key:
            try:
                result: Certificate | InvalidRecord = check()
            except InvalidRecord as e:
                result = e
            hit = (index, signing_key, result)
            self._done[key] = hit
        if isinstance(hit[2], InvalidRecord):
            raise hit[2]
        return hit[2]

    def sweep(self) -> None:
        """Forget keys not asked for since the last sweep (deleted records)."""
        self._done = {k: v for k, v in self._done.items() if k in self._seen}
        self._seen = set()
