"""Key material: WireGuard X25519 key pairs and key files; Ed25519 signing keys and node certificates."""

from .certificate import Certificate, NodeIdentity, issue
from .errors import CertificateError, KeyMaterialError
from .material import KEY_LEN, PrivateKey, PublicKey, load_or_generate, read_key_file, write_key_file
from .signing import (
    CERT_DOMAIN,
    LEASE_DOMAIN,
    RECORD_DOMAIN,
    SigningKey,
    VerifyKey,
    canonical,
    load_or_generate_signing_key,
    read_signing_key,
    write_signing_key,
)

__all__ = [
    "CERT_DOMAIN",
    "Certificate",
    "CertificateError",
    "KEY_LEN",
    "KeyMaterialError",
    "LEASE_DOMAIN",
    "NodeIdentity",
    "PrivateKey",
    "PublicKey",
    "RECORD_DOMAIN",
    "SigningKey",
    "VerifyKey",
    "canonical",
    "issue",
    "load_or_generate",
    "load_or_generate_signing_key",
    "read_key_file",
    "read_signing_key",
    "write_key_file",
    "write_signing_key",
]
