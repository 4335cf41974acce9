"""Ed25519 signing keys: the cluster's signing key (kept by the operator) and each node's identity key.

A cluster signs its nodes' certificates with its signing key; a node signs its records with its
identity key, which never leaves the node. Both are 32-byte Ed25519 seeds kept in 0600 files
written atomically, like WireGuard key files. What is signed is the canonical JSON of a document
(`canonical`), prefixed with a domain tag, so a signature over one kind of document is never
valid for another. A private key appears in no repr, log line or error: only its public half.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .errors import CertificateError, KeyMaterialError
from .material import KEY_LEN, PrivateKey, read_key_file, write_key_file

SIGNATURE_LEN = 64
# Domain tags: what a signature was made for is part of what is signed.
CERT_DOMAIN = b"wiremesh-certificate-v1\n"
RECORD_DOMAIN = b"wiremesh-node-record-v1\n"
LEASE_DOMAIN = b"wiremesh-ipam-lease-v1\n"
SETTINGS_DOMAIN = b"wiremesh-cluster-signing-settings-v1\n"


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The one byte form of a JSON document that is signed: keys sorted, no spaces, ASCII only.

    A verifier re-encodes the document it parsed, so how the writer spaced or ordered it does
    not matter; only its content does."""
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as e:
        raise CertificateError("value", f"cannot be encoded canonically ({e.__class__.__name__})") from None


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """An Ed25519 public key (32 raw bytes): the cluster's signing key, or a node's identity key."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_LEN:
            raise KeyMaterialError(f"Ed25519 public key: must be {KEY_LEN} bytes")

    @classmethod
    def from_base64(cls, text: object, what: str = "public key") -> "VerifyKey":
        raw = _b64(text, what, KEY_LEN)
        try:
            Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise CertificateError(what, "is not an Ed25519 public key") from None
        return cls(raw)

    @property
    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:8]

    def verify(self, domain: bytes, doc: Mapping[str, Any], signature: object, what: str = "signature") -> None:
        """Raise CertificateError(`what`) unless `signature` signs `doc` under `domain` with this key."""
        sig = _b64(signature, what, SIGNATURE_LEN)
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(sig, domain + canonical(doc))
        except InvalidSignature:
            raise CertificateError(what, f"does not verify with key {self.fingerprint}") from None

    def __str__(self) -> str:
        return self.base64


class SigningKey:
    """An Ed25519 private key. Its seed is reachable only through `secret_bytes`."""

    __slots__ = ("_seed",)

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != KEY_LEN:
            raise KeyMaterialError(f"Ed25519 private key: must be {KEY_LEN} bytes")
        self._seed = seed

    @classmethod
    def generate(cls) -> "SigningKey":
        # Any 32 bytes are an Ed25519 seed. Ours are taken already in the clamped form X25519 key
        # files store, so the key-file code (0600 from the first byte, atomic, O_NOFOLLOW, mode
        # check on read) keeps them byte for byte; 251 random bits remain.
        seed = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(PrivateKey(seed).secret_bytes())

    def secret_bytes(self) -> bytes:
        return self._seed

    def public_key(self) -> VerifyKey:
        k = Ed25519PrivateKey.from_private_bytes(self._seed)
        return VerifyKey(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, domain: bytes, doc: Mapping[str, Any]) -> str:
        """The base64 signature of `doc` (canonical JSON) under `domain`."""
        sig = Ed25519PrivateKey.from_private_bytes(self._seed).sign(domain + canonical(doc))
        return base64.b64encode(sig).decode()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SigningKey) and other._seed == self._seed

    def __hash__(self) -> int:
        return hash(self.public_key())

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public_key().base64!r})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("SigningKey cannot be pickled")


def write_signing_key(path: Path, key: SigningKey) -> None:
    """Write `key` (base64 seed), atomically, mode 0600 from the first byte."""
    seed = key.secret_bytes()
    if PrivateKey(seed).secret_bytes() != seed:
        raise KeyMaterialError(f"key file {path}: this Ed25519 seed was not made by wiremesh and cannot be stored")
    write_key_file(Path(path), PrivateKey(seed))


def read_signing_key(path: Path) -> SigningKey:
    """Read an Ed25519 key file; refuse one that others can read, a symlink or a non-file."""
    return SigningKey(read_key_file(Path(path)).secret_bytes())


def load_or_generate_signing_key(path: Path) -> tuple[SigningKey, bool]:
    """The key in `path`, or a new one written there if the file is absent; the second value tells which."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return read_signing_key(path), False
    key = SigningKey.generate()
    write_signing_key(path, key)
    return key, True


def _b64(text: object, what: str, length: int) -> bytes:
    if not isinstance(text, str):
        raise CertificateError(what, f"must be a base64 string, not {type(text).__name__}")
    if len(text) > 4 * length:
        raise CertificateError(what, "is too long")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError(what, "is not valid base64") from None
    if len(raw) != length:
        raise CertificateError(what, f"must decode to {length} bytes, got {len(raw)}")
    return raw
