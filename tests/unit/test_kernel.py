"""tunnels.kernel's pure parts and tunnels.open_device's choice of backend (no netlink)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

import wiremesh.tunnels.device
from wiremesh.keys import PrivateKey
from wiremesh.tunnels import BACKENDS, KernelUnsupported, PeerChange, TunnelError, UserspaceDevice, open_device
from wiremesh.tunnels.kernel import KernelDevice, change_to_netlink, parse_device

P1 = PrivateKey(b"\x11" * 32).public_key().base64


# --- change_to_netlink ----------------------------------------------------------------------


def test_add_peer() -> None:
    ch = PeerChange(public_key=P1, endpoint="192.0.2.12:51820",
                    allowed_ips=frozenset({"10.240.2.0/24", "10.240.12.0/24"}), persistent_keepalive=25)
    assert change_to_netlink(ch) == {
        "public_key": P1,
        "endpoint_addr": "192.0.2.12",
        "endpoint_port": 51820,
        "persistent_keepalive": 25,
        "replace_allowed_ips": True,
        "allowed_ips": ["10.240.12.0/24", "10.240.2.0/24"],
    }


def test_update_endpoint_only() -> None:
    ch = PeerChange(public_key=P1, endpoint="192.0.2.99:40000", update_only=True)
    assert change_to_netlink(ch) == {
        "public_key": P1, "update_only": True, "endpoint_addr": "192.0.2.99", "endpoint_port": 40000,
    }


def test_update_allowed_ips_only() -> None:
    ch = PeerChange(public_key=P1, allowed_ips=frozenset({"10.1.0.0/24"}), update_only=True)
    assert change_to_netlink(ch) == {
        "public_key": P1, "update_only": True, "replace_allowed_ips": True, "allowed_ips": ["10.1.0.0/24"],
    }


def test_remove() -> None:
    ch = PeerChange(public_key=P1, remove=True, endpoint="192.0.2.1:1", allowed_ips=frozenset({"10.0.0.0/8"}))
    assert change_to_netlink(ch) == {"public_key": P1, "remove": True}


def test_ipv6_endpoint() -> None:
    ch = PeerChange(public_key=P1, endpoint="[fd00::12]:51820")
    nl = change_to_netlink(ch)
    assert nl["endpoint_addr"] == "fd00::12"
    assert nl["endpoint_port"] == 51820
    assert "[" not in nl["endpoint_addr"]


def test_keepalive_zero_is_sent() -> None:
    nl = change_to_netlink(PeerChange(public_key=P1, persistent_keepalive=0, update_only=True))
    assert nl == {"public_key": P1, "update_only": True, "persistent_keepalive": 0}


# --- parse_device over fake netlink messages -------------------------------------------------


class Msg:
    def __init__(self, **attrs: Any) -> None:
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def test_parse_device_turns_private_key_into_public() -> None:
    priv = PrivateKey(bytes(range(1, 33)))
    peer = Msg(
        WGPEER_A_PUBLIC_KEY=P1.encode(),
        WGPEER_A_ENDPOINT={"addr": "fd00::12", "port": 51820},
        WGPEER_A_ALLOWEDIPS=[Msg(WGALLOWEDIP_A_IPADDR="10.240.2.0", WGALLOWEDIP_A_CIDR_MASK=24)],
        WGPEER_A_LAST_HANDSHAKE_TIME={"tv_sec": 1700000000, "tv_nsec": 500000000},
        WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL=25,
        WGPEER_A_RX_BYTES=5,
        WGPEER_A_TX_BYTES=7,
    )
    msg = Msg(WGDEVICE_A_PRIVATE_KEY=priv.secret_base64().encode(), WGDEVICE_A_LISTEN_PORT=51820,
              WGDEVICE_A_PEERS=[peer])
    state = parse_device("wm0", [msg])
    assert state.public_key == priv.public_key().base64
    assert state.listen_port == 51820
    p = state.peers[P1]
    assert p.endpoint == "[fd00::12]:51820"
    assert p.allowed_ips == frozenset({"10.240.2.0/24"})
    assert p.latest_handshake == pytest.approx(1700000000.5)
    assert (p.persistent_keepalive, p.rx_bytes, p.tx_bytes) == (25, 5, 7)
    assert priv.secret_base64() not in repr(state)
    assert base64.b64decode(state.public_key) == priv.public_key().raw


# --- open_device ----------------------------------------------------------------------------


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set whether the kernel 'has' WireGuard."""

    def set_available(available: bool) -> None:
        monkeypatch.setattr(wiremesh.tunnels.device, "kernel_module_available", lambda: available)

    return set_available


