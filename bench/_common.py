"""What the benchmarks share: percentiles, a process's CPU and RSS, a bare blocking-query
watcher (the floor Consul itself sets), unique lab names and a fake node's record.

Not a benchmark itself; the scripts next to it import it (their own folder is on sys.path).
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wiremesh.clustermesh import ConsulOptions, ConsulStore, NodeRecord, overlay_address  # noqa: E402
from wiremesh.keys import PrivateKey  # noqa: E402
from wiremesh.lab import Lab  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads, live and exited), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)


def lab_name(prefix: str) -> str:
    """A lab name no concurrent run uses (at most 12 characters)."""
    return prefix + secrets.token_hex(2)


def fake_record(cluster: str, name: str, pod_cidr: str, endpoint: str, public_key: str | None = None) -> NodeRecord:
    """The record of a node that does not exist: a valid key and the CIDR the caller leased."""
    return NodeRecord(name=name, cluster=cluster, endpoint=endpoint,
                      public_key=public_key or PrivateKey.generate().public_key().base64,
                      pod_cidr=pod_cidr, overlay_ip=overlay_address(pod_cidr))


def bare_watcher(lab: Lab, prefix: str, seen: dict[str, tuple[int, float]], stop: threading.Event,
                 dc: str | None = None) -> None:
    """A plain blocking-query loop, no validation: when does Consul tell a watcher at all?

    `seen[key]` is (ModifyIndex, when that version was first delivered). Cross-cluster, it asks
    the first cluster's Consul with dc=, as the agents do. Runs in the hub until `stop`.
    """
    store = ConsulStore(ConsulOptions(address=lab.consul_address(), timeout=5))

    def run() -> None:
        for _, items in store.watch(prefix, stop, wait_s=5, dc=dc):
            now = time.time()
            for k, item in items.items():
                if seen.get(k, (None,))[0] != item.modify_index:
                    seen[k] = (item.modify_index, now)
    threading.Thread(target=lambda: lab.hub_executor().call(run), daemon=True).start()


# Joins a cgroup v2 group (argv[1]: its cgroup.procs, or "" for none), then enters a network
# namespace (argv[2]) with nsenter, which execs the rest of argv in place (no extra process).
# The order matters: `ip netns exec` would remount /sys and hide the cgroup file system.
_NETNS_EXEC = r"""
import os, sys
if sys.argv[1]:
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
os.execvp("nsenter", ["nsenter", "--net=" + sys.argv[2], *sys.argv[3:]])
"""


def netns_command(netns: str, argv: Sequence[str], cgroup: Path | None = None) -> list[str]:
    """A command line that runs `argv` in network namespace `netns` (made by `ip netns add`) and,
    if given, in the cgroup v2 group `cgroup`, so that eBPF programs attached there apply to it.

    The process that ends up running `argv` is the one subprocess starts (nsenter execs it):
    its pid is the one to signal.
    """
    procs = str(cgroup / "cgroup.procs") if cgroup is not None else ""
    return [sys.executable, "-c", _NETNS_EXEC, procs, f"/run/netns/{netns}", *argv]


def enlarge_udp_buffers(lab: Lab, size: int = 4 << 20) -> int:
    """Give every node's wireguard-go UDP sockets `size`-byte buffers (SO_RCVBUFFORCE and
    SO_SNDBUFFORCE on a pidfd_getfd copy of each socket), as wireguard-go has done by itself
    since 2023 (7 MiB); the lab's 0.0.20220316 keeps the 208 KiB default, which a loaded 2-core
    host overflows (UdpRcvbufErrors). Root only; returns how many sockets it changed."""
    import ctypes
    import socket

    from wiremesh.lab.netns import pids_in_netns

    libc = ctypes.CDLL(None, use_errno=True)
    changed = 0
    for node in lab.nodes.values():
        for pid in pids_in_netns(node.netns):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() != "wireguard-go":
                    continue
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
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
                        if s.type == socket.SOCK_DGRAM and s.family in (socket.AF_INET, socket.AF_INET6):
                            s.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE
                            s.setsockopt(socket.SOL_SOCKET, 32, size)  # SO_SNDBUFFORCE
                            changed += 1
                    finally:
                        s.close()
            finally:
                os.close(pidfd)
    return changed


def udp_rcvbuf_errors(lab: Lab) -> int:
    """UDP datagrams dropped for a full receive buffer, summed over the lab's nodes (nstat)."""
    total = 0
    for n in lab.nodes:
        text = lab.run(n, "nstat", "-az", "UdpRcvbufErrors").stdout
        total += sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("UdpRcvbufErrors"))
    return total
