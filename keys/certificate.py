"""Node certificates: the cluster's signing key vouches that a node of a cluster, known by its
identity key, owns one pod CIDR for a while.

A certificate binds the cluster, the node's name, its Ed25519 identity public key, its pod
CIDR, a validity window (unix seconds) and a random serial (for revocation). It does not bind
the node's WireGuard key: the node signs each record it publishes (WireGuard key, next key and
all) with its identity key, so rotating the WireGuard key needs no new certificate.

A certificate is a JSON object; the cluster's signature covers the canonical JSON of every
other field. Parsing is strict (types, sizes, ranges) and names the field at fault.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CertificateError
from .signing import CERT_DOMAIN, SigningKey, VerifyKey

CERT_VERSION = 1
MAX_VALIDITY_S = 10 * 366 * 86400  # ten years: a longer window is a typo
CLOCK_SKEW_S = 300  # a new certificate is valid from 5 minutes back, for nodes whose clock is behind
_FIELDS = ("version", "cluster", "node", "identity_key", "pod_cidr", "not_before", "not_after", "serial", "signature")
_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
_SERIAL = re.compile(r"[0-9a-f]{32}")
_TIME_MAX = 2**40  # unix seconds: year 36812


@dataclass(frozen=True, slots=True)
class Certificate:
    cluster: str
    node: str
    identity_key: str  # the node's Ed25519 public key, base64
    pod_cidr: str
    not_before: int
    not_after: int
    serial: str  # 32 lowercase hex digits
    signature: str = ""  # the cluster's, over every other field
    version: int = CERT_VERSION

    def body(self) -> dict[str, Any]:
        """What the cluster signs: every field but the signature."""
        return {"version": self.version, "cluster": self.cluster, "node": self.node,
                "identity_key": self.identity_key, "pod_cidr": self.pod_cidr, "not_before": self.not_before,
                "not_after": self.not_after, "serial": self.serial}

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    @property
    def identity(self) -> VerifyKey:
        return VerifyKey.from_base64(self.identity_key, "identity_key")

    @classmethod
    def from_dict(cls, d: object) -> "Certificate":
        """A certificate from its JSON object; CertificateError naming the field if anything is off.

        Checks form only: `check` tells whether the cluster signed it and whether it is valid now."""
        if not isinstance(d, Mapping):
            raise CertificateError("certificate", f"must be a JSON object, not {type(d).__name__}")
        for name in d:
            if name not in _FIELDS:
                raise CertificateError("certificate", f"unknown field {str(name)[:32]!r}")
        for name in _FIELDS:
            if name not in d:
                raise CertificateError(name, "is required")
        version = _int(d, "version", 0, 2**31)
        if version != CERT_VERSION:
            raise CertificateError("version", f"{version} is not a certificate version this agent knows "
                                              f"({CERT_VERSION})")
        strs = {n: _str(d, n) for n in ("cluster", "node", "identity_key", "pod_cidr", "serial", "signature")}
        for n in ("cluster", "node"):
            if not _NAME.fullmatch(strs[n]):
                raise CertificateError(n, f"{strs[n][:64]!r} is not a {n} name")
        VerifyKey.from_base64(strs["identity_key"], "identity_key")
        try:
            net = ipaddress.ip_network(strs["pod_cidr"], strict=True)
        except ValueError:
            raise CertificateError("pod_cidr", f"{strs['pod_cidr'][:64]!r} is not a network CIDR") from None
        if str(net) != strs["pod_cidr"]:
            raise CertificateError("pod_cidr", f"{strs['pod_cidr'][:64]!r} is not written canonically ({net})")
        if not _SERIAL.fullmatch(strs["serial"]):
            raise CertificateError("serial", "must be 32 lowercase hex digits")
        nb, na = _int(d, "not_before", 0, _TIME_MAX), _int(d, "not_after", 0, _TIME_MAX)
        if na <= nb:
            raise CertificateError("not_after", "is not after not_before")
        return cls(strs["cluster"], strs["node"], strs["identity_key"], strs["pod_cidr"], nb, na, strs["serial"],
                   strs["signature"], version)

    def check(self, cluster_key: VerifyKey, now: float, revoked: frozenset[str] | set[str] = frozenset()) -> None:
        """Raise CertificateError unless the cluster's key signed this certificate, it is valid at
        `now` (unix seconds) and its serial is not revoked."""
        cluster_key.verify(CERT_DOMAIN, self.body(), self.signature, "certificate")
        if self.serial in revoked:
            raise CertificateError("certificate", f"serial {self.serial} is revoked")
        if now < self.not_before:
            raise CertificateError("certificate", f"not valid before {self.not_before} (now {int(now)})")
        if now >= self.not_after:
            raise CertificateError("certificate", f"expired at {self.not_after} (now {int(now)})")

    def verify_signed(self, domain: bytes, doc: Mapping[str, Any], signature: object) -> None:
        """Raise CertificateError("signature") unless the node's identity key signed `doc`."""
        self.identity.verify(domain, doc, signature, "signature")


def issue(signing_key: SigningKey, cluster: str, node: str, identity: VerifyKey, pod_cidr: str,
          valid_for_s: int, now: float, serial: str | None = None) -> Certificate:
    """A certificate for `node`, signed by the cluster's `signing_key`, valid from a little
    before `now` (clock skew) for `valid_for_s` seconds."""
    if not 60 <= valid_for_s <= MAX_VALIDITY_S:
        raise CertificateError("valid_for", f"{valid_for_s}s is outside 60s-{MAX_VALIDITY_S // 86400}d")
    try:
        cidr = str(ipaddress.ip_network(pod_cidr, strict=True))
    except ValueError as e:
        raise CertificateError("pod_cidr", f"{pod_cidr[:64]!r} is not a network CIDR ({e})") from None
    start = max(0, int(now) - CLOCK_SKEW_S)
    cert = Certificate(cluster, node, identity.base64, cidr, start, int(now) + valid_for_s,
                       serial or secrets.token_hex(16))
    cert = Certificate.from_dict(cert.to_dict())  # the same checks as a reader's
    return Certificate(**{**cert.to_dict(), "signature": signing_key.sign(CERT_DOMAIN, cert.body())})


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What a node signs with: its certificate and its identity key (which never leaves the node)."""

    certificate: Certificate
    key: SigningKey

    def __post_init__(self) -> None:
        if self.key.public_key().base64 != self.certificate.identity_key:
            raise CertificateError("identity_key", "the identity key is not the one the certificate names")

    def sign(self, domain: bytes, doc: Mapping[str, Any]) -> str:
        return self.key.sign(domain, doc)

    def __repr__(self) -> str:
        c = self.certificate
        return f"NodeIdentity({c.cluster}/{c.node}, serial={c.serial}, pod_cidr={c.pod_cidr})"


def _str(d: Mapping[str, Any], name: str) -> str:
    v = d[name]
    if not isinstance(v, str):
        raise CertificateError(name, f"must be a string, not {type(v).__name__}")
    if len(v) > 256:
        raise CertificateError(name, "is longer than 256 characters")
    return v


def _int(d: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise CertificateError(name, f"must be an integer, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise CertificateError(name, f"{str(v)[:24]} is outside {lo}-{hi}")
    return v
