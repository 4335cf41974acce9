"""The lab through its CLI, as a user runs it: up, status, exec, up again, down, and a crash half-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from wiremesh.lab import LAB_ROOT, Lab
from wiremesh.lab.lab import wiremesh_binary
from wiremesh.lab.netns import list_netns, pids_in_netns

from .conftest import new_lab_name
from .helpers import reaches, wait_until


def wm(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([wiremesh_binary(), *args], capture_output=True, text=True, timeout=timeout)


def assert_gone(name: str) -> None:
    assert list_netns(f"wmlab-{name}-") == []
    assert not (LAB_ROOT / name).exists()


def test_up_status_exec_up_again_down() -> None:
    name = new_lab_name()
    try:
        p = wm("lab", "up", "-n", name, "--nodes", "2")
        assert p.returncode == 0, p.stderr
        assert "ping node1 -> node2" in p.stderr and "FAILED" not in p.stderr
        assert "node1" in p.stdout and "node2" in p.stdout

        p = wm("-o", "json", "lab", "status", "-n", name)
        assert p.returncode == 0, p.stderr
        data = json.loads(p.stdout)
        assert [n["status"] for n in data["nodes"]] == ["ok", "ok"]

        p = wm("lab", "exec", "-n", name, "node1", "--", "wg", "show", "wm0", "peers")
        assert p.returncode == 0 and len(p.stdout.split()) == 1

        p = wm("lab", "up", "-n", name)
        assert p.returncode == 1
        assert "already exists" in p.stderr and "Traceback" not in p.stderr
    finally:
        p = wm("lab", "down", "-n", name)
    assert p.returncode == 0, p.stderr
    assert_gone(name)
    p = wm("lab", "down", "-n", name)
    assert p.returncode == 0 and "nothing to remove" in p.stderr


def test_down_cleans_up_after_a_crash_half_way() -> None:
    name = new_lab_name()
    proc = subprocess.Popen([wiremesh_binary(), "lab", "up", "-n", name, "--nodes", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill `up` once the first node's namespace exists: Consul and maybe an agent are running.
        wait_until(lambda: list_netns(f"wmlab-{name}-node"), 60, what="the first node namespace")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        hub_pids = pids_in_netns(f"wmlab-{name}-hub")
        assert hub_pids, "Consul should be running in the hub"
    finally:
        p = wm("lab", "down", "-n", name)
    assert p.returncode == 0, p.stderr
    assert_gone(name)
    for pid in hub_pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_bad_agent_config_is_one_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('node = "n1"\ncluster = "lab"\nunderlay_address = "10.0.0.1"\nlisten_port = 99999\n')
    p = wm("agent", "--config", str(cfg))
    assert p.returncode == 1
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "listen_port" in lines[0] and "1-65535" in lines[0], p.stderr


def test_lab_needs_no_leftovers_from_other_labs() -> None:
    """Two labs side by side do not collide (separate namespaces, separate /run/wireguard)."""
    a, b = Lab(new_lab_name()), Lab(new_lab_name())
    try:
        a.up(2)
        b.up(2)
        for lab in (a, b):
            assert reaches(lab, "node1", lab.overlay_ip("node2")) is not None
            assert lab.run("node1", "ls", "/run/wireguard").stdout.split() == ["wm0.sock"]
    finally:
        a.down()
        b.down()
    assert os.path.isdir("/run") and not list_netns(f"wmlab-{a.name}-") and not list_netns(f"wmlab-{b.name}-")