def test_backends() -> None:
    assert BACKENDS == ("auto", "kernel", "userspace")


def test_auto_picks_kernel_when_module_present(module: Any) -> None:
    module(True)
    dev = open_device("wm0", "auto")
    assert isinstance(dev, KernelDevice)
    assert dev.backend == "kernel" and dev.name == "wm0"


def test_auto_picks_userspace_without_module(module: Any, tmp_path: Path) -> None:
    module(False)
    dev = open_device("wm0", "auto", state_dir=tmp_path)
    assert isinstance(dev, UserspaceDevice)
    assert dev.backend == "userspace" and dev.name == "wm0"
    assert dev.pid_file == tmp_path / "wireguard-go-wm0.pid"


def test_default_backend_is_auto(module: Any) -> None:
    module(False)
    assert open_device("wm0").backend == "userspace"


def test_userspace_explicit_even_with_module(module: Any) -> None:
    module(True)
    assert isinstance(open_device("wm0", "userspace"), UserspaceDevice)


def test_kernel_explicit_with_module(module: Any) -> None:
    module(True)
    assert isinstance(open_device("wm0", "kernel"), KernelDevice)


def test_kernel_explicit_without_module_is_unsupported(module: Any) -> None:
    module(False)
    with pytest.raises(KernelUnsupported) as ei:
        open_device("wm7", "kernel")
    msg = str(ei.value)
    assert msg.startswith("wm7: ")
    assert "no WireGuard module" in msg
    assert 'backend = "userspace"' in msg
    assert isinstance(ei.value, TunnelError)


@pytest.mark.parametrize("backend", ["ebpf", "", "Kernel", "AUTO"])
def test_unknown_backend(module: Any, backend: str) -> None:
    module(True)
    with pytest.raises(TunnelError) as ei:
        open_device("wm0", backend)
    assert not isinstance(ei.value, KernelUnsupported)
    assert str(ei.value) == f"backend: must be one of auto, kernel, userspace, not {backend!r}"


class DecodedMsg(Msg):
    """An allowed IP as pyroute2 0.9.7 gives it: the address as hex bytes, the CIDR decoded as `addr`."""

    def __init__(self, addr: str | None, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.addr = addr

    def get(self, name: str) -> Any:
        return self.addr if name == "addr" else None


@pytest.mark.parametrize("allowed, want", [
    (DecodedMsg("10.9.0.0/24", WGALLOWEDIP_A_IPADDR="0a:09:00:00", WGALLOWEDIP_A_CIDR_MASK=24), "10.9.0.0/24"),
    (DecodedMsg(None, WGALLOWEDIP_A_IPADDR="0a:09:00:00", WGALLOWEDIP_A_CIDR_MASK=24), "10.9.0.0/24"),
    (Msg(WGALLOWEDIP_A_IPADDR="fd:00:00:00:00:00:00:00:00:00:00:00:00:00:00:12", WGALLOWEDIP_A_CIDR_MASK=128),
     "fd00::12/128"),
    (Msg(WGALLOWEDIP_A_IPADDR=bytes([10, 9, 0, 1]), WGALLOWEDIP_A_CIDR_MASK=32), "10.9.0.1/32"),
])
def test_allowed_ips_in_the_forms_pyroute2_gives(allowed: Msg, want: str) -> None:
    peer = Msg(WGPEER_A_PUBLIC_KEY=P1.encode(), WGPEER_A_ALLOWEDIPS=[allowed])
    assert parse_device("wm0", [Msg(WGDEVICE_A_PEERS=[peer])]).peers[P1].allowed_ips == frozenset({want})
