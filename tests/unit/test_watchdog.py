"""agent.watchdog: a standstill of the process and a stuck pass are told apart and logged."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from wiremesh.agent.watchdog import Watchdog


def test_a_late_tick_is_a_process_stall_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[float] = []
    w = Watchdog(on_stall=seen.append, stall_s=2.0)
    with caplog.at_level(logging.WARNING, logger="wiremesh.agent"):
        w.check(time.monotonic(), late=0.3)
        assert w.stalls == 0 and not caplog.records
        w.check(time.monotonic(), late=9.2)
    assert w.stalls == 1 and seen == [9.2] and w.longest_stall == 9.2
    assert "did not run for 9.2 s" in caplog.text


def _stuck_in_a_device_call(entered: threading.Event, release: threading.Event, w: Watchdog) -> None:
    w.pass_started()
    entered.set()
    release.wait(30)
    w.pass_ended()


def test_a_stuck_pass_is_logged_once_with_the_call_it_stands_in(caplog: pytest.LogCaptureFixture) -> None:
    w = Watchdog(stuck_s=3.0)
    entered, release = threading.Event(), threading.Event()
    t = threading.Thread(target=_stuck_in_a_device_call, args=(entered, release, w))
    t.start()
    try:
        assert entered.wait(10)
        now = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="wiremesh.agent"):
            w.check(now + 1.0, late=0.0)  # not yet stuck
            assert not caplog.records
            w.check(now + 4.0, late=0.0)
            w.check(now + 5.0, late=0.0)  # the same pass: not again
        stuck = [r for r in caplog.records if "has run for" in r.getMessage()]
        assert len(stuck) == 1
        assert "_stuck_in_a_device_call" in stuck[0].getMessage()
    finally:
        release.set()
        t.join(10)
    with caplog.at_level(logging.WARNING, logger="wiremesh.agent"):
        caplog.clear()
        w.check(time.monotonic() + 60, late=0.0)  # no pass under way: nothing to say
    assert not caplog.records


def test_the_watchdog_thread_ends_with_the_agent() -> None:
    w, stop = Watchdog(tick_s=0.01), threading.Event()
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    stop.set()
    t.join(10)
    assert not t.is_alive()
