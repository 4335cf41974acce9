"""lab/keeper.py: an agent that exits non-zero is started again; one ended by a signal is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KEEPER = Path(__file__).resolve().parents[2] / "lab" / "keeper.py"


def _wait(pred: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def test_a_child_that_fails_is_started_again_and_its_pid_written(tmp_path: Path) -> None:
    runs, pidfile = tmp_path / "runs", tmp_path / "agent.pid"
    # Fails (exit 70) the first time, then runs until told to stop.
    script = f"import sys,time,pathlib; p=pathlib.Path({str(runs)!r}); n=len(p.read_text()) if p.exists() else 0; " \
             f"p.write_text('x'*(n+1)); sys.exit(70) if n == 0 else time.sleep(60)"
    keeper = subprocess.Popen([sys.executable, str(KEEPER), str(pidfile), "--", sys.executable, "-c", script],
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: runs.exists() and runs.read_text() == "xx")
        second = _pid(pidfile)
        assert second is not None and second != keeper.pid
        keeper.send_signal(signal.SIGTERM)  # forwarded: the child ends, and so does the keeper
        assert keeper.wait(10) == 128 + signal.SIGTERM
        assert "exited with 70; starting it again" in (keeper.stderr.read() if keeper.stderr else "")
        assert not pidfile.exists()
    finally:
        keeper.kill()
        keeper.wait()


def test_a_child_ended_by_a_signal_is_not_started_again(tmp_path: Path) -> None:
    pidfile = tmp_path / "agent.pid"
    keeper = subprocess.Popen([sys.executable, str(KEEPER), str(pidfile), "--", "sleep", "60"])
    try:
        _wait(lambda: _pid(pidfile) is not None)
        os.kill(_pid(pidfile) or 0, signal.SIGKILL)  # a test's or an operator's SIGKILL
        assert keeper.wait(10) == 128 + signal.SIGKILL
    finally:
        keeper.kill()
        keeper.wait()


def test_no_child_outlives_its_keeper(tmp_path: Path) -> None:
    pidfile = tmp_path / "agent.pid"
    keeper = subprocess.Popen([sys.executable, str(KEEPER), str(pidfile), "--", "sleep", "60"])
    _wait(lambda: _pid(pidfile) is not None)
    child = _pid(pidfile) or 0
    keeper.kill()
    keeper.wait()
    _wait(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2])
