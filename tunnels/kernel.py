"""The kernel WireGuard backend: rtnetlink for the link, generic netlink for its configuration."""

from __future__ import annotations

import base64
import errno
import ipaddress
import re
from typing import Any

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from wiremesh.keys import PrivateKey, PublicKey

from . import links
from .device import WireGuardDevice
from .errors import DeviceNotFound, TunnelError
from .model import STAGED_PSK, DeviceState, PeerChange, PeerStatus, split_endpoint

_STAGED_B64 = base64.b64encode(STAGED_PSK).decode()
_NO_PSK_B64 = base64.b64encode(bytes(32)).decode()


def change_to_netlink(change: PeerChange) -> dict[str, Any]:
    """Translate one peer change into pyroute2's `WireGuard.set(peer=...)` form (pure)."""
    peer: dict[str, Any] = {"public_key": change.public_key}
    if change.remove:
        peer["remove"] = True
        return peer
    if change.update_only and not change.recreate:
        peer["update_only"] = True
    if change.staged is not None:
        peer["preshared_key"] = _STAGED_B64 if change.staged else _NO_PSK_B64
    if change.endpoint is not None:
        host, port = split_endpoint(change.endpoint)
        peer["endpoint_addr"] = host
        peer["endpoint_port"] = port
    if change.persistent_keepalive is not None:
        peer["persistent_keepalive"] = change.persistent_keepalive
    if change.allowed_ips is not None:
        peer["replace_allowed_ips"] = True
        peer["allowed_ips"] = sorted(change.allowed_ips)
    return peer


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    value = msg.get_attr(name)
    return default if value is None else value


def _allowed_ip(a: Any) -> str:
    """One allowed IP of a dump, "10.9.0.0/24". pyroute2 (0.9.7, seen in a VM with the module)
    gives WGALLOWEDIP_A_IPADDR as hex bytes ("0a:09:00:00"), and the decoded CIDR as `addr`."""
    decoded = a.get("addr") if hasattr(a, "get") else None
    if isinstance(decoded, str) and "/" in decoded:
        return str(ipaddress.ip_network(decoded, strict=False))
    raw, mask = a.get_attr("WGALLOWEDIP_A_IPADDR"), a.get_attr("WGALLOWEDIP_A_CIDR_MASK")
    if isinstance(raw, str) and re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){3}|[0-9a-f]{2}(:[0-9a-f]{2}){15}", raw):
        raw = ipaddress.ip_address(bytes.fromhex(raw.replace(":", "")))
    elif isinstance(raw, bytes) and len(raw) in (4, 16):
        raw = ipaddress.ip_address(raw)
    return f"{raw}/{mask}"


def parse_device(name: str, messages: list[Any]) -> DeviceState:
    """Turn the WG_CMD_GET_DEVICE dump into a DeviceState (the private key becomes its public half)."""
    public_key = None
    port = 0
    peers: dict[str, PeerStatus] = {}
    for msg in messages:
        priv = msg.get_attr("WGDEVICE_A_PRIVATE_KEY")
        if priv:
            public_key = PrivateKey.from_base64(priv.decode() if isinstance(priv, bytes) else priv).public_key().base64
        port = _attr(msg, "WGDEVICE_A_LISTEN_PORT", port)
        for p in msg.get_attr("WGDEVICE_A_PEERS") or []:
            key = p.get_attr("WGPEER_A_PUBLIC_KEY")
            key = key.decode() if isinstance(key, bytes) else key
            ep = p.get_attr("WGPEER_A_ENDPOINT")
            endpoint = None
            if ep and ep.get("addr") and ep.get("port"):
                addr = ep["addr"]
                endpoint = f"[{addr}]:{ep['port']}" if ":" in addr else f"{addr}:{ep['port']}"
            allowed = set()
            for a in p.get_attr("WGPEER_A_ALLOWEDIPS") or []:
                allowed.add(_allowed_ip(a))
            hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
            psk = p.get_attr("WGPEER_A_PRESHARED_KEY")
            peers[key] = PeerStatus(
                public_key=PublicKey.from_base64(key).base64,
                endpoint=endpoint,
                allowed_ips=frozenset(allowed),
                persistent_keepalive=int(_attr(p, "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 0)),
                latest_handshake=float(hs.get("tv_sec", 0)) + float(hs.get("tv_nsec", 0)) / 1e9,
                rx_bytes=int(_attr(p, "WGPEER_A_RX_BYTES", 0)),
                tx_bytes=int(_attr(p, "WGPEER_A_TX_BYTES", 0)),
                staged=psk in (STAGED_PSK, _STAGED_B64, _STAGED_B64.encode()),
            )
    return DeviceState(name=name, public_key=public_key, listen_port=int(port), peers=peers)


class KernelDevice(WireGuardDevice):
    """WireGuard in the kernel, configured over generic netlink."""

    backend = "kernel"

    def exists(self) -> bool:
        return links.link_exists(self.name)

    def create(self) -> None:
        if self.exists():
            return
        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname=self.name, kind="wireguard")
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise TunnelError(f"{self.name}: create wireguard link: {e}", e.code) from e

    def show(self) -> DeviceState:
        try:
            with WireGuard() as wg:
                return parse_device(self.name, list(wg.info(self.name)))
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):
                raise DeviceNotFound(f"{self.name}: no such WireGuard device") from e
            raise TunnelError(f"{self.name}: read device: {e}", e.code) from e

    def _set(self, private_key: PrivateKey | None, listen_port: int | None, changes: list[PeerChange]) -> None:
        try:
            with WireGuard() as wg:
                if private_key is not None or listen_port is not None:
                    wg.set(
                        self.name,
                        private_key=private_key.secret_base64() if private_key else None,
                        listen_port=listen_port,
                    )
                # pyroute2 sends one peer per message; each is its own small, atomic update. A
                # replacing peer takes the allowed IPs over (the kernel moves them): no moment
                # without a peer for those IPs. The old peer stays without any until the caller
                # removes it a moment later (at once, it would drop what it still holds).
                for change in changes:
                    if change.recreate:  # a fresh entry: removed first (see PeerChange.recreate)
                        wg.set(self.name, peer={"public_key": change.public_key, "remove": True})
                    wg.set(self.name, peer=change_to_netlink(change))
        except NetlinkError as e:
            raise TunnelError(f"{self.name}: configure device: errno {e.code}", e.code) from None


