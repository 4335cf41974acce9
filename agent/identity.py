"""This node's identity for signed records: its certificate and identity key, from the files
agent.toml names (`certificate_file`, `identity_key_file`; by default node.crt and identity.key
beside key_file).

A node without a certificate at the default place publishes unsigned records, as before
signing existed (a cluster with `require_signed` refuses them). A certificate named in
agent.toml must be there. Every problem is one ConfigError naming the field; none shows the
identity key, which never leaves the node.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from wiremesh.keys import Certificate, CertificateError, KeyMaterialError, NodeIdentity, read_signing_key

from .config import AgentConfig
from .errors import ConfigError

log = logging.getLogger("wiremesh.agent")
MAX_CERT_BYTES = 8192


def read_certificate(path: object, src: str, field: str = "certificate_file") -> Certificate:
    try:
        raw = Path(str(path)).read_bytes()[:MAX_CERT_BYTES + 1]
    except OSError as e:
        raise ConfigError(src, field, f"{path}: {e.strerror or e}") from None
    if len(raw) > MAX_CERT_BYTES:
        raise ConfigError(src, field, f"{path}: over {MAX_CERT_BYTES} bytes: not a certificate")
    try:
        return Certificate.from_dict(json.loads(raw))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ConfigError(src, field, f"{path}: not a certificate (JSON)") from None
    except CertificateError as e:
        raise ConfigError(src, field, f"{path}: {e}") from None


def load_identity(cfg: AgentConfig, src: str = "agent.toml", now: float | None = None) -> NodeIdentity | None:
    """The node's identity, or None if it has no certificate (and none is configured)."""
    path = cfg.certificate_path
    if cfg.certificate_file is None and not path.exists():
        return None
    cert = read_certificate(path, src)
    if cert.node != cfg.node:
        raise ConfigError(src, "certificate_file", f"{path} is node {cert.node!r}'s certificate, not {cfg.node!r}'s")
    if cert.cluster != cfg.cluster:
        raise ConfigError(src, "certificate_file", f"{path} is for cluster {cert.cluster!r}, not {cfg.cluster!r}")
    try:
        key = read_signing_key(cfg.identity_key_path)
    except KeyMaterialError as e:
        raise ConfigError(src, "identity_key_file", str(e)) from None
    try:
        identity = NodeIdentity(cert, key)
    except CertificateError:
        raise ConfigError(src, "identity_key_file", f"{cfg.identity_key_path} is not the identity key {path} "
                                                   "certifies (enroll the node again with this key)") from None
    now = time.time() if now is None else now
    if now >= cert.not_after:
        log.error("certificate %s (serial %s) expired at %s: this node's records will be refused; enroll it again",
                  path, cert.serial, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cert.not_after)))
    elif cert.not_after - now < 7 * 86400:
        log.warning("certificate %s expires in %.1f days; enroll the node again", path, (cert.not_after - now) / 86400)
    return identity
