"""tunnels.sched: a child in a new session gets its priority for the whole session (autogroup)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

from wiremesh.tunnels import set_session_nice

AUTOGROUPS = Path("/proc/sys/kernel/sched_autogroup_enabled")


def _session_nice(preexec: object) -> str:
    out = subprocess.run(["cat", "/proc/self/autogroup"], start_new_session=True, preexec_fn=preexec,  # type: ignore[arg-type]
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0 or not AUTOGROUPS.exists() or AUTOGROUPS.read_text().strip() != "1",
                    reason="needs root and a kernel with autogroups enabled")
def test_a_new_session_takes_the_nice_asked_for_or_the_process_own() -> None:
    assert _session_nice(functools.partial(set_session_nice, -3)).endswith("nice -3")

    def own_nice_then_session() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, -4)
        set_session_nice()
    assert _session_nice(own_nice_then_session).endswith("nice -4")
    assert _session_nice(None).endswith("nice 0")  # (as it was without it: the nice of the session is 0)


def test_without_the_privilege_or_autogroups_nothing_breaks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wiremesh.tunnels.sched as sched
    monkeypatch.setattr(sched, "AUTOGROUP", str(tmp_path / "missing" / "autogroup"))
    set_session_nice(-5)  # no error
