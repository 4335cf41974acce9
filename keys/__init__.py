"""Key material: WireGuard X25519 key pairs and key files; Ed25519 signing keys and node certificates."""

from .certificate import MAX_VALIDITY_S, Certificate, NodeIdentity, issue
from .errors import CertificateError, KeyMaterialError
from .material import KEY_LEN, PrivateKey, PublicKey, load_or_generate, read_key_file, write_key_file
from .rotation import (
    COMMIT_LEAD_MS,
    PEER_WATCH_MS,
    SWITCH_DEFER_MS,
    commit_order,
    committed_step,
    peer_key,
    staged_step,
    switch_time,
    switch_waits_for,
    switched_step,
)
from .signing import (
    CERT_DOMAIN,
    LEASE_DOMAIN,
    RECORD_DOMAIN,
    SETTINGS_DOMAIN,
    SigningKey,
    VerifyKey,
    canonical,
    load_or_generate_signing_key,
    read_signing_key,
    write_signing_key,
)

__all__ = [
    "canonical",
    "CERT_DOMAIN",
    "Certificate",
    "CertificateError",
    "COMMIT_LEAD_MS",
    "SWITCH_DEFER_MS",
    "switch_waits_for",
    "commit_order",
    "committed_step",
    "issue",
    "KEY_LEN",
    "KeyMaterialError",
    "LEASE_DOMAIN",
    "MAX_VALIDITY_S",
    "load_or_generate",
    "load_or_generate_signing_key",
    "NodeIdentity",
    "peer_key",
    "PEER_WATCH_MS",
    "PrivateKey",
    "PublicKey",
    "read_key_file",
    "read_signing_key",
    "RECORD_DOMAIN",
    "SETTINGS_DOMAIN",
    "SigningKey",
    "staged_step",
    "switch_time",
    "switched_step",
    "VerifyKey",
    "write_key_file",
    "write_signing_key",
]
