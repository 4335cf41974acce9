"""UDP buffers of a lab's wireguard-go devices: made large enough for a loaded host, and what
they dropped counted; so are the packets its TUN queue dropped. Shared by the tests and the
benchmarks."""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .netns import pids_in_netns

if TYPE_CHECKING:
    from .lab import Lab


def enlarge_udp_buffers(lab: Lab, size: int = 4 << 20) -> int:
    """Give every node's wireguard-go UDP sockets `size`-byte buffers (SO_RCVBUFFORCE and
    SO_SNDBUFFORCE on a pidfd_getfd copy of each socket), as wireguard-go has done by itself
    since 2023 (7 MiB). The lab's wireguard-go 0.0.20220316 keeps the 208 KiB default, which a
    2-core host under load overflows (UdpRcvbufErrors): losses that are no test's subject.
    Returns how many sockets it changed."""
    changed = 0
    for node in lab.nodes.values():
        for pid in pids_in_netns(node.netns):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() != "wireguard-go":
                    continue
            except OSError:
                continue
            changed += force_socket_buffers(pid, size, lambda s: s.type == socket.SOCK_DGRAM)
    return changed


def force_socket_buffers(pid: int, size: int, which: Callable[[socket.socket], bool]) -> int:
    """Give process `pid`'s IPv4/IPv6 sockets that `which` picks `size`-byte receive and send
    buffers (SO_RCVBUFFORCE, SO_SNDBUFFORCE on a pidfd_getfd copy); returns how many."""
    libc = ctypes.CDLL(None, use_errno=True)
    changed = 0
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except OSError:
                continue
            dup = libc.syscall(438, pidfd, int(fd), 0)  # pidfd_getfd
            if dup < 0:
                continue
            s = socket.socket(fileno=dup)
            try:
                if s.family in (socket.AF_INET, socket.AF_INET6) and which(s):
                    s.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE
                    s.setsockopt(socket.SOL_SOCKET, 32, size)  # SO_SNDBUFFORCE
                    changed += 1
            finally:
                s.close()
    except OSError:
        pass  # it exited
    finally:
        os.close(pidfd)
    return changed


def udp_rcvbuf_errors(lab: Lab) -> dict[str, int]:
    """Per node: UDP datagrams dropped for a full receive buffer (nstat UdpRcvbufErrors)."""
    out = {}
    for n in lab.nodes:
        text = lab.run(n, "nstat", "-az", "UdpRcvbufErrors").stdout
        out[n] = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("UdpRcvbufErrors"))
    return out


def tun_queue_drops(lab: Lab, ifname: str = "wm0") -> dict[str, int]:
    """Per node: packets the kernel dropped at the WireGuard device's transmit queue (a TUN's
    500 packets fill while wireguard-go does not read: a starved process, not a lost tunnel)."""
    import json

    out = {}
    for n in lab.nodes:
        p = lab.run(n, "ip", "-s", "-j", "link", "show", ifname)
        try:
            out[n] = int(json.loads(p.stdout)[0]["stats64"]["tx"]["dropped"])
        except (ValueError, LookupError):
            out[n] = -1  # no such device (a stopped node)
    return out
