"""Network and mount namespaces for lab nodes, and running code or commands inside them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from wiremesh.tunnels import NetnsExecutor as _TunnelsNetnsExecutor

from . import stop
from .errors import LabError

NETNS_DIR = Path("/run/netns")


def sh(*cmd: str, check: bool = True, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command; a failure raises LabError with its stderr."""
    p = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=timeout)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {p.stderr.strip() or p.stdout.strip() or f'exit {p.returncode}'}")
    return p


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def netns_add(name: str) -> None:
    if not netns_exists(name):
        sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")


def netns_del(name: str) -> None:
    """Delete a network namespace; one already gone is fine."""
    if netns_exists(name):
        p = sh("ip", "netns", "del", name, check=False)
        if p.returncode != 0 and netns_exists(name):
            raise LabError(f"ip netns del {name}: {p.stderr.strip()}")


def list_netns(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def make_private_dir(path: Path) -> None:
    """Make `path` a private bind mount, so namespace files can be bind-mounted under it.

    `unshare --mount=FILE` refuses a FILE on a shared mount (systemd makes / shared).
    """
    path.mkdir(parents=True, exist_ok=True)
    if sh("findmnt", "-n", "--mountpoint", str(path), check=False).returncode != 0:
        sh("mount", "--bind", str(path), str(path))
    sh("mount", "--make-private", str(path))


def mountns_add(file: Path) -> None:
    """Create a persistent mount namespace, bound at `file`, with its own /run/wireguard.

    Call it after the network namespace exists: /run/netns is made shared by `ip netns add`.

    wireguard-go puts its UAPI socket at /var/run/wireguard/<ifname>.sock in every network
    namespace alike; a private tmpfs there per node keeps two nodes' wm0 apart.
    """
    if file.exists() and _is_mountpoint(file):
        return
    file.touch()
    Path("/run/wireguard").mkdir(parents=True, exist_ok=True)
    # slave: the node still sees namespaces added later under /run/netns (pods, for the agent),
    # while its own /run/wireguard never leaks back to the host.
    sh("unshare", f"--mount={file}", "--propagation", "slave", "--",
       "mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "wiremesh-lab", "/run/wireguard")


def _is_mountpoint(path: Path) -> bool:
    return sh("findmnt", "-n", "--mountpoint", str(path), check=False).returncode == 0


def umount(path: Path) -> None:
    """Unmount (lazily); not mounted is fine."""
    if _is_mountpoint(path):
        sh("umount", "-l", str(path), check=False)


def enter_cmd(netns: str, mountns: Path | None) -> list[str]:
    """The nsenter prefix that runs a command inside a node (no fork: the pid is the command's)."""
    cmd = ["nsenter", f"--net={netns_path(netns)}"]
    if mountns is not None:
        cmd.insert(1, f"--mount={mountns}")
    return cmd + ["--"]


def pids_in_netns(name: str) -> list[int]:
    """Every process whose network namespace is `name`: what a node runs, whoever started it."""
    try:
        st = netns_path(name).stat()
    except FileNotFoundError:
        return []
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            s = (d / "ns" / "net").stat()
        except OSError:
            continue
        if (s.st_ino, s.st_dev) == (st.st_ino, st.st_dev):
            pids.append(int(d.name))
    return pids


def pid_in_netns(pid: int, name: str) -> bool:
    """True if process `pid` lives in network namespace `name` (so it is the lab's, not a reused pid)."""
    try:
        want = netns_path(name).stat()
        have = Path(f"/proc/{pid}/ns/net").stat()
    except OSError:
        return False
    return (want.st_ino, want.st_dev) == (have.st_ino, have.st_dev)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def terminate(pids: Sequence[int], timeout: float = 5.0) -> None:
    """SIGTERM, SIGKILL whatever is still there after `timeout`; returns once all have exited.

    Raises ProcessesSurvived if one outlives SIGKILL (see stop.stop).
    """
    procs = [p for p in (stop.find(pid, f"pid {pid}") for pid in pids) if p]
    stop.stop(procs, timeout=timeout)


class NetnsExecutor(_TunnelsNetnsExecutor):
    """Runs Python callables in threads inside a lab namespace (by name)."""

    def __init__(self, name: str, workers: int = 4) -> None:
        if not netns_exists(name):
            raise LabError(f"network namespace {name} does not exist")
        super().__init__(netns_path(name), workers)
        self.name = name
