"""Helpers for integration tests: polling for real state, pings, wg dumps."""

from __future__ import annotations

import shutil

import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wiremesh.keys import read_key_file
from wiremesh.lab import Lab
from wiremesh.lab.udpbuf import (  # noqa: F401 - the tests' names
    enlarge_udp_buffers,
    force_socket_buffers,
    tun_queue_drops,
    udp_rcvbuf_errors,
)


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> float:
    """Poll `pred` until it is truthy; return the seconds it took. Fails the test on timeout."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def ping_ok(lab: Lab, node: str, addr: str, wait_s: float = 1.0) -> bool:
    return lab.run(node, "ping", "-c", "1", "-W", str(wait_s), addr).returncode == 0


def reaches(lab: Lab, node: str, addr: str, within: float = 6.0) -> float | None:
    """Seconds until `node` had a reply from `addr` (one ping a second), None if none within
    `within`. For a tunnel's first packet: an initiation that found the other side not ready
    yet is retried by WireGuard 5 s later (REKEY_TIMEOUT); callers record a slow one."""
    t0 = time.monotonic()
    ok = lab.run(node, "ping", "-c", "1", "-w", str(int(within)), addr).returncode == 0
    return time.monotonic() - t0 if ok else None


def wg_peers(lab: Lab, node: str) -> dict[str, dict[str, Any]]:
    """`wg show wm0 dump` inside the node: public key -> endpoint, allowed IPs."""
    out = lab.run(node, "wg", "show", "wm0", "dump", check=True).stdout.splitlines()
    peers = {}
    for line in out[1:]:
        f = line.split("\t")
        peers[f[0]] = {"endpoint": f[2], "allowed_ips": set(f[3].split(",")) if f[3] != "(none)" else set(),
                       "latest_handshake": int(f[4])}
    return peers


def record_key(lab: Lab, node: str) -> str:
    return read_key_file(Path(lab.node(node).dir) / "private.key").public_key().base64


ECHO_PORT = 7777
ECHO_SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    f"s.bind(('0.0.0.0', {ECHO_PORT})); s.listen(64)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(c.recv(1024)); c.close()\n"
)
ECHO_CLIENT = (
    "import socket, sys\n"
    f"c = socket.create_connection((sys.argv[1], {ECHO_PORT}), timeout=3); c.sendall(b'wiremesh')\n"
    "assert c.recv(1024) == b'wiremesh'\n"
)


@contextlib.contextmanager
def echo_servers(lab: Lab) -> Iterator[None]:
    """A TCP echo server in every pod of the lab, for the whole `with` block."""
    servers = [lab.popen(name, sys.executable, "-c", ECHO_SERVER, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL) for name in lab.pods]
    try:
        yield
    finally:
        for s in servers:
            s.kill()
            s.wait()


class Pinger:
    """`ping -i INTERVAL` inside a node or pod, in the background; `.stop()` returns (sent, received).

    The packet in flight when ping is stopped cannot have been answered yet: it is not counted
    as sent, so a loss means a packet that had its full chance to come back.
    """

    def __init__(self, lab: Lab, node: str, addr: str, interval: float = 0.05) -> None:
        self.proc = lab.popen(node, "ping", "-n", "-D", "-i", str(interval), "-W", "1", addr,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> tuple[int, int]:
        self.proc.send_signal(2)
        out, _ = self.proc.communicate(timeout=10)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out[-500:]
        sent, received = int(m.group(1)), int(m.group(2))
        answered = {int(x) for x in re.findall(r"icmp_seq=(\d+) ", out)}
        if sent and sent not in answered:
            sent -= 1  # the last one was still in flight
        return sent, received


# --- key rotation under traffic (test_rotation, bench/rotation) ---------------------------------


def device_key(lab: Lab, node: str) -> str:
    """The public key the node's WireGuard device uses now (`wg show wm0 public-key`)."""
    return lab.run(node, "wg", "show", "wm0", "public-key", check=True).stdout.strip()


Gap = tuple[int, int, float, float]


def ping_losses(text: str, in_flight_max: int = 100) -> tuple[int, int, list[Gap]]:
    """(sent, lost, gaps) from `ping -n -D` output: replies are read per icmp_seq (16 bits,
    unwrapped in order). The packets after the last answered one, if at most `in_flight_max`,
    were still in flight when ping was stopped: not sent for the count; more are losses.
    A gap is (first seq, last seq, unix times of the replies before and after it, 0.0 if none):
    its length in time says more than its count, as ping sends less while nothing comes back."""
    m = re.search(r"(\d+) packets transmitted", text)
    assert m, text[-500:]
    sent = int(m.group(1))
    answered: dict[int, float] = {}
    base, last = 0, 0
    for ts, s in re.findall(r"^(?:\[(\d+\.\d+)\] )?\d+ bytes from \S+ icmp_seq=(\d+) ", text, re.M):
        v = int(s)
        if v + base < last - 32768:
            base += 65536
        last = v + base
        answered.setdefault(last, float(ts or 0))
    top = max(answered, default=0)
    if sent - top <= in_flight_max:
        sent = top
    gaps: list[Gap] = []
    for seq in range(1, sent + 1):
        if seq in answered:
            continue
        if gaps and gaps[-1][1] == seq - 1:
            gaps[-1] = (gaps[-1][0], seq, gaps[-1][2], answered.get(seq + 1, 0.0))
        else:
            gaps.append((seq, seq, answered.get(seq - 1, 0.0), answered.get(seq + 1, 0.0)))
    return sent, sum(g[1] - g[0] + 1 for g in gaps), gaps


