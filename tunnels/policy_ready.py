"""The CNI plugin and the agent agree that a new pod is under policy before ADD returns.

Network policy must hold from a pod's first packet: a pod whose veth has no program yet would be
open to everything for up to a pass. So, where the agent enforces policy:

    <state_dir>/policy/ready.json   the agent, after each policy sync: {"veths": {host ifname: ifindex}}
    <state_dir>/policy/wake.sock    the agent's datagram socket: any datagram wakes its loop

CNI ADD saves the attachment, sends a datagram to wake.sock, and waits until ready.json lists the
pod's host ifname with its ifindex (its maps written and programs attached: a veth made again
under the same name is a new one), a bounded time; no ready.json means
the node enforces no policy and there is nothing to wait for. Files only, in `tunnels` below both
users, like podstate.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

WAIT_S = 10.0


def ready_file(state_dir: Path) -> Path:
    return Path(state_dir) / "policy" / "ready.json"


def wake_socket(state_dir: Path) -> Path:
    return Path(state_dir) / "policy" / "wake.sock"


def write_ready(state_dir: Path, veths: Mapping[str, int]) -> None:
    """The agent: these pods' veths (name -> ifindex) are under policy now (atomic replace)."""
    path = ready_file(state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"veths": dict(sorted(veths.items()))}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clear_ready(state_dir: Path) -> None:
    """The agent, at start: nothing is known to be under policy until its first sync."""
    ready_file(state_dir).unlink(missing_ok=True)


def enforced(state_dir: Path) -> bool:
    return ready_file(state_dir).exists()


def is_ready(state_dir: Path, host_ifname: str, ifindex: int) -> bool:
    try:
        return bool(json.loads(ready_file(state_dir).read_text()).get("veths", {}).get(host_ifname) == ifindex)
    except (OSError, ValueError, AttributeError):
        return False


def wait_ready(state_dir: Path, host_ifname: str, ifindex: int, timeout: float = WAIT_S) -> bool:
    """The CNI plugin: wake the agent and wait until `host_ifname` is under policy. True at once
    where the node enforces no policy."""
    if not enforced(state_dir):
        return True
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"wake", str(wake_socket(state_dir)))
    except OSError:
        pass  # (the agent is away: the wait below says so)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_ready(state_dir, host_ifname, ifindex):
            return True
        time.sleep(0.02)
    return is_ready(state_dir, host_ifname, ifindex)


def serve_wake(state_dir: Path, wake: Callable[[], None], stop: threading.Event,
               failed: Callable[[OSError], None] = lambda _e: None) -> None:
    """The agent's thread: every datagram on wake.sock wakes its loop. A socket that cannot be
    made (a full or read-only state dir) is tried again every few seconds (`failed` told)."""
    path = wake_socket(state_dir)
    while not stop.is_set():
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.bind(str(path))
            except OSError:
                s.close()
                raise
        except OSError as e:
            failed(e)
            stop.wait(5.0)
            continue
        with s:
            s.settimeout(0.5)
            while not stop.is_set():
                try:
                    s.recv(64)
                except TimeoutError:
                    continue
                except OSError:
                    break  # (made again above)
                wake()
