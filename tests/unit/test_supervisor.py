"""The agent's threads: a dead one is noticed, followers never collide, a pass that raises is retried."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from wiremesh.agent.passes import BACKOFF_MAX_S, Pass
from wiremesh.agent.supervisor import Supervisor
from wiremesh.agent.metrics import AgentMetrics


def test_a_loop_that_raises_is_dead_and_named() -> None:
    sup = Supervisor()

    def boom() -> None:
        raise ValueError("the bug")

    sup.spawn("reconcile", boom)
    assert sup.died.wait(5)
    assert sup.dead == {"reconcile": "ValueError: the bug"}
    assert sup.died_at is not None


def test_a_loop_that_returns_while_running_is_dead_but_not_once_stopping() -> None:
    stopping = threading.Event()
    sup = Supervisor(stopping)
    sup.spawn("watch", lambda: None)
    assert sup.died.wait(5)
    assert sup.dead == {"watch": "returned while the agent was running"}
    calm = Supervisor(stopping)
    stopping.set()
    calm.spawn("watch", lambda: None)
    assert calm.join(timeout=5) == []
    assert calm.dead == {}


def test_a_loop_name_is_unique_while_it_runs() -> None:
    sup, release = Supervisor(), threading.Event()
    sup.spawn("register", release.wait)
    try:
        with pytest.raises(RuntimeError, match="already running"):
            sup.spawn("register", release.wait)
    finally:
        release.set()
        sup.stopping.set()
        assert sup.join(timeout=5) == []


def test_a_follower_and_its_successor_never_collide() -> None:
    """A service deleted and created again within one blocking query: the old watch still runs."""
    sup, release = Supervisor(), threading.Event()
    names = [sup.follow("health-web@east", release.wait).name for _ in range(3)]
    try:
        assert len(set(names)) == 3 and all(n.startswith("health-web@east#") for n in names)
        assert sorted(sup.alive()) == sorted(names)
        assert not sup.dead
    finally:
        release.set()
        assert sup.join(timeout=5) == []
    sup.follow("health-web@east", lambda: None)  # finished followers are forgotten, never dead
    assert sup.join(timeout=5) == [] and not sup.dead


def test_a_follower_that_raises_is_dead() -> None:
    sup = Supervisor()
    sup.follow("watch-west", lambda: 1 / 0)
    assert sup.died.wait(5)
    assert list(sup.dead) == ["watch-west#1"] and "ZeroDivisionError" in sup.dead["watch-west#1"]


class _NoRotation:
    def switch_due(self) -> bool:
        return False


class _Agent:
    """What a Pass uses of the agent, with stages that fail on demand."""

    def __init__(self) -> None:
        self.metrics = AgentMetrics()
        self.fail: str | None = None
        self.rotator = _NoRotation()

    def intake(self) -> None:
        if self.fail == "snapshot":
            raise OSError(28, "No space left on device")

    def snapshot(self) -> None:
        return None  # nothing to plan from: the pass ends after its inputs


def _count(m: AgentMetrics, stage: str) -> float:
    v = m.registry.get_sample_value("wiremesh_pass_errors_total", {"stage": stage})
    return v or 0.0


def test_a_stage_that_raises_is_counted_logged_once_and_retried_with_backoff(caplog: Any) -> None:
    agent = _Agent()
    p = Pass(agent)  # type: ignore[arg-type]
    agent.fail = "snapshot"
    for _ in range(8):
        assert p.run(full=False) is False
        assert p.retry_at is not None
    assert _count(agent.metrics, "snapshot") == 8
    assert sum("pass failed at snapshot" in r.getMessage() for r in caplog.records) == 1
    assert p.failures == 8
    agent.fail = None
    assert p.run(full=False) is True
    assert (p.failures, p.retry_at) == (0, None)
    assert agent.metrics.registry.get_sample_value("wiremesh_loop_blocked_seconds_count") == 9
    assert BACKOFF_MAX_S >= 5.0
