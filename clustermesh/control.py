"""Signed control inputs: the values besides node records that steer traffic, and who vouches for them.

In a cluster with `require_signed` (clustermesh.signed), beside its node records and leases:

- a service definition (`services/<name>`) carries `signature`: the operator's, made with the
  cluster's signing key over the canonical JSON of everything else in the record;
- a rotation request (`rotations/<node>`, state `requested`) carries `request_signature`: the
  operator's over (cluster, node, id, requested_at), or the node's own identity key's for a
  request the node made on the cluster's `rotate_every` schedule. Once the node's agent writes
  its progress, the record also carries the node's certificate and `node_signature`, its
  identity key's over everything else (the request's signature included);
- a readiness word (`ready/<cluster>/<peer>/<rc>/<rnode>`) carries `signature`: the peer's
  identity key's over its word and the key's meaning (whose word, for whose rotation), checked
  against the certificate in the peer's accepted record;
- a service backend (a Consul catalog instance: nothing there is signed) counts only if its
  address lies in the pod CIDR of a node the cluster certified, or is such a node's own
  address: a stray catalog registration never captures a VIP.

A value that fails is refused with its field and reason, and its key keeps the last good value
the agent saw there (`ControlMemo`). A cluster without `require_signed` checks none of this
(signatures are written when the writer has a key, never required): it works as before.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from wiremesh.keys import Certificate, CertificateError, NodeIdentity, SigningKey, VerifyKey

from .errors import InvalidRecord
from .records import ClusterConfig, NodeRecord
from .rotation import Rotation, RotationReady
from .policy import Policy
from .services import ServiceDef
from .signed import ClusterKeys, _certificate, _signed_by, check_valid, keys_id

# Domain tags: a signature made for one kind of document is never valid for another.
SERVICE_DOMAIN = b"wiremesh-service-v1\n"
POLICY_DOMAIN = b"wiremesh-policy-v1\n"
REQUEST_DOMAIN = b"wiremesh-rotation-request-v1\n"
PROGRESS_DOMAIN = b"wiremesh-rotation-v1\n"
READY_DOMAIN = b"wiremesh-rotation-ready-v1\n"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Trust:
    """What a signed cluster's control inputs are checked against."""

    config: ClusterConfig  # require_signed, revocations
    # The cluster's signing key, and during a roll-over's announcement the next one too (either
    # vouches: the operator re-signs with the new key before the commit drops the old; None:
    # nothing can verify, all refused).
    operator: ClusterKeys | None
    now: float  # unix seconds, for certificates' validity

    @property
    def cluster(self) -> str:
        return self.config.name


def _operator_verify(trust: Trust, domain: bytes, doc: Any, signature: str, field: str, key: str | None) -> None:
    """Raise CertificateError unless one of the cluster's signing keys signed `doc`."""
    if trust.operator is None:
        raise InvalidRecord(field, f"cluster {trust.cluster!r} has no signing_key to check it against", key)
    keys: tuple[VerifyKey, ...] = trust.operator if isinstance(trust.operator, tuple) else (trust.operator,)
    for i, ck in enumerate(keys):
        try:
            ck.verify(domain, doc, signature, field)
            return
        except CertificateError:
            if i == len(keys) - 1:
                raise


# --- operator-signed definitions: services, network policies ------------------------------------
Signable = TypeVar("Signable", ServiceDef, Policy)
_DOMAINS: dict[type, tuple[bytes, str]] = {ServiceDef: (SERVICE_DOMAIN, "service definitions"),
                                           Policy: (POLICY_DOMAIN, "policies")}


def _operator_sign(obj: Signable, key: SigningKey) -> Signable:
    """`obj` signed by the operator's `key` (the signing key of the cluster it is stored in)."""
    unsigned = replace(obj, signature="")
    return replace(unsigned, signature=key.sign(_DOMAINS[type(obj)][0], json.loads(unsigned.to_json())))


def _operator_check(trust: Trust, raw: bytes | str, obj: ServiceDef | Policy, key: str | None) -> None:
    """Raise InvalidRecord("signature") unless the cluster's signing key signed `obj` (as `raw`)."""
    domain, what = _DOMAINS[type(obj)]
    if not obj.signature:
        raise InvalidRecord("signature", f"missing: cluster {trust.cluster!r} requires {what} signed by its "
                                         "operator", key)
    doc = json.loads(raw)  # parsed before by from_json: a JSON object within the size limit
    doc.pop("signature", None)
    try:
        _operator_verify(trust, domain, doc, obj.signature, "signature", key)
    except CertificateError as e:
        raise InvalidRecord("signature", _forged(e, "the cluster's signing key"), key) from None


