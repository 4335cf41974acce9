"""keys: X25519 key pairs, their wire forms, and key files."""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import wiremesh.keys.material
from wiremesh.keys import KEY_LEN, KeyMaterialError, PrivateKey, PublicKey, load_or_generate, read_key_file, write_key_file
from wiremesh.errors import WiremeshError

# RFC 7748 section 6.1 (Alice).
RFC7748_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def _secret_forms(key: PrivateKey) -> list[str]:
    raw = key.secret_bytes()
    return [key.secret_base64(), key.secret_hex(), key.secret_hex().upper(), base64.b64encode(raw).decode().rstrip("=")]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- generation, clamping, derivation --------------------------------------------------------


def test_generate_gives_distinct_32_byte_keys() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    assert len(a.secret_bytes()) == KEY_LEN == 32
    assert a != b
    assert a.public_key() != b.public_key()


def test_generated_key_is_clamped() -> None:
    for _ in range(20):
        raw = PrivateKey.generate().secret_bytes()
        assert raw[0] & 0b111 == 0
        assert raw[31] & 0x80 == 0
        assert raw[31] & 0x40 == 0x40


@pytest.mark.parametrize(
    "raw, first, last",
    [
        (b"\xff" * 32, 0xF8, 0x7F),
        (b"\x00" * 32, 0x00, 0x40),
        (bytes([7] + [0] * 30 + [0x80]), 0x00, 0x40),
    ],
)
def test_constructor_clamps_like_curve25519(raw: bytes, first: int, last: int) -> None:
    key = PrivateKey(raw)
    assert key.secret_bytes()[0] == first
    assert key.secret_bytes()[31] == last
    assert key.secret_bytes()[1:31] == raw[1:31]


def test_clamped_and_unclamped_forms_are_the_same_key() -> None:
    raw = os.urandom(32)
    assert PrivateKey(raw) == PrivateKey(PrivateKey(raw).secret_bytes())
    assert hash(PrivateKey(raw)) == hash(PrivateKey(PrivateKey(raw).secret_bytes()))


def test_public_key_matches_rfc7748_vector() -> None:
    assert PrivateKey(RFC7748_PRIVATE).public_key().raw == RFC7748_PUBLIC


@pytest.mark.parametrize("seed", range(5))
def test_public_key_matches_cryptography_x25519(seed: int) -> None:
    raw = hashlib.sha256(f"seed-{seed}".encode()).digest()
    expected = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert PrivateKey(raw).public_key().raw == expected
    assert PrivateKey(raw).public_key() == PublicKey(expected)


# --- wire forms -------------------------------------------------------------------------------


def test_private_key_base64_round_trip() -> None:
    key = PrivateKey.generate()
    text = key.secret_base64()
    assert len(text) == 44 and text.endswith("=")
    assert PrivateKey.from_base64(text) == key
    assert PrivateKey.from_base64(f"  {text}\n") == key  # as read from a file


def test_private_key_hex_is_lowercase_64_digits() -> None:
    key = PrivateKey.generate()
    assert key.secret_hex() == key.secret_bytes().hex()
    assert len(key.secret_hex()) == 64 and key.secret_hex() == key.secret_hex().lower()


def test_public_key_base64_and_hex_round_trips() -> None:
    pub = PrivateKey.generate().public_key()
    assert PublicKey.from_base64(pub.base64) == pub
    assert PublicKey.from_hex(pub.hex) == pub
    assert pub.hex == pub.raw.hex()
    assert base64.b64decode(pub.base64) == pub.raw
    assert str(pub) == pub.base64


