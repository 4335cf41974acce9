"""Taking a lab down: stopping everything it runs, in order, and returning only once it has all
exited; then its namespaces, mounts and files.

Agents go first: an agent still running could start a new wireguard-go for a device whose old
one was just stopped. Then whatever runs in the nodes and pods (wireguard-go, Consul client
agents, service backends, commands started with `lab exec`), then the hubs (Consul last: agents
remove their records on the way out). The processes are found by network namespace and by the
lab's cgroups, whoever started them, and named from the lab's state and the pid files the agents
write, so that an error says which one would not stop. Once all have exited, every node's eBPF
service lookup is detached and unpinned and the lab's cgroups are removed.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from wiremesh.errors import WiremeshError

from . import netns, services, stop
from .errors import LabError, LabNotFound, ProcessesSurvived

if TYPE_CHECKING:
    from .lab import Lab

AGENT_TIMEOUT = 10.0  # an agent removes its record from Consul and closes its watches on SIGTERM
DAEMON_TIMEOUT = 5.0  # wireguard-go, Consul and anything else found in the namespaces
KILL_TIMEOUT = 5.0  # after SIGKILL: only a process stuck in the kernel takes longer
REAP_TIMEOUT = 3.0  # best effort: orphans are collected by init, not by us (process_api here: within ~2 s)
SWEEPS = 3

Progress = Callable[[str], None]


def remove_lab(lab: "Lab", progress: Progress) -> list[str]:
    """Remove everything `up` made: processes, namespaces, mounts, files; returns what went.

    If a process survives SIGKILL, the namespaces and state stay (ProcessesSurvived is raised),
    so that `down` can be run again once it is gone.
    """
    removed: list[str] = []
    try:
        lab.load()
    except (LabNotFound, ValueError):
        lab.state = {}
    names = set(netns.list_netns(lab.prefix))
    names |= {n["netns"] for n in lab.state.get("nodes", {}).values()}
    try:
        stopped = stop_lab_processes(lab, names, progress)
    finally:
        lab.close()
    lookup_error: Exception | None = None
    try:
        try:
            removed += services.unload_lookups(lab)
        except (WiremeshError, OSError) as e:  # the rest still goes; `down` again retries this
            lookup_error = e
        for ns in sorted(names):
            netns.netns_del(ns)
            removed.append(f"netns {ns}")
        mnt = lab.dir / "mnt"
        if mnt.is_dir():
            for f in mnt.iterdir():
                netns.umount(f)
        if lab.dir.exists():
            shutil.rmtree(lab.dir, ignore_errors=True)
            removed.append(f"dir {lab.dir}")
        if lab.root.is_dir() and not any(lab.root.iterdir()):
            netns.umount(lab.root)
            try:
                lab.root.rmdir()
            except OSError:
                pass
    except BaseException:
        stop.wait_reaped(stopped, 0)  # closes the handles
        raise
    for r in removed:
        progress(f"removed {r}")
    # All have exited; their parent (init, for a lab that another process started) may not have
    # collected them yet. Waiting for that too leaves not even a zombie behind.
    stop.wait_reaped(stopped, REAP_TIMEOUT)
    if lookup_error is not None:
        raise LabError(f"lab {lab.name}: eBPF service lookup or cgroup left behind: {lookup_error}; "
                       f"run 'wiremesh lab down -n {lab.name}' again")
    return removed


def stop_lab_processes(lab: "Lab", names: Iterable[str], progress: Progress) -> list[stop.Process]:
    """Stop every process of the lab whose network namespaces are `names`; returns them all
    exited, their handles open for `stop.wait_reaped`.

    Raises ProcessesSurvived (naming them) if any is still running after SIGKILL, or if
    processes keep appearing in the namespaces.
    """
    names = sorted(set(names))
    known = _names_of_processes(lab)
    nodes = lab.state.get("nodes", {})
    stopped: list[stop.Process] = []
    try:
        live = lab.nodes  # the agents' pids as their keepers last wrote them (a restart changes it)
        agents = [_find(n.get("keeper_pid", 0), f"keeper of {name}'s agent", n["netns"]) for name, n in nodes.items()]
        agents += [_find(live[name].pid if name in live else n.get("pid", 0), f"agent of {name}", n["netns"])
                   for name, n in nodes.items()]
        stopped += _stop("agents", [p for p in agents if p], AGENT_TIMEOUT, progress)
        hubs = _hub_names(lab, names)
        stopped += _stop("processes in nodes and pods", _in([n for n in names if n not in hubs], known),
                         DAEMON_TIMEOUT, progress)
        stopped += _stop("processes in the hubs", _in([n for n in names if n in hubs], known), DAEMON_TIMEOUT,
                         progress)
        # Whatever joined a node's cgroup (through `lab exec POD`) but never entered a namespace.
        stopped += _stop("processes in the lab's cgroups", _in_cgroups(lab, known), DAEMON_TIMEOUT, progress)
        for _ in range(SWEEPS):  # nothing may outlive its namespace, even what started meanwhile
            left = _union(_in(names, known), _in_cgroups(lab, known))
            if not left:
                return stopped
            stopped += _stop("processes that appeared meanwhile", left, DAEMON_TIMEOUT, progress)
        left = _union(_in(names, known), _in_cgroups(lab, known))
        if left:
            desc = ", ".join(str(p) for p in left)
            for p in left:
                p.close()
            raise ProcessesSurvived(f"processes keep appearing in the lab's namespaces: {desc}",
                                    [p.pid for p in left])
        return stopped
    except BaseException:
        for p in stopped:
            p.close()
        raise


def _stop(what: str, procs: list[stop.Process], timeout: float, progress: Progress) -> list[stop.Process]:
    if procs:
        progress(f"stopping {len(procs)} {what}: {', '.join(p.what for p in procs)}")
        seconds = stop.stop(procs, timeout=timeout, kill_timeout=KILL_TIMEOUT, close=False)
        progress(f"{len(procs)} {what} exited in {seconds:.2f}s")
    return procs


def _names_of_processes(lab: "Lab") -> dict[int, str]:
    """pid -> what it is, from the lab's state and the pid files the agents write."""
    known: dict[int, str] = {}
    for name, n in lab.state.get("nodes", {}).items():
        for f in Path(n["dir"]).glob("wireguard-go-*.pid"):
            try:
                known[int(f.read_text())] = f"wireguard-go of {name}"
            except (OSError, ValueError):
                continue
    for c in lab.state.get("clusters", []):
        if c.get("consul_pid"):
            known[c["consul_pid"]] = f"consul of cluster {c['name']}"
    for node, pid in lab.state.get("consul_clients", {}).items():
        known[pid] = f"Consul client agent of {node}"
    for name, svc in lab.state.get("services", {}).items():
        for pod, b in svc.get("backends", {}).items():
            known[b.get("pid", 0)] = f"backend of service {name} in pod {pod}"
    return known