def sign_service(svc: ServiceDef, key: SigningKey) -> ServiceDef:
    return _operator_sign(svc, key)


def verify_service(trust: Trust, raw: bytes | str, svc: ServiceDef, key: str | None = None) -> None:
    _operator_check(trust, raw, svc, key)


def sign_policy(policy: Policy, key: SigningKey) -> Policy:
    return _operator_sign(policy, key)


def verify_policy(trust: Trust, raw: bytes | str, policy: Policy, key: str | None = None) -> None:
    _operator_check(trust, raw, policy, key)


# --- rotation requests and progress -------------------------------------------------------------
def request_body(rot: Rotation, cluster: str) -> dict[str, Any]:
    """What a rotation request's signature covers."""
    return {"cluster": cluster, "node": rot.node, "id": rot.id, "requested_at": rot.requested_at}


def sign_request(rot: Rotation, cluster: str, key: SigningKey) -> Rotation:
    """A request signed by `key`: the operator's signing key, or the node's identity key (its own
    scheduled request)."""
    return replace(rot, request_signature=key.sign(REQUEST_DOMAIN, request_body(rot, cluster)))


def rotation_value(rot: Rotation, identity: NodeIdentity | None) -> str:
    """The stored form of a rotation record the node writes: with its certificate and signature
    if it has an identity (an unsigned node writes it as it always did)."""
    if identity is None:
        return rot.to_json()
    unsigned = replace(rot, certificate=identity.certificate.to_dict(), node_signature="")
    signed = replace(unsigned, node_signature=identity.sign(PROGRESS_DOMAIN, json.loads(unsigned.to_json())))
    return signed.to_json()


def verify_rotation(trust: Trust, raw: bytes | str, rot: Rotation, key: str | None = None) -> Certificate | None:
    """The checks of a rotation record that need no clock; the node's certificate if it carries one
    (check_valid then), None for a request as the operator wrote it."""
    cert = None
    if rot.certificate is not None or rot.node_signature:
        cert = _certificate(rot.certificate, trust.operator, trust.cluster, key)
        if cert.node != rot.node:
            raise InvalidRecord("certificate", f"is node {cert.node!r}'s, not {rot.node!r}'s", key)
        doc = json.loads(raw)  # parsed before by Rotation.from_json
        doc.pop("node_signature", None)
        _signed_by(cert, PROGRESS_DOMAIN, doc, rot.node_signature, "node_signature", key)
    elif rot.state != "requested":
        raise InvalidRecord("node_signature", f"missing: the progress of a rotation ({rot.state}) is signed by "
                                              "the node that rotates", key)
    if not rot.request_signature:
        raise InvalidRecord("request_signature", f"missing: cluster {trust.cluster!r} requires rotation requests "
                                                 "signed by its operator", key)
    body = request_body(rot, trust.cluster)
    try:
        _operator_verify(trust, REQUEST_DOMAIN, body, rot.request_signature, "request_signature", key)
    except (CertificateError, InvalidRecord) as e:
        if cert is None:
            raise InvalidRecord("request_signature", _forged(e, "the cluster's signing key"), key) from None
        try:  # a request the node made itself (the cluster's rotate_every)
            cert.identity.verify(REQUEST_DOMAIN, body, rot.request_signature, "request_signature")
        except CertificateError as e2:
            raise InvalidRecord("request_signature", _forged(e2, "the cluster's signing key nor the node's"),
                                key) from None
    return cert


# --- readiness words ----------------------------------------------------------------------------
def ready_body(ready: RotationReady, peer: str, rotating: str) -> dict[str, Any]:
    """What a readiness word's signature covers: the word, whose it is ("cluster/peer") and for
    whose rotation ("cluster/node"), so that it cannot be moved to another key."""
    return {"next_public_key": ready.next_public_key, "switch_at": ready.switch_at, "peer": peer,
            "rotating": rotating}


def ready_value(ready: RotationReady, peer: str, rotating: str, identity: NodeIdentity | None) -> str:
    """The stored form of `peer`'s readiness for `rotating`'s rotation, signed if it has an identity."""
    if identity is None:
        return ready.to_json()
    return replace(ready, signature=identity.sign(READY_DOMAIN, ready_body(ready, peer, rotating))).to_json()


