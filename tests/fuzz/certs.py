"""The `certs` fuzz target: node certificates and signed records (issue 12, item 1).

Input: raw bytes (a certificate file or a record as a hostile writer could store it), or a
valid certificate / signed record mutated by the rest of the bytes (a field, the signature,
the expiry, the pod CIDR). Contract: a Certificate, or the keys module's own CertificateError
naming a field; a signed record that no longer matches its signature is refused by the
snapshot, never accepted; no signing key in any message.
"""

from __future__ import annotations

import json

from wiremesh.clustermesh import ClusterConfig, KVItem, NodeRecord, layout
from wiremesh.clustermesh.signed import sign_record
from wiremesh.clustermesh.snapshot import parse_cluster
from wiremesh.keys import Certificate, CertificateError, NodeIdentity, SigningKey, issue

from .oracles import Bug
from .seeds import NODE_RECORD, Reader, dumps_json, mutate

NOW = 1_700_000_000
# Fixed keys (the same bytes make the same input): the cluster's signing key and a node's identity.
CA = SigningKey(bytes([7]) * 32)
ME = SigningKey(bytes([9]) * 32)
CERT = issue(CA, "lab", "node1", ME.public_key(), "10.240.1.0/24", 86400, NOW, serial="ab" * 16)
RECORD = sign_record(NodeRecord(**{k: v for k, v in NODE_RECORD.items()}), NodeIdentity(CERT, ME))
CONFIG = ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16", require_signed=True,
                       signing_key=CA.public_key().base64)
SECRETS = (CA.secret_bytes().hex(), ME.secret_bytes().hex())


def certs(data: bytes) -> None:
    r = Reader(data)
    kind = r.below(4)
    if kind == 0:
        raw = r.rest()
        try:
            check_certificate(json.loads(raw))
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    elif kind == 1:
        check_certificate(mutate(CERT.to_dict(), r, key_fields=("identity_key", "signature")))
    else:
        doc = json.loads(RECORD.to_json())
        if kind == 2:
            doc["certificate"] = mutate(doc["certificate"], r, key_fields=("identity_key", "signature"))
        else:
            doc = mutate(doc, r, key_fields=("public_key", "next_public_key", "node_signature"))
        check_signed_record(dumps_json(doc).encode(), doc)


def check_certificate(doc: object) -> None:
    try:
        cert = Certificate.from_dict(doc)
    except CertificateError as e:
        if not e.field or any(s in str(e) for s in SECRETS):
            raise Bug(f"certificate error without a field, or with a secret: {e}") from None
        return
    if Certificate.from_dict(cert.to_dict()) != cert:
        raise Bug(f"certificate does not round-trip: {cert!r}")
    try:
        cert.check(CA.public_key(), NOW)
    except CertificateError as e:
        if e.field != "certificate":
            raise Bug(f"check() names {e.field!r}, not the certificate") from None
        return
    if cert.to_dict() != CERT.to_dict():
        raise Bug(f"a mutated certificate verifies: {cert!r}")


def check_signed_record(raw: bytes, doc: object) -> None:
    key = layout.node_key("lab", "node1")
    items = {layout.config_key("lab"): KVItem(layout.config_key("lab"), CONFIG.to_json().encode(), 1, 1),
             key: KVItem(key, raw, 2, 2)}
    snap = parse_cluster("lab", 2, items, now=NOW)
    for rej in snap.rejected:
        if any(s in rej.reason for s in SECRETS):
            raise Bug(f"a signing key shows in a refusal: {rej.reason[:200]}")
    accepted = snap.nodes.get("node1")
    if accepted is not None and (not isinstance(doc, dict) or
                                 {k: v for k, v in doc.items() if k != "node_signature"} !=
                                 {k: v for k, v in json.loads(RECORD.to_json()).items() if k != "node_signature"}):
        raise Bug(f"a record that is not the one signed was accepted: {raw[:300]!r}")