def _in(names: Iterable[str], known: dict[int, str]) -> list[stop.Process]:
    """Every process in the network namespaces `names`, each held by a pidfd."""
    found = []
    for ns in names:
        for pid in netns.pids_in_netns(ns):
            p = _find(pid, known.get(pid) or f"{_comm(pid)} in {ns}", ns)
            if p:
                found.append(p)
    return found


def _union(a: list[stop.Process], b: list[stop.Process]) -> list[stop.Process]:
    """`a` and those of `b` not already in it (by pid); duplicates' handles are closed."""
    pids = {p.pid for p in a}
    for p in b:
        if p.pid in pids:
            p.close()
        else:
            a.append(p)
    return a


def _in_cgroups(lab: "Lab", known: dict[int, str]) -> list[stop.Process]:
    """Every process in the lab's cgroups that no lab namespace holds (those are found by `_in`)."""
    root = services.cgroup_root(lab)
    found = []
    for procs in root.rglob("cgroup.procs") if root.is_dir() else []:
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except (OSError, ValueError):
            continue
        for pid in pids:
            p = _find_any(pid, known.get(pid) or f"{_comm(pid)} in cgroup {procs.parent}",
                          functools.partial(_in_cgroup, procs))
            if p:
                found.append(p)
    return found


def _in_cgroup(procs: Path, pid: int) -> bool:
    try:
        return str(pid) in procs.read_text().split()
    except OSError:
        return False


def _find_any(pid: int, what: str, belongs: Callable[[int], bool]) -> stop.Process | None:
    if pid == os.getpid():
        return None
    return stop.find(pid, what, belongs=belongs)


def _find(pid: int, what: str, ns: str) -> stop.Process | None:
    if pid == os.getpid():
        return None
    return stop.find(pid, what, belongs=lambda p: netns.pid_in_netns(p, ns))


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "process"


def _hub_names(lab: "Lab", names: Iterable[str]) -> set[str]:
    """The lab's infrastructure namespaces: hubs (switch, router, Consul) and the WAN."""
    hubs = {c["hub"] for c in lab.state.get("clusters", [])}
    return hubs | {n for n in names if n.startswith(lab.hub) or n == lab.prefix + "wan"}