def verify_ready(ready: RotationReady, peer: str, rotating: str, record: NodeRecord | None,
                 key: str | None = None) -> None:
    """Raise InvalidRecord unless `peer`'s certified identity (the certificate of its accepted
    `record`, which the cluster's snapshot checked) signed this word."""
    if record is None or record.certificate is None:
        raise InvalidRecord("signature", f"{peer} has no certified record to check its word against", key)
    if not ready.signature:
        raise InvalidRecord("signature", f"missing: {peer}'s cluster requires readiness signed by its node", key)
    try:
        cert = Certificate.from_dict(record.certificate)
        cert.verify_signed(READY_DOMAIN, ready_body(ready, peer, rotating), ready.signature)
    except CertificateError as e:
        raise InvalidRecord("signature", _forged(e, f"{peer}'s identity key"), key) from None


# --- service backends ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Certified:
    """Where a signed cluster's service backends may be: its certified nodes' pod CIDRs and own addresses."""

    networks: frozenset[Network] = frozenset()
    addresses: frozenset[str] = frozenset()

    def admits(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if str(ip) in self.addresses:
            return True
        # Node CIDRs of a cluster share one prefix length: one lookup per length, not per node.
        for plen in {n.prefixlen for n in self.networks if n.version == ip.version}:
            if ipaddress.ip_network(f"{ip}/{plen}", strict=False) in self.networks:
                return True
        return False


def certified(nodes: Mapping[str, NodeRecord]) -> Certified:
    """The backends' places of a signed cluster's accepted records (each checked, certificate and all)."""
    nets: set[Network] = set()
    addrs: set[str] = set()
    for rec in nodes.values():
        if rec.certificate is None:
            continue
        nets.add(ipaddress.ip_network(rec.pod_cidr))
        host = rec.endpoint.rpartition(":")[0].strip("[]")
        try:
            addrs.add(str(ipaddress.ip_address(host)))
        except ValueError:
            pass
    return Certified(frozenset(nets), frozenset(addrs))


# --- one watch's memory ---------------------------------------------------------------------------
class ControlMemo:
    """Between one watch's snapshots: signature checks by value (Ed25519 costs ~100 us a check and
    a snapshot comes with every write to the cluster), and each key's last good value. Both are
    forgotten when the cluster's signing key or requirement changes (a value accepted unsigned
    is no last good value once signatures are required)."""

    def __init__(self) -> None:
        self.services: dict[str, ServiceDef] = {}
        self.rotations: dict[str, Rotation] = {}
        self._checked: dict[str, tuple[bytes | str, Certificate | InvalidRecord | None]] = {}
        self._tag: tuple[bool, str] | None = None

    def use(self, config: ClusterConfig | None) -> None:
        tag = (config.require_signed, keys_id(config)) if config is not None else None
        if tag != self._tag:
            self._tag = tag
            self.services, self.rotations, self._checked = {}, {}, {}

    def _check(self, key: str, raw: bytes | str, check: Callable[[], Certificate | None]) -> Certificate | None:
        hit = self._checked.get(key)
        if hit is None or hit[0] != raw:
            try:
                result: Certificate | InvalidRecord | None = check()
            except InvalidRecord as e:
                result = e
            hit = self._checked[key] = (raw, result)
        if isinstance(hit[1], InvalidRecord):
            raise hit[1]
        return hit[1]

    def service_check(self, trust: Trust) -> Callable[[str, bytes, ServiceDef], None]:
        def check(key: str, raw: bytes, svc: ServiceDef) -> None:
            self._check(key, raw, lambda: verify_service(trust, raw, svc, key))
        return check

    def rotation_check(self, trust: Trust) -> Callable[[str, bytes, Rotation], None]:
        def check(key: str, raw: bytes, rot: Rotation) -> None:
            cert = self._check(key, raw, lambda: verify_rotation(trust, raw, rot, key))
            if cert is not None:
                check_valid(cert, trust.config, trust.now, key)
            before = self.rotations.get(key)
            if before is not None and rot.id != before.id and rot.requested_at < before.requested_at:
                raise InvalidRecord("request_signature", f"replayed: rotation {rot.id} was requested before rotation "
                                                         f"{before.id}, seen already", key)
        return check

    def sweep(self, keys: set[str]) -> None:
        self._checked = {k: v for k, v in self._checked.items() if k in keys}


def _forged(e: Exception, by: str) -> str:
    reason = getattr(e, "reason", str(e))
    return f"forged: not signed by {by}" if "does not verify" in reason else reason
