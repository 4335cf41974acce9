"""Stopping processes and knowing they are gone: SIGTERM, a bounded wait, SIGKILL, then an error
naming whatever survived.

A process is held by a pidfd from the moment it is found, so a signal can never reach another
process that reused its pid (pid_max is 32768 here: reuse is real on a busy machine). Waiting is
event driven: a pidfd becomes readable when the whole thread group has exited, which is later
than the moment `ps` shows the leader as a zombie (Consul's and wireguard-go's other threads may
still be running then). The lab's daemons are mostly not our children (`lab up` ran in another
process); the ones that are (a `Lab` that started and stops them in one process) are reaped by
their own pid, never with `waitpid(-1)`, which would steal another subprocess's exit status.

Where pidfds are missing (Linux < 5.3), a process is pinned by its start time instead and
/proc is polled.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ProcessesSurvived

POLL_INTERVAL = 0.02  # between looks where no event can be waited for (no pidfds; reaping by init)


@dataclass
class Process:
    """One process to stop, pinned against pid reuse (by a pidfd, or by its start time)."""

    pid: int
    what: str
    start_time: int
    pidfd: int | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.what} (pid {self.pid})"

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def signal(self, sig: int) -> bool:
        """Send `sig`; False if the process is already gone (or its pid now names another)."""
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            elif _start_time(self.pid) == self.start_time:
                os.kill(self.pid, sig)
            else:
                return False
        except ProcessLookupError:
            return False
        return True

    def reaped(self) -> bool:
        """True once the process is gone from the process table (its parent collected it)."""
        if self.pidfd is not None:
            return bool(_poll_once([self.pidfd]).get(self.pidfd, 0) & select.POLLHUP)
        return _start_time(self.pid) != self.start_time

    def exited(self) -> bool:
        """True once the whole process has exited (a zombie waiting for its parent counts)."""
        if self.pidfd is not None:
            events = _poll_once([self.pidfd])
            done = bool(events.get(self.pidfd, 0) & (select.POLLIN | select.POLLHUP))
        else:
            done = _start_time(self.pid) != self.start_time or _state(self.pid) in ("Z", "X", None)
        if done:
            self._reap()
        return done

    def _reap(self) -> None:
        """Collect the exit status if the process is our child: this process's, nobody else's."""
        try:
            if self.pidfd is not None:
                os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
            elif _start_time(self.pid) == self.start_time:  # still ours: a zombie holds its pid
                os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child (or already collected): its own parent reaps it


def find(pid: int, what: str, belongs: Callable[[int], bool] | None = None) -> Process | None:
    """A handle on process `pid`, or None if it is gone or `belongs(pid)` says it is not ours.

    `belongs` (for example "lives in this lab's network namespace") is checked after the pidfd
    is open and the process is seen still unreaped afterwards: the check was about the process
    the pidfd holds, not about a newcomer that reused the pid.
    """
    if pid <= 0 or pid == os.getpid():
        return None
    start = _start_time(pid)
    if start is None:
        return None
    fd: int | None = None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except OSError as e:
        # No pidfds on this kernel, or none left to open (a lab of 200 nodes holds many): pinned
        # by its start time instead.
        if e.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.EMFILE, errno.ENFILE):
            raise
    proc = Process(pid, what, start, fd)
    if _start_time(pid) != start or (belongs is not None and not belongs(pid)):
        proc.close()  # another process took the pid before the pidfd was opened, or not ours
        return None
    if fd is not None and _poll_once([fd]).get(fd, 0) & select.POLLHUP:
        proc.close()  # reaped while we looked: the checks may have seen a newcomer
        return None
    if fd is None and _start_time(pid) != start:
        return None
    return proc


def stop(procs: Sequence[Process], *, sig: int = signal.SIGTERM, timeout: float = 10.0,
         kill_timeout: float = 5.0, close: bool = True) -> float:
    """Send `sig` to every process, wait up to `timeout` for all to exit, SIGKILL the rest and
    wait up to `kill_timeout` more; returns the seconds it took.

    Raises ProcessesSurvived naming every process still running after that (the handles are
    closed then). With `close=False`, the handles of processes that exited stay open for
    `wait_reaped`.
    """
    t0 = time.monotonic()
    try:
        live = [p for p in procs if p.signal(sig)]
        live = wait_exited(live, timeout)
        if live:
            if sig != signal.SIGKILL:
                live = [p for p in live if p.signal(signal.SIGKILL)]
            live = wait_exited(live, kill_timeout)
        if live:
            raise ProcessesSurvived(
                f"still running after SIGKILL and {timeout + kill_timeout:.0f}s: "
                + ", ".join(_describe(p) for p in live), [p.pid for p in live])
    except BaseException:
        close = True
        raise
    finally:
        if close:
            for p in procs:
                p.close()
    return time.monotonic() - t0


def wait_exited(procs: Iterable[Process], timeout: float) -> list[Process]:
    """Wait up to `timeout` seconds until every process has exited; returns those that have not."""
    live = [p for p in procs if not p.exited()]
    deadline = time.monotonic() + timeout
    while live:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        fds = [p.pidfd for p in live if p.pidfd is not None]
        if len(fds) == len(live):
            _poll_once(fds, left)  # sleeps until one of them exits (or the deadline)
        else:
            time.sleep(min(POLL_INTERVAL, left))
        live = [p for p in live if not p.exited()]
    return live


def wait_reaped(procs: Sequence[Process], timeout: float) -> None:
    """Wait at most `timeout` for exited processes to leave the process table, then close their
    handles. Best effort, never an error: a process that is not our child is collected by its
    own parent (init, for the lab's daemons), which is not ours to hurry.

    An exited process's pidfd is readable already and reports the reaping only as POLLHUP, so
    poll() cannot sleep until then: this one wait looks every POLL_INTERVAL.
    """
    deadline = time.monotonic() + timeout
    try:
        while any(not p.reaped() for p in procs) and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(POLL_INTERVAL, left))
    finally:
        for p in procs:
            p.close()


def _poll_once(fds: Sequence[int], timeout: float = 0.0) -> dict[int, int]:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return dict(poller.poll(max(0, int(timeout * 1000 + 0.999))))


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot: with the pid, its identity."""
    f = _stat_fields(pid)
    return int(f[19]) if f else None  # field 22 of stat; f[0] is field 3


def _state(pid: int) -> str | None:
    f = _stat_fields(pid)
    return f[0] if f else None


def _describe(p: Process) -> str:
    state = _state(p.pid)
    return f"{p} in state {state}" if state else str(p)
