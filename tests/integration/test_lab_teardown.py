"""`lab down` returns only once every process it stopped has exited: agents, wireguard-go, Consul,
and anything else running in the lab's namespaces, also when both cores are busy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wiremesh.lab import Lab, teardown
from wiremesh.lab.lab import wiremesh_binary

from .conftest import new_lab_name

BUSY_LOOP = "while True: pass"
IGNORES_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


class Recorded:
    """The lab's processes as its state and pid files record them, each pinned by its start time
    (a pid reused by another process after `down` is not the lab's)."""

    def __init__(self, lab: Lab) -> None:
        self.what: dict[int, str] = {}
        for n in lab.nodes.values():
            self.what[n.pid] = f"agent of {n.name}"
            for f in Path(n.dir).glob("wireguard-go-*.pid"):
                self.what[int(f.read_text())] = f"wireguard-go of {n.name}"
        for c in lab.state["clusters"]:
            self.what[c["consul_pid"]] = f"consul of {c['name']}"
        self.start = {pid: (_stat(pid) or [""] * 20)[19] for pid in self.what}

    def same(self, pid: int) -> list[str] | None:
        f = _stat(pid)
        return f if f and f[19] == self.start[pid] else None

    def alive(self) -> list[str]:
        """Those still running (a zombie has exited: only its exit status is left)."""
        return [f"{w} ({pid})" for pid, w in self.what.items() if (f := self.same(pid)) and f[0] not in "ZX"]

    def in_process_table(self) -> list[str]:
        return [f"{w} ({pid})" for pid, w in self.what.items() if self.same(pid)]


@pytest.fixture
def busy_cores() -> Iterator[Callable[[], None]]:
    """Calling it puts a busy loop on every core; each loop is ended by its pid at the end."""
    loops: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        loops.extend(subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(os.cpu_count() or 2))

    yield start
    for p in loops:
        p.kill()
        p.wait()


def wm(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([wiremesh_binary(), *args], capture_output=True, text=True, timeout=timeout)


def test_cli_down_under_load_leaves_no_process_of_the_lab_alive(
        busy_cores: Callable[[], None], timing: Callable[[str, float], None],
        counted: Callable[[str, float, str], None]) -> None:
    """As a user runs it: `lab up` and `lab down` are separate processes, so none of the lab's
    daemons is a child of `down`."""
    name = new_lab_name()
    try:
        p = wm("lab", "up", "-n", name, "--nodes", "3")
        assert p.returncode == 0, p.stderr
        procs = Recorded(Lab(name).load())
        assert len(procs.what) == 7 and len(procs.alive()) == 7, procs.what
        busy_cores()
        t0 = time.monotonic()
        p = wm("lab", "down", "-n", name)
        seconds = time.monotonic() - t0
        alive, in_table = procs.alive(), procs.in_process_table()  # right after `down` returned
    finally:
        wm("lab", "down", "-n", name)
    assert p.returncode == 0, p.stderr
    assert alive == [], f"still running after `lab down` returned: {alive}"
    timing("lab down (CLI), 3 nodes, both cores busy", seconds)
    counted("exited lab processes init had not reaped yet when `lab down` returned", len(in_table), "processes")


def test_down_idle_waits_for_every_process_and_reaps_its_own_children(timing: Callable[[str, float], None]) -> None:
    """In one process (as the tests use a lab), Consul and the agents are our children: reaped."""
    lab = Lab(new_lab_name())
    try:
        lab.up(3)
        procs = Recorded(lab)
        t0 = time.monotonic()
        lab.down()
        seconds = time.monotonic() - t0
        alive = procs.alive()
        ours = [f"{w} ({pid})" for pid, w in procs.what.items()
                if not w.startswith("wireguard-go") and procs.same(pid)]  # wireguard-go's parent is its agent
    finally:
        lab.down()
    assert alive == [], f"still running after down() returned: {alive}"
    assert ours == [], f"our children left as zombies: {ours}"
    timing("lab down (in process), 3 nodes, idle", seconds)


def test_a_process_that_ignores_sigterm_is_killed_and_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(teardown, "DAEMON_TIMEOUT", 0.5)
    lab = Lab(new_lab_name())
    messages: list[str] = []
    stubborn: subprocess.Popen[bytes] | None = None
    try:
        lab.up(1)
        stubborn = lab.popen("node1", sys.executable, "-c", IGNORES_SIGTERM, stdout=subprocess.PIPE)
        assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
        lab.down(progress=messages.append)
        gone = _stat(stubborn.pid) is None  # our child: reaped by its pid
    finally:
        if stubborn is not None and stubborn.poll() is None:
            stubborn.kill()
        lab.down()
    assert gone, f"pid {stubborn.pid} outlived down()"
    assert any("python" in m and "node1" in m for m in messages if m.startswith("stopping")), messages
