"""The CNI plugin waits for the agent to put a new pod under policy (tunnels.policy_ready)."""

from __future__ import annotations

import threading
from pathlib import Path

from wiremesh.tunnels import policy_ready


def test_no_wait_where_the_node_enforces_no_policy(tmp_path: Path) -> None:
    assert policy_ready.wait_ready(tmp_path, "wmp-x", 7, timeout=0.1)


def test_add_wakes_the_agent_and_returns_once_its_veth_is_listed(tmp_path: Path) -> None:
    policy_ready.write_ready(tmp_path, {"wmp-old": 5})
    stop = threading.Event()

    def agent_pass() -> None:  # what the agent's loop does when woken: a pass, then the file
        policy_ready.write_ready(tmp_path, {"wmp-old": 5, "wmp-new": 9})
    t = threading.Thread(target=policy_ready.serve_wake, args=(tmp_path, agent_pass, stop), daemon=True)
    t.start()
    try:
        for _ in range(200):  # (the socket is bound by the thread)
            if policy_ready.wake_socket(tmp_path).exists():
                break
            threading.Event().wait(0.01)
        assert not policy_ready.is_ready(tmp_path, "wmp-new", 9)
        assert policy_ready.wait_ready(tmp_path, "wmp-new", 9, timeout=10)
    finally:
        stop.set()
        t.join(5)


def test_a_veth_the_agent_never_lists_times_out(tmp_path: Path) -> None:
    policy_ready.write_ready(tmp_path, {"wmp-old": 5})
    assert not policy_ready.wait_ready(tmp_path, "wmp-new", 9, timeout=0.2)
    assert policy_ready.is_ready(tmp_path, "wmp-old", 5)
    assert not policy_ready.wait_ready(tmp_path, "wmp-old", 6, timeout=0.2)  # the same name, a new veth
