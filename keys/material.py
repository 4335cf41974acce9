"""X25519 key pairs for WireGuard: generation, base64/hex forms, key files.

WireGuard keys are raw 32-byte Curve25519 values; the wire forms are base64 (wg(8), Consul
records) and lowercase hex (wireguard-go's UAPI). A private key never appears in a repr,
a log line or an error message: only its public half and a short fingerprint do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .errors import KeyMaterialError

KEY_LEN = 32


def _decode_b64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyMaterialError(f"{what}: not valid base64") from None
    if len(raw) != KEY_LEN:
        raise KeyMaterialError(f"{what}: must decode to {KEY_LEN} bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A WireGuard public key (32 raw bytes)."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_LEN:
            raise KeyMaterialError(f"public key: must be {KEY_LEN} bytes")

    @classmethod
    def from_base64(cls, text: str, what: str = "public key") -> "PublicKey":
        return cls(_decode_b64(text, what))

    @classmethod
    def from_hex(cls, text: str, what: str = "public key") -> "PublicKey":
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise KeyMaterialError(f"{what}: not valid hex") from None
        if len(raw) != KEY_LEN:
            raise KeyMaterialError(f"{what}: must be {KEY_LEN} bytes")
        return cls(raw)

    @property
    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def fingerprint(self) -> str:
        """Short stable id for tables and logs: first 8 hex digits of SHA-256 of the key."""
        return hashlib.sha256(self.raw).hexdigest()[:8]

    def __str__(self) -> str:
        return self.base64

    def __repr__(self) -> str:
        return f"PublicKey({self.base64!r})"


class PrivateKey:
    """A WireGuard private key. Its bytes are reachable only through explicit accessors."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != KEY_LEN:
            raise KeyMaterialError(f"private key: must be {KEY_LEN} bytes")
        # Clamp as Curve25519 does, so the stored form equals what wg(8) would show.
        b = bytearray(raw)
        b[0] &= 248
        b[31] = (b[31] & 127) | 64
        self._raw = bytes(b)

    @classmethod
    def generate(cls) -> "PrivateKey":
        k = X25519PrivateKey.generate()
        return cls(k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    @classmethod
    def from_base64(cls, text: str, what: str = "private key") -> "PrivateKey":
        return cls(_decode_b64(text, what))

    def secret_bytes(self) -> bytes:
        return self._raw

    def secret_base64(self) -> str:
        return base64.b64encode(self._raw).decode()

    def secret_hex(self) -> str:
        return self._raw.hex()

    def public_key(self) -> PublicKey:
        k = X25519PrivateKey.from_private_bytes(self._raw)
        return PublicKey(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivateKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self.public_key())

    def __repr__(self) -> str:
        return f"PrivateKey(public={self.public_key().base64!r})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:  # keep it out of pickles sent anywhere by accident
        raise TypeError("PrivateKey cannot be pickled")


def write_key_file(path: Path, key: PrivateKey) -> None:
    """Write `key` in wg(8)'s base64 form, atomically, mode 0600 from the first byte."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise KeyMaterialError(f"key file {path}: {e.strerror or e}") from e
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.secret_base64() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise KeyMaterialError(f"key file {path}: {e.strerror or e}") from e
        raise


def read_key_file(path: Path) -> PrivateKey:
    """Read a base64 private key file; refuse one that others can read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise KeyMaterialError(f"key file {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)  # checks and read on the same open file: nothing can swap it between
        if not stat.S_ISREG(st.st_mode):
            raise KeyMaterialError(f"key file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise KeyMaterialError(
                f"key file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it; "
                "it must be 0600 (chmod 600)"
            )
        if st.st_size > 1024:
            raise KeyMaterialError(f"key file {path}: {st.st_size} bytes is too large for a key")
        raw = os.read(fd, 1025)
    except OSError as e:
        raise KeyMaterialError(f"key file {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyMaterialError(f"key file {path}: not valid base64") from None
    return PrivateKey.from_base64(text, what=f"key file {path}")


def load_or_generate(path: Path) -> tuple[PrivateKey, bool]:
    """Return the key in `path`, generating and writing a new one if the file is absent.

    The second value tells whether a key was generated.
    """
    path = Path(path)
    if path.exists():
        return read_key_file(path), False
    key = PrivateKey.generate()
    write_key_file(path, key)
    return key, True
