"""Scheduling priority that holds across sessions.

With CONFIG_SCHED_AUTOGROUP (on in Debian's kernels, `kernel.sched_autogroup_enabled=1`), the
scheduler shares the CPU between *sessions* first (one autogroup each, nice 0 by default), and
a process's own nice counts only against the other processes of its session. A process started
in a new session (wireguard-go, detached from its agent so that it outlives it; each lab node's
agent; the lab's Consul) therefore ran at nice 0 against every other session whatever its own
nice: under two CPU hogs the agents' and wireguard-go's nice -5 changed nothing (seen: every
agent of a lab stood still for 5 s at once, pings came back 3.5 s late). In a cgroup of its own
(a systemd service) autogroups do not apply, and this changes nothing.
"""

from __future__ import annotations

import os

AUTOGROUP = "/proc/self/autogroup"


def set_session_nice(nice: int | None = None) -> None:
    """Give this process (when `nice` is given) and its session (its autogroup) the nice `nice`;
    the session this process's own nice if None.

    For a child started in a new session: call it first thing (Popen's preexec_fn runs after
    setsid). Without the privilege, or without autogroups, nothing changes."""
    try:
        if nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        value = os.getpriority(os.PRIO_PROCESS, 0) if nice is None else nice
        with open(AUTOGROUP, "w") as f:
            f.write(f"{value}\n")
    except OSError:
        pass
