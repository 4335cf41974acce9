"""tunnels.uapi: wireguard-go's line protocol, and a client against a fake UAPI socket."""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiremesh.keys import PrivateKey
from wiremesh.tunnels import DeviceNotFound, PeerChange, TunnelError, UAPIError
from wiremesh.tunnels.uapi import UAPIClient, format_set, parse_get, socket_path

PRIV = PrivateKey(bytes(range(1, 33)))
P1 = PrivateKey(b"\x11" * 32).public_key()
P2 = PrivateKey(b"\x22" * 32).public_key()
ZERO_PSK = "0" * 64


def get_reply(errno_: int = 0) -> str:
    """What wireguard-go answers to `get=1` (order and extra keys as it sends them)."""
    return (
        f"private_key={PRIV.secret_hex()}\n"
        "listen_port=51820\n"
        "fwmark=0\n"
        f"public_key={P1.hex}\n"
        f"preshared_key={ZERO_PSK}\n"
        "protocol_version=1\n"
        "endpoint=192.0.2.12:51820\n"
        "last_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=250000000\n"
        "tx_bytes=1212\n"
        "rx_bytes=3434\n"
        "persistent_keepalive_interval=25\n"
        "allowed_ip=10.240.2.0/24\n"
        "allowed_ip=fd00:240:0:2::/64\n"
        f"public_key={P2.hex}\n"
        f"preshared_key={ZERO_PSK}\n"
        "protocol_version=1\n"
        "endpoint=[fd00::13]:51820\n"
        "last_handshake_time_sec=0\n"
        "last_handshake_time_nsec=0\n"
        "tx_bytes=0\n"
        "rx_bytes=0\n"
        "persistent_keepalive_interval=0\n"
        "allowed_ip=10.240.3.0/24\n"
        f"errno={errno_}\n"
        "\n"
    )


# --- parse_get ------------------------------------------------------------------------------


def test_parse_get_realistic_reply() -> None:
    state = parse_get("wm0", get_reply())
    assert state.name == "wm0"
    assert state.public_key == PRIV.public_key().base64
    assert state.listen_port == 51820
    assert set(state.peers) == {P1.base64, P2.base64}

    p1 = state.peers[P1.base64]
    assert p1.public_key == P1.base64
    assert p1.endpoint == "192.0.2.12:51820"
    assert p1.allowed_ips == frozenset({"10.240.2.0/24", "fd00:240:0:2::/64"})
    assert p1.persistent_keepalive == 25
    assert p1.latest_handshake == pytest.approx(1700000000.25)
    assert (p1.rx_bytes, p1.tx_bytes) == (3434, 1212)

    p2 = state.peers[P2.base64]
    assert p2.endpoint == "[fd00::13]:51820"
    assert p2.allowed_ips == frozenset({"10.240.3.0/24"})
    assert p2.latest_handshake == 0.0 and p2.persistent_keepalive == 0
    assert (p2.rx_bytes, p2.tx_bytes) == (0, 0)


def test_parse_get_keeps_only_the_public_half() -> None:
    state = parse_get("wm0", get_reply())
    text = repr(state) + str(state)
    for secret in (PRIV.secret_hex(), PRIV.secret_base64(), PRIV.secret_hex().upper()):
        assert secret not in text
    assert not any("private" in f for f in type(state).__dataclass_fields__)


def test_parse_get_unconfigured_device() -> None:
    state = parse_get("wm0", "listen_port=0\nerrno=0\n\n")
    assert state.public_key is None and state.listen_port == 0 and state.peers == {}


def test_parse_get_peer_without_endpoint() -> None:
    state = parse_get("wm0", f"public_key={P1.hex}\nallowed_ip=10.0.0.0/24\nerrno=0\n\n")
    assert state.peers[P1.base64].endpoint is None


def test_parse_get_errno_raises_uapi_error() -> None:
    with pytest.raises(UAPIError) as ei:
        parse_get("wm0", get_reply(errno_=19))
    assert ei.value.errno == 19
    assert str(ei.value) == "wm0: UAPI get failed with errno 19"
    assert isinstance(ei.value, TunnelError)
    assert PRIV.secret_hex() not in str(ei.value)


def test_parse_get_malformed_line() -> None:
    with pytest.raises(TunnelError, match=r"^wm0: malformed UAPI line 'garbage'$"):
        parse_get("wm0", "listen_port=1\ngarbage\nerrno=0\n\n")


# --- format_set -----------------------------------------------------------------------------


def test_format_set_add_peer() -> None:
    body = format_set(changes=[PeerChange(public_key=P1.base64, endpoint="192.0.2.12:51820",
                                          allowed_ips=frozenset({"10.240.2.0/24", "10.240.12.0/24"}),
                                          persistent_keepalive=25)])
    assert body == (
        "set=1\n"
        f"public_key={P1.hex}\n"
        "endpoint=192.0.2.12:51820\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.240.12.0/24\n"
        "allowed_ip=10.240.2.0/24\n"
        "\n"
    )


def test_format_set_update_endpoint_only() -> None:
    body = format_set(changes=[PeerChange(public_key=P1.base64, endpoint="[fd00::12]:51820", update_only=True)])
    assert body == f"set=1\npublic_key={P1.hex}\nupdate_only=true\nendpoint=[fd00::12]:51820\n\n"
    assert "allowed_ip" not in body


