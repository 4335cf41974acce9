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

from wiremesh.clustermesh import ConsulOptions, ConsulStore, NodeRecord, overlay_address
from wiremesh.keys import PrivateKey
from wiremesh.lab import Lab

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
