"""Real Consul agents inside lab namespaces: a server per cluster (in its hub) and, on nodes
that run service backends, a client agent joined to it that runs the backends' health checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from wiremesh.agent import AGENT_NICE
from wiremesh.clustermesh import ConsulError, ConsulOptions, ConsulReason, ConsulStore
from wiremesh.tunnels import set_session_nice

from .errors import LabError
from .netns import NetnsExecutor, enter_cmd, pid_alive

HTTP_PORT = 8500


def consul_binary() -> str:
    path = shutil.which("consul")
    if path is None:
        raise LabError("consul is not installed; run scripts/setup.sh (it installs Consul 1.8.7)")
    return path


def write_config(path: Path, *, datacenter: str, node_name: str, data_dir: Path, bind: str,
                 join_wan: list[str] | None = None, acl_master: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
    """A server's config file. `acl_master`: ACLs on (default deny), that token the master and
    the server's own agent token (the file is then 0600). `extra`: settings that override these
    (the lab's TLS: ports, certificates)."""
    cfg = {
        "datacenter": datacenter,
        "node_name": node_name,
        "server": True,
        "bootstrap_expect": 1,
        "data_dir": str(data_dir),
        "bind_addr": bind,
        "client_addr": " ".join(dict.fromkeys([bind, "127.0.0.1"])),
        "ports": {"http": HTTP_PORT, "dns": -1, "grpc": -1},
        "performance": {"raft_multiplier": 1},
        # Consul's own default (512 KiB) would refuse the oversized records the agent must
        # survive; the lab lets them in so that the agent's own limit is what is tested.
        "limits": {"kv_max_value_size": 2 * 1024 * 1024},
        # Lets agents ask for 5 s sessions, so a killed lab node is gone within 10 s.
        "session_ttl_min": "1s",
        "disable_update_check": True,
        "log_level": "warn",
        "ui": False,
        "leave_on_terminate": False,
        "skip_leave_on_interrupt": True,
    }
    if acl_master:
        cfg["primary_datacenter"] = datacenter
        cfg["acl"] = {"enabled": True, "default_policy": "deny", "down_policy": "extend-cache",
                      "tokens": {"master": acl_master, "agent": acl_master}}
    if join_wan:
        cfg["retry_join_wan"] = join_wan
        cfg["retry_interval_wan"] = "1s"
    cfg.update(extra or {})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold the master token
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(cfg, indent=1) + "\n")


def write_client_config(path: Path, *, datacenter: str, node_name: str, data_dir: Path, bind: str,
                        join: list[str], client_addr: str = "127.0.0.1") -> None:
    """A client agent (no server, no UI, no DNS): HTTP on `client_addr` (127.0.0.1 of its
    namespace by default), gossip on `bind`, joined to its cluster's servers `join`."""
    cfg = {
        "datacenter": datacenter,
        "node_name": node_name,
        "server": False,
        "data_dir": str(data_dir),
        "bind_addr": bind,
        "client_addr": client_addr,
        "retry_join": join,
        "retry_interval": "1s",
        "ports": {"http": HTTP_PORT, "dns": -1, "grpc": -1},
        # A check's output is synced to the servers at once too (status changes always are).
        "check_update_interval": "0s",
        "disable_update_check": True,
        "disable_host_node_id": True,
        "enable_script_checks": False,
        "log_level": "warn",
        "ui": False,
        # A graceful leave takes ~4 s; the lab stops its clients only when it goes (or the
        # server goes with them), so they just exit.
        "leave_on_terminate": False,
        "skip_leave_on_interrupt": True,
    }
    path.write_text(json.dumps(cfg, indent=1) + "\n")


CONSUL_NICE = AGENT_NICE - 5


def _consul_priority() -> None:
    """(In the child, before exec.) Consul ahead of the agents (nice CONSUL_NICE). On a host, the
    servers have machines of their own; in the lab they share the cores with every node's agent
    and wireguard-go, which run ahead of ordinary work (nice AGENT_NICE). Left at nice 0, a
    30-node lab under load starved its Consul server: writes timed out (1.7 s), sessions lapsed,
    and rotations were abandoned for readiness that Consul had not answered yet; at the agents'
    priority it still stood for seconds at a time (one Consul among 60 busy processes)."""
    set_session_nice(CONSUL_NICE)  # the process and its session (tunnels.sched)


def start(netns: str, config: Path, log_file: Path) -> int:
    """Start Consul detached inside `netns`; returns its pid."""
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            enter_cmd(netns, None) + [consul_binary(), "agent", f"-config-file={config}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            preexec_fn=_consul_priority,
        )
    return proc.pid


def wait_ready(ex: NetnsExecutor, address: str, pid: int, timeout: float = 60.0, token: str | None = None,
               options: ConsulOptions | None = None) -> None:
    """Wait until the server has elected itself leader and answers KV requests (through
    `options` if given: TLS, a token; else `address` and `token`)."""
    store = ConsulStore(options or ConsulOptions(address=address, timeout=2.0, token=token), retries=False)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise LabError(f"consul (pid {pid}) exited during start-up; see its log")
        try:
            if ex.call(store.leader):
                ex.call(store.list, "wiremesh/")
                return
        except ConsulError as e:
            last = str(e)
            if e.reason is ConsulReason.TLS:  # a certificate problem does not go away by waiting
                raise LabError(f"consul at {address}: {e}") from e
        time.sleep(0.1)
    raise LabError(f"consul at {address} not ready after {timeout:.0f}s: {last}")
