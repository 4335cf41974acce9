"""wireguard-go's cross-platform UAPI: a line protocol on a unix socket.

`get=1` returns the device as key=value lines; `set=1` takes the same keys and answers
`errno=N`. Keys travel in lowercase hex. See wireguard.com/xplatform.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from wiremesh.keys import KeyMaterialError, PrivateKey, PublicKey

from .errors import DeviceNotFound, TunnelError, UAPIError
from .model import STAGED_PSK, DeviceState, PeerChange, PeerStatus

SOCKET_DIR = Path("/var/run/wireguard")


def socket_path(ifname: str) -> Path:
    return SOCKET_DIR / f"{ifname}.sock"


def _b64_from_hex(text: str) -> str:
    return PublicKey.from_hex(text).base64


@dataclass
class _Peer:
    public_key: str
    endpoint: str | None = None
    allowed_ips: list[str] = field(default_factory=list)
    keepalive: int = 0
    hs_sec: int = 0
    hs_nsec: int = 0
    rx: int = 0
    tx: int = 0
    staged: bool = False

    def status(self) -> PeerStatus:
        return PeerStatus(public_key=self.public_key, endpoint=self.endpoint, allowed_ips=frozenset(self.allowed_ips),
                          persistent_keepalive=self.keepalive, latest_handshake=self.hs_sec + self.hs_nsec / 1e9,
                          rx_bytes=self.rx, tx_bytes=self.tx, staged=self.staged)


_PEER_INTS = {"persistent_keepalive_interval": "keepalive", "last_handshake_time_sec": "hs_sec",
              "last_handshake_time_nsec": "hs_nsec", "rx_bytes": "rx", "tx_bytes": "tx"}
_SECRET_KEYS = ("private_key", "preshared_key")  # their lines are never shown in an error
_STAGED_HEX = STAGED_PSK.hex()
_NO_PSK_HEX = "0" * 64


def _number(ifname: str, key: str, value: str, signed: bool = False) -> int:
    """A UAPI number: decimal, unsigned 64-bit, except errno (negative on Linux: -EINVAL)."""
    digits = value[1:] if signed and value.startswith("-") else value
    if not (digits.isascii() and digits.isdigit()) or int(digits) >= 2**64:
        raise TunnelError(f"{ifname}: UAPI {key} {value[:24]!r} is not a 64-bit integer")
    return int(value)


def parse_get(ifname: str, text: str) -> DeviceState:
    """Parse a `get=1` answer. The private key line is turned into its public half at once."""
    public_key: str | None = None
    listen_port = 0
    peers: dict[str, PeerStatus] = {}
    cur: _Peer | None = None
    err = 0
    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            shown = "(a secret key's line)" if line.startswith(_SECRET_KEYS) else repr(line[:40])
            raise TunnelError(f"{ifname}: malformed UAPI line {shown}")
        if key == "private_key":
            try:
                public_key = PrivateKey(bytes.fromhex(value)).public_key().base64
            except (ValueError, KeyMaterialError):  # never show the value: it is the private key
                raise TunnelError(f"{ifname}: UAPI private_key is not a 64-digit hex key") from None
        elif key == "listen_port":
            listen_port = _number(ifname, key, value)
        elif key == "public_key":
            if cur is not None:
                peers[cur.public_key] = cur.status()
            try:
                cur = _Peer(_b64_from_hex(value))
            except KeyMaterialError as e:
                raise TunnelError(f"{ifname}: UAPI {e}") from None
        elif key == "errno":
            err = _number(ifname, key, value, signed=True)
        elif cur is not None:
            if key == "endpoint":
                cur.endpoint = value
            elif key == "preshared_key":
                cur.staged = value == _STAGED_HEX  # (any other value is neither shown nor kept)
            elif key == "allowed_ip":
                cur.allowed_ips.append(value)
            elif key in _PEER_INTS:
                setattr(cur, _PEER_INTS[key], _number(ifname, key, value))
    if cur is not None:
        peers[cur.public_key] = cur.status()
    if err:
        raise UAPIError(f"{ifname}: UAPI get failed with errno {err}", err)
    return DeviceState(name=ifname, public_key=public_key, listen_port=listen_port, peers=peers)


def format_set(
    *,
    private_key: PrivateKey | None = None,
    listen_port: int | None = None,
    changes: list[PeerChange] = [],  # noqa: B006 - read only
) -> str:
    """Build a `set=1` request body (pure)."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.secret_hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    for ch in changes:
        key = PublicKey.from_base64(ch.public_key).hex
        lines.append(f"public_key={key}")
        if ch.remove:
            lines.append("remove=true")
            continue
        if ch.recreate:  # removed, then made again below (one request, under wireguard-go's lock)
            lines.extend(["remove=true", f"public_key={key}"])
        elif ch.update_only:
            lines.append("update_only=true")
        if ch.staged is not None:
            lines.append(f"preshared_key={_STAGED_HEX if ch.staged else _NO_PSK_HEX}")
        if ch.endpoint is not None:
            lines.append(f"endpoint={ch.endpoint}")
        if ch.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={ch.persistent_keepalive}")
        if ch.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines.extend(f"allowed_ip={cidr}" for cidr in sorted(ch.allowed_ips))
        # With `replaces`: the new peer takes the old one's allowed IPs over (they move, never
        # vanish; one request under wireguard-go's lock, so no packet finds no peer). The old
        # peer stays, with no allowed IP left, until the caller removes it a moment later:
        # removing it at once drops the packets it still holds (queued or being encrypted).
    return "\n".join(lines) + "\n\n"


class UAPIClient:
    """Talks to one device's UAPI socket; one connection per request, as wg(8) does."""

    def __init__(self, ifname: str, path: Path | None = None, timeout: float = 5.0) -> None:
        self.ifname = ifname
        self.path = path or socket_path(ifname)
        self.timeout = timeout

    def _request(self, body: str) -> str:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise DeviceNotFound(f"{self.ifname}: no wireguard-go listening on {self.path}") from e
            s.sendall(body.encode())
            buf = b""
            while not buf.endswith(b"\n\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            try:
                return buf.decode()
            except UnicodeDecodeError:
                raise TunnelError(f"{self.ifname}: UAPI reply is not UTF-8 text") from None
        except OSError as e:
            if isinstance(e, DeviceNotFound):
                raise
            raise TunnelError(f"{self.ifname}: UAPI socket error: {e.strerror or e}", e.errno) from e
        finally:
            s.close()

    def alive(self) -> bool:
        """It answered a `get`."""
        try:
            self.get()
            return True
        except TunnelError:
            return False

    def listening(self) -> bool:
        """A wireguard-go listens on the socket: it answered, or took the connection and was too
        busy to answer in time (a starved host: seen 5 s). Only nothing listening is a dead one."""
        try:
            self.get()
        except DeviceNotFound:
            return False
        except TunnelError:
            pass
        return True

    def get(self) -> DeviceState:
        return parse_get(self.ifname, self._request("get=1\n\n"))

    def set(self, body: str) -> None:
        reply = self._request(body)
        for line in reply.splitlines():
            if line.startswith("errno="):
                err = _number(self.ifname, "errno", line[6:], signed=True)
                if err:
                    # Never echo the request: it may hold the private key.
                    raise UAPIError(f"{self.ifname}: UAPI set failed with errno {err}", err)
                return
        raise TunnelError(f"{self.ifname}: UAPI set got no errno in its reply")
