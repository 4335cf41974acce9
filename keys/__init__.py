"""Key material: WireGuard X25519 key pairs and key files."""

from .errors import KeyMaterialError
from .material import KEY_LEN, PrivateKey, PublicKey, load_or_generate, read_key_file, write_key_file

__all__ = [
    "KEY_LEN",
    "KeyMaterialError",
    "PrivateKey",
    "PublicKey",
    "load_or_generate",
    "read_key_file",
    "write_key_file",
]
