"""The agent's watchdog: says when the agent stood still, and where.

Two kinds of standstill look the same from outside (no log line, a key switch late, a session
lapsed) and have different fixes:

- the whole process did not run (a starved host, a stopped process, swapping): the watchdog's
  own tick comes late. Logged with how long it stood, counted in
  `wiremesh_process_stalls_total`.
- one pass of the reconcile loop is stuck in a call (a device that does not answer, a lock):
  the watchdog's tick is on time but the pass has run longer than `STUCK_PASS_S`. Logged once
  per pass with the loop thread's stack, so the call is named.

It only observes; it never interrupts a pass.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger("wiremesh.agent")

TICK_S = 0.5
STALL_S = 2.0  # a tick this late: the process stood still
STUCK_PASS_S = 3.0  # a pass this long: its stack is logged


class Watchdog:
    """Runs `run()` in a thread of its own; `pass_started`/`pass_ended` come from the loop."""

    def __init__(self, on_stall: Callable[[float], None] | None = None,
                 tick_s: float = TICK_S, stall_s: float = STALL_S, stuck_s: float = STUCK_PASS_S) -> None:
        self.on_stall = on_stall
        self.tick_s, self.stall_s, self.stuck_s = tick_s, stall_s, stuck_s
        self._lock = threading.Lock()
        self._pass: tuple[int, float] | None = None  # (thread id, time.monotonic() at its start)
        self._dumped: float | None = None  # the start of the pass whose stack was logged
        self.stalls = 0
        self.longest_stall = 0.0

    def pass_started(self) -> None:
        with self._lock:
            self._pass = (threading.get_ident(), time.monotonic())

    def pass_ended(self) -> None:
        with self._lock:
            self._pass = None

    def run(self, stop: threading.Event) -> None:
        expected = time.monotonic() + self.tick_s
        while not stop.wait(max(0.0, expected - time.monotonic())):
            now = time.monotonic()
            self.check(now, late=now - expected)
            expected = now + self.tick_s

    def check(self, now: float, late: float) -> None:
        """One tick: `late` is how much later than planned it came."""
        if late >= self.stall_s:
            self.stalls += 1
            self.longest_stall = max(self.longest_stall, late)
            log.warning("the agent did not run for %.1f s (a starved host, or the process was stopped): "
                        "key switches and session renewals due meanwhile came late", late)
            if self.on_stall:
                self.on_stall(late)
        with self._lock:
            current = self._pass
        if current is None:
            return
        tid, started = current
        if now - started < self.stuck_s or self._dumped == started:
            return
        self._dumped = started
        frame = sys._current_frames().get(tid)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(thread gone)\n"
        log.warning("a pass of the reconcile loop has run for %.1f s; it stands in:\n%s",
                    now - started, stack.rstrip())