def test_public_key_fingerprint_is_first_8_hex_of_sha256() -> None:
    pub = PublicKey(RFC7748_PUBLIC)
    assert pub.fingerprint == hashlib.sha256(RFC7748_PUBLIC).hexdigest()[:8]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("not base64 at all!", "not valid base64"),
        ("", "must decode to 32 bytes, got 0"),
        (base64.b64encode(b"\x01" * 16).decode(), "must decode to 32 bytes, got 16"),
        (base64.b64encode(b"\x01" * 33).decode(), "must decode to 32 bytes, got 33"),
        ("ключ", "not valid base64"),
    ],
)
def test_from_base64_errors_name_the_field_and_reason(text: str, reason: str) -> None:
    with pytest.raises(KeyMaterialError) as ei:
        PublicKey.from_base64(text, what="peer key")
    assert str(ei.value) == f"peer key: {reason}"
    with pytest.raises(KeyMaterialError) as ei:
        PrivateKey.from_base64(text)
    assert str(ei.value) == f"private key: {reason}"


def test_from_base64_error_does_not_echo_a_near_miss_secret() -> None:
    key = PrivateKey.generate()
    damaged = key.secret_base64()[:-4]  # a truncated private key
    with pytest.raises(KeyMaterialError) as ei:
        PrivateKey.from_base64(damaged)
    assert damaged not in str(ei.value)
    assert damaged[:20] not in str(ei.value)


@pytest.mark.parametrize(
    "text, reason",
    [("zz" * 32, "not valid hex"), ("ab" * 16, "must be 32 bytes"), ("", "must be 32 bytes")],
)
def test_public_key_from_hex_errors(text: str, reason: str) -> None:
    with pytest.raises(KeyMaterialError) as ei:
        PublicKey.from_hex(text)
    assert str(ei.value) == f"public key: {reason}"


@pytest.mark.parametrize("bad", [b"x" * 31, b"x" * 33, b"", "x" * 32, bytearray(32)])
def test_constructors_refuse_wrong_length_or_type(bad: object) -> None:
    with pytest.raises(KeyMaterialError, match=r"^private key: must be 32 bytes$"):
        PrivateKey(bad)  # type: ignore[arg-type]
    with pytest.raises(KeyMaterialError, match=r"^public key: must be 32 bytes$"):
        PublicKey(bad)  # type: ignore[arg-type]


def test_key_errors_belong_to_the_wiremesh_family() -> None:
    assert issubclass(KeyMaterialError, WiremeshError)


# --- secrecy --------------------------------------------------------------------------------


def test_repr_and_str_hold_only_the_public_half() -> None:
    key = PrivateKey.generate()
    pub = key.public_key().base64
    for text in (repr(key), str(key), f"{key}", f"{key!r}", "%s" % key, repr([key]), repr({"k": key})):
        assert pub in text
        for secret in _secret_forms(key):
            assert secret not in text


def test_private_key_has_no_instance_dict_to_leak() -> None:
    key = PrivateKey.generate()
    assert not hasattr(key, "__dict__")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_private_key_refuses_pickling(protocol: int) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(PrivateKey.generate(), protocol=protocol)


def test_private_key_refuses_copy_by_reduce() -> None:
    with pytest.raises(TypeError):
        copy.copy(PrivateKey.generate())


def test_public_key_pickles() -> None:
    pub = PrivateKey.generate().public_key()
    assert pickle.loads(pickle.dumps(pub)) == pub


def test_equality_and_hash() -> None:
    key = PrivateKey.generate()
    same = PrivateKey(key.secret_bytes())
    assert key == same and hash(key) == hash(same)
    assert key != PrivateKey.generate()
    assert key != key.secret_bytes()
    assert {key, same} == {key}


# --- key files ------------------------------------------------------------------------------