def test_format_set_empty_allowed_ips_clears_them() -> None:
    body = format_set(changes=[PeerChange(public_key=P1.base64, allowed_ips=frozenset(), update_only=True)])
    assert body == f"set=1\npublic_key={P1.hex}\nupdate_only=true\nreplace_allowed_ips=true\n\n"


def test_format_set_remove() -> None:
    body = format_set(changes=[PeerChange(public_key=P2.base64, remove=True, endpoint="192.0.2.1:1")])
    assert body == f"set=1\npublic_key={P2.hex}\nremove=true\n\n"


def test_format_set_identity_and_several_peers() -> None:
    body = format_set(private_key=PRIV, listen_port=51821, changes=[
        PeerChange(public_key=P1.base64, remove=True),
        PeerChange(public_key=P2.base64, allowed_ips=frozenset({"10.0.0.0/24"})),
    ])
    lines = body.split("\n")
    assert lines[:3] == ["set=1", f"private_key={PRIV.secret_hex()}", "listen_port=51821"]
    assert lines[3:6] == [f"public_key={P1.hex}", "remove=true", f"public_key={P2.hex}"]
    assert body.endswith("allowed_ip=10.0.0.0/24\n\n")


def test_format_set_without_anything() -> None:
    assert format_set() == "set=1\n\n"


def test_format_set_uses_lowercase_hex_keys() -> None:
    body = format_set(changes=[PeerChange(public_key=P1.base64, remove=True)])
    assert P1.base64 not in body
    assert f"public_key={P1.hex}" in body and P1.hex == P1.hex.lower()


def test_socket_path() -> None:
    assert socket_path("wm0") == Path("/var/run/wireguard/wm0.sock")


# --- UAPIClient against a fake wireguard-go ---------------------------------------------------


class FakeUAPI:
    """Accepts one connection per queued reply, records the request, answers, closes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replies: list[str] = []
        self.requests: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(5)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                buf = b""
                while not buf.endswith(b"\n\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                with self._lock:
                    self.requests.append(buf.decode())
                    reply = self.replies.pop(0) if self.replies else "errno=0\n\n"
                conn.sendall(reply.encode())

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeUAPI]:
    path = tmp_path / "wm0.sock"
    assert len(str(path)) < 100, "unix socket path too long for sun_path"
    server = FakeUAPI(path)
    yield server
    server.close()


def test_client_get_round_trip(fake: FakeUAPI) -> None:
    fake.replies.append(get_reply())
    state = UAPIClient("wm0", path=fake.path, timeout=5).get()
    assert fake.requests == ["get=1\n\n"]
    assert state.public_key == PRIV.public_key().base64
    assert set(state.peers) == {P1.base64, P2.base64}


def test_client_set_sends_the_body(fake: FakeUAPI) -> None:
    body = format_set(listen_port=51820, changes=[PeerChange(public_key=P1.base64, endpoint="192.0.2.12:51820",
                                                             update_only=True)])
    fake.replies.append("errno=0\n\n")
    UAPIClient("wm0", path=fake.path, timeout=5).set(body)
    assert fake.requests == [body]


def test_client_set_errno_raises_without_echoing_the_request(fake: FakeUAPI) -> None:
    fake.replies.append("errno=22\n\n")
    body = format_set(private_key=PRIV, listen_port=51820)
    with pytest.raises(UAPIError) as ei:
        UAPIClient("wm0", path=fake.path, timeout=5).set(body)
    assert ei.value.errno == 22
    assert str(ei.value) == "wm0: UAPI set failed with errno 22"
    assert PRIV.secret_hex() not in str(ei.value)


def test_client_set_without_errno_in_reply(fake: FakeUAPI) -> None:
    fake.replies.append("hello\n\n")
    with pytest.raises(TunnelError, match="no errno in its reply"):
        UAPIClient("wm0", path=fake.path, timeout=5).set("set=1\n\n")


def test_client_alive(fake: FakeUAPI) -> None:
    fake.replies.append(get_reply())
    assert UAPIClient("wm0", path=fake.path, timeout=5).alive() is True


def test_client_without_a_listener_is_device_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    client = UAPIClient("wm9", path=path, timeout=1)
    with pytest.raises(DeviceNotFound) as ei:
        client.get()
    assert ei.value.errno == errno.ENODEV
    assert str(ei.value) == f"wm9: no wireguard-go listening on {path}"
    assert client.alive() is False


def test_client_on_a_stale_socket_file_is_device_not_found(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: what a crashed wireguard-go leaves
    with pytest.raises(DeviceNotFound):
        UAPIClient("wm0", path=path, timeout=1).get()


def test_a_busy_wireguard_go_is_listening_though_not_answering(tmp_path: Path) -> None:
    """A starved wireguard-go takes the connection and answers late: it is there (never started
    over, which cut every tunnel of the node), only nothing listening is a dead one."""
    path = tmp_path / "busy.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)  # never accepts: the connection waits in the backlog, nothing answers
    try:
        client = UAPIClient("wm0", path=path, timeout=0.2)
        assert client.alive() is False and client.listening() is True
    finally:
        server.close()
    assert UAPIClient("wm0", path=tmp_path / "absent.sock", timeout=0.2).listening() is False
