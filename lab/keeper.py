"""Restarts a lab node's agent when it fails, as systemd's Restart=on-failure does on a host.

    python keeper.py PIDFILE -- COMMAND [ARG ...]

Runs COMMAND as its child and writes the child's pid to PIDFILE (the lab reads the agent's pid
there: signals from tests and `lab stop` go to the agent itself, not to this process). When the
child exits with a non-zero code (an agent whose thread died exits 70), it is started again
after a backoff (1 s doubling to 10 s; reset after a minute up). A child ended by a signal
(`lab stop --signal KILL`, a test's SIGKILL) or that exits 0 (SIGTERM) is not restarted: this
process then exits the same way. SIGTERM, SIGINT and SIGHUP sent here go to the child; if this
process is killed, the child gets SIGKILL (PR_SET_PDEATHSIG), so no agent outlives its keeper.

A standalone script (standard library only): it imports nothing of wiremesh, so it costs no
more than an interpreter per node and never needs restarting itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
BACKOFF_MIN_S, BACKOFF_MAX_S, STABLE_S = 1.0, 10.0, 60.0


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _write_pid(path: str, pid: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: keeper.py PIDFILE -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    pidfile, cmd = argv[0], argv[2:]
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    delay = BACKOFF_MIN_S
    try:
        while True:
            started = time.monotonic()
            child = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
            _write_pid(pidfile, child.pid)
            if stopping:  # asked to stop while starting it: it never saw the signal
                child.terminate()
            rc = child.wait()
            if stopping or rc <= 0:  # asked to stop, a clean exit, or ended by a signal: not restarted
                return rc if rc >= 0 else 128 - rc
            if time.monotonic() - started >= STABLE_S:
                delay = BACKOFF_MIN_S
            print(f"keeper: {cmd[0]} exited with {rc}; starting it again in {delay:.0f} s", file=sys.stderr,
                  flush=True)
            time.sleep(delay)
            if stopping:
                return rc
            delay = min(BACKOFF_MAX_S, delay * 2)
    finally:
        try:  # only its own child's pid: a newer keeper's file stays
            if child is not None and open(pidfile).read().strip() == str(child.pid):
                os.unlink(pidfile)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