def test_write_key_file_mode_0600_and_wg_format(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    key = PrivateKey.generate()
    write_key_file(path, key)
    assert _mode(path) == 0o600
    assert path.read_text() == key.secret_base64() + "\n"
    assert os.listdir(tmp_path) == ["private.key"]  # no temp file left behind


def test_write_key_file_creates_private_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "state" / "wiremesh" / "private.key"
    write_key_file(path, PrivateKey.generate())
    assert _mode(path) == 0o600
    assert _mode(path.parent) & 0o077 == 0


def test_write_key_file_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    old, new = PrivateKey.generate(), PrivateKey.generate()
    path.write_text(old.secret_base64() + "\n")
    path.chmod(0o644)
    old_view = tmp_path / "old-view"
    os.link(path, old_view)  # a reader holding the old inode

    write_key_file(path, new)

    # rename(2) swapped in a new inode: the old one is untouched, never half-written.
    assert old_view.read_text() == old.secret_base64() + "\n"
    assert path.read_text() == new.secret_base64() + "\n"
    assert path.stat().st_ino != old_view.stat().st_ino
    assert _mode(path) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["old-view", "private.key"]


def test_write_key_file_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wiremesh.keys.material.os, "replace", broken_replace)
    with pytest.raises((OSError, KeyMaterialError)):
        write_key_file(tmp_path / "private.key", PrivateKey.generate())
    assert os.listdir(tmp_path) == []


def test_write_key_file_translates_os_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    path = blocker / "private.key"
    with pytest.raises(KeyMaterialError) as ei:
        write_key_file(path, PrivateKey.generate())
    assert str(path) in str(ei.value) or str(blocker) in str(ei.value)


def test_read_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    key = PrivateKey.generate()
    write_key_file(path, key)
    assert read_key_file(path) == key


def test_read_key_file_accepts_owner_read_only(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    key = PrivateKey.generate()
    write_key_file(path, key)
    path.chmod(0o400)
    assert read_key_file(path) == key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_read_key_file_refuses_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "private.key"
    key = PrivateKey.generate()
    write_key_file(path, key)
    path.chmod(mode)
    with pytest.raises(KeyMaterialError) as ei:
        read_key_file(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert f"mode {mode:04o}" in msg
    assert "0600" in msg
    for secret in _secret_forms(key):
        assert secret not in msg


def test_read_key_file_refuses_bad_base64_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    content = "hunter2-SECRET-not-base64!!!"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyMaterialError) as ei:
        read_key_file(path)
    msg = str(ei.value)
    assert msg == f"key file {path}: not valid base64"
    assert "hunter2" not in msg and "SECRET" not in msg


def test_read_key_file_refuses_wrong_length_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    content = base64.b64encode(b"\x42" * 31).decode()
    path.write_text(content + "\n")
    path.chmod(0o600)
    with pytest.raises(KeyMaterialError) as ei:
        read_key_file(path)
    assert str(ei.value) == f"key file {path}: must decode to 32 bytes, got 31"
    assert content not in str(ei.value)


def test_read_key_file_missing_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeyMaterialError) as ei:
        read_key_file(path)
    assert str(ei.value) == f"key file {path}: No such file or directory"
    assert isinstance(ei.value.__cause__, FileNotFoundError)


def test_read_key_file_refuses_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "dir.key"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyMaterialError) as ei:
        read_key_file(path)
    assert str(ei.value).startswith(f"key file {path}: ")


def test_read_key_file_binary_content_is_a_key_error(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    path.write_bytes(b"\xff" * 32)
    path.chmod(0o600)
    with pytest.raises(KeyMaterialError) as ei:
        read_key_file(path)
    assert str(path) in str(ei.value)


def test_load_or_generate_generates_once_then_loads(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    key, created = load_or_generate(path)
    assert created is True
    assert _mode(path) == 0o600
    again, created_again = load_or_generate(path)
    assert created_again is False
    assert again == key
    assert os.listdir(tmp_path) == ["private.key"]


def test_load_or_generate_never_overwrites_an_unsafe_file(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    key = PrivateKey.generate()
    write_key_file(path, key)
    path.chmod(0o644)
    before = path.read_bytes()
    with pytest.raises(KeyMaterialError, match="mode 0644"):
        load_or_generate(path)
    assert path.read_bytes() == before