def _icmp(s: socket.socket) -> bool:
    return s.proto in (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6)


class FastPinger:
    """`ping -D -i INTERVAL` (1 000/s by default) inside a node or pod, replies written to a
    file (a pipe would fill and stall ping); `.stop()` returns (sent, lost, gaps) as ping_losses
    counts them."""

    def __init__(self, lab: Lab, node: str, addr: str, out: Path, interval: float = 0.001) -> None:
        self.node, self.addr, self.out, self.interval = node, addr, out, interval
        self._f = open(out, "w")
        self.started = self.stopped = time.monotonic()
        self.proc = lab.popen(node, "ping", "-n", "-D", "-i", str(interval), "-W", "1", addr,
                              stdout=self._f, stderr=subprocess.STDOUT)
        # ping's own receive buffer (64 KiB: ~100 replies) overflows when a busy host leaves it
        # without CPU for 0.1 s: replies the mesh delivered, counted lost (/proc/net/raw drops).
        # 4 MiB holds seconds of them; the count is then the mesh's alone.
        wait_until(lambda: self.proc.poll() is not None or force_socket_buffers(self.proc.pid, 4 << 20, _icmp),
                   10, interval=0.001, what=f"ping in {node} to open its socket")

    def answered(self) -> int:
        """The highest icmp_seq answered so far (16 bits, unwrapped as ping_losses does)."""
        base = last = 0
        for s in re.findall(r"icmp_seq=(\d+) ", self.out.read_text(errors="replace")):
            v = int(s)
            if v + base < last - 32768:
                base += 65536
            last = v + base
        return last

    def wait_answered(self, seq: int, timeout: float) -> None:
        """Wait until packet `seq` or a later one is answered: ping's rate is the host's (on two
        busy cores `ping -i 0.001` reaches 150-1000/s), so a figure of packets is waited for."""
        wait_until(lambda: self.answered() >= seq or self.proc.poll() is not None, timeout, interval=0.1,
                   what=f"{self.node} -> {self.addr}: packet {seq} answered (now {self.answered()})")

    def stop(self) -> tuple[int, int, list[Gap]]:
        self.stopped = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(2)
        try:
            self.proc.wait(timeout=10)
        finally:
            self._f.close()
        return ping_losses(self.out.read_text(errors="replace"))


IPERF_PORT = 5301


def iperf3_json(path: Path) -> dict[str, Any]:
    import json

    text = path.read_text(errors="replace")
    try:
        d: dict[str, Any] = json.loads(text)
        return d
    except ValueError:
        return {"error": f"no JSON: {text[-300:]!r}"}


def keep_agent_logs(lab: Lab, keep: Path) -> None:
    """Copy every node's agent.log into `keep` (before the lab goes, for a failure's post-mortem)."""
    for n in lab.nodes:
        log = Path(lab.node(n).dir) / "agent.log"
        if log.exists():
            shutil.copy(log, keep / f"{n}.log")
        wg = Path(lab.node(n).dir) / "wireguard-go-wm0.log"  # (handshakes with WIREMESH_WG_LOG_LEVEL=verbose)
        if wg.exists() and wg.stat().st_size:
            shutil.copy(wg, keep / f"{n}.wireguard-go.log")


def tunnel_diagnosis(lab: Lab, a: str, b: str, lines: int = 15) -> str:
    """What a failed a <-> b reachability check leaves for its post-mortem: each side's
    `wg show` and the tail of its agent log (CI shows only the assertion's message)."""
    out = []
    for n in (a, b):
        wg = lab.run(n, "wg", "show", "wm0")
        log = Path(lab.node(n).dir) / "agent.log"
        tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
        out += [f"--- {n}: wg show wm0", wg.stdout.strip() or wg.stderr.strip(), f"--- {n}: agent.log", *tail]
    return "\n".join(out)


def agent_log_near(lab: Lab, nodes: list[str], t: float, before: float = 1.0, after: float = 0.5,
                   most: int = 25) -> str:
    """Each node's agent.log lines from `before` s before unix time `t` to `after` s after it (the
    `most` nearest `t` each): what the agents did around a ping gap, for a failure's message (CI
    shows only that)."""
    import datetime

    out = []
    for n in nodes:
        log = Path(lab.node(n).dir) / "agent.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        near = []
        for line in lines:
            try:
                at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if t - before <= at <= t + after:
                near.append((abs(at - t), len(near), line[:240]))
        kept = sorted(sorted(near)[:most], key=lambda x: x[1])
        out += [f"--- {n}: agent.log {before:.1f} s before to {after:.1f} s after the gap", *(x[2] for x in kept)]
    return "\n".join(out)
