"""The lab's process stopper, with real processes: SIGTERM, bounded wait, SIGKILL, an error naming
survivors; only its own children reaped, and only by their pid. No root needed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wiremesh.lab import stop
from wiremesh.lab.errors import LabError, ProcessesSurvived
from wiremesh.lab.netns import pid_alive

IGNORES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def state(pid: int) -> str:
    """The process's state letter, or '-' once it is gone from the process table."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except OSError:
        return "-"


def wait_for(pred: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process a test starts, ended by pid whatever the test did."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def sleeper(started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(["sleep", "60"])
    started.append(p)
    return p


def stubborn(started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """A process that ignores SIGTERM, returned once its handler is in place."""
    p = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE)
    started.append(p)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    return p


def found(pid: int, what: str = "test process") -> stop.Process:
    p = stop.find(pid, what)
    assert p is not None
    return p


def test_sigterm_stops_a_child_and_reaps_it(started: list[subprocess.Popen[bytes]]) -> None:
    a, b = sleeper(started), sleeper(started)
    seconds = stop.stop([found(a.pid), found(b.pid)], timeout=10)
    assert seconds < 5  # woken by the exits, not by the deadline
    # Reaped by their own pids, at once: not even a zombie is left.
    assert state(a.pid) == "-" and state(b.pid) == "-"


def test_a_process_that_ignores_sigterm_is_killed_after_the_bound(started: list[subprocess.Popen[bytes]]) -> None:
    p = stubborn(started)
    seconds = stop.stop([found(p.pid)], timeout=0.5, kill_timeout=5)
    assert 0.5 <= seconds < 5
    assert state(p.pid) == "-"


def test_a_survivor_of_sigkill_is_a_clear_error(started: list[subprocess.Popen[bytes]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A process stuck in the kernel outlives SIGKILL; simulated by a SIGKILL that never arrives.
    p = stubborn(started)
    real = stop.Process.signal
    monkeypatch.setattr(stop.Process, "signal",
                        lambda self, sig: True if sig == signal.SIGKILL else real(self, sig))
    with pytest.raises(ProcessesSurvived) as e:
        stop.stop([found(p.pid, "wireguard-go of node1")], timeout=0.2, kill_timeout=0.2)
    assert isinstance(e.value, LabError)
    assert f"wireguard-go of node1 (pid {p.pid})" in str(e.value) and e.value.pids == [p.pid]
    assert e.value.hint and "lab down" in e.value.hint
    assert pid_alive(p.pid)


def test_another_subprocess_keeps_its_exit_status(started: list[subprocess.Popen[bytes]]) -> None:
    """waitpid(-1) would collect `other`'s status and Popen would then report 0."""
    other = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    started.append(other)
    wait_for(lambda: state(other.pid) == "Z")  # exited, its status waiting for its Popen
    stop.stop([found(sleeper(started).pid)])
    assert other.wait() == 7


def test_a_process_that_is_not_our_child(started: list[subprocess.Popen[bytes]]) -> None:
    """A grandchild (like the lab's daemons for `lab down`): waited for by pidfd, reaped by init."""
    sh = subprocess.Popen(["sh", "-c", "sleep 60 >/dev/null & echo $!"], stdout=subprocess.PIPE, text=True)
    out, _ = sh.communicate()
    pid = int(out)
    try:
        assert pid_alive(pid)
        stop.stop([found(pid)], timeout=10)
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_find_is_none_for_a_process_gone_or_not_ours(started: list[subprocess.Popen[bytes]]) -> None:
    p = sleeper(started)
    assert stop.find(p.pid, "x", belongs=lambda pid: False) is None
    assert stop.find(os.getpid(), "ourselves") is None
    assert stop.find(0, "nothing") is None
    p.kill()
    p.wait()
    assert stop.find(p.pid, "gone") is None


def test_already_gone_between_find_and_stop(started: list[subprocess.Popen[bytes]]) -> None:
    p = sleeper(started)
    proc = found(p.pid)
    p.kill()
    p.wait()
    assert stop.stop([proc]) < 1


def test_a_reused_pid_is_never_signalled(started: list[subprocess.Popen[bytes]]) -> None:
    """Without a pidfd, a process is pinned by its start time: another start time, another process."""
    p = sleeper(started)
    pinned = found(p.pid)
    impostor = stop.Process(p.pid, "an older process with the same pid", pinned.start_time - 1)
    pinned.close()
    assert impostor.signal(signal.SIGTERM) is False
    assert impostor.exited()
    assert p.poll() is None


def test_without_pidfds_proc_is_polled(started: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open")
    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    a, b = sleeper(started), stubborn(started)
    procs = [found(a.pid), found(b.pid)]
    assert all(p.pidfd is None for p in procs)
    seconds = stop.stop(procs, timeout=0.5, kill_timeout=5)
    assert 0.5 <= seconds < 5
    assert state(a.pid) == "-" and state(b.pid) == "-"


def test_the_handles_are_closed(started: list[subprocess.Popen[bytes]]) -> None:
    procs = [found(sleeper(started).pid) for _ in range(3)]
    fds = [p.pidfd for p in procs]
    stop.stop(procs)
    assert all(p.pidfd is None for p in procs)
    assert not set(fds) & _pidfds()


def _pidfds() -> set[int]:
    fds = set()
    for f in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(f) == "anon_inode:[pidfd]":
                fds.add(int(f.name))
        except OSError:
            pass
    return fds
