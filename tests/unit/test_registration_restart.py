"""A restarting agent renews the session of its previous run from its first moment, while it sets
up (Registration.keep_previous): its record, which every peer follows, outlives a slow start."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from wiremesh.agent.metrics import AgentMetrics
from wiremesh.agent.registration import Registration
from wiremesh.clustermesh import ConsulOptions, ConsulUnavailable, SessionExpired


class Sessions:
    """Session renewals as Consul answers them: each call takes the next answer (None: renewed)."""

    def __init__(self, answers: list[Exception | None], done: threading.Event) -> None:
        self.answers, self.done = answers, done
        self.renewed: list[str] = []
        self.options = ConsulOptions()

    def set_thread_timeout(self, seconds: float) -> None:
        pass

    def session_renew(self, session_id: str, retry: bool = True) -> None:
        self.renewed.append(session_id)
        answer = self.answers.pop(0) if self.answers else None
        if not self.answers:
            self.done.set()
        if answer is not None:
            raise answer


def registration(store: Any, tmp_path: Path) -> Registration:
    cfg = SimpleNamespace(cluster="lab", node="n1", session_ttl=2, state_dir=tmp_path, consul=ConsulOptions())
    return Registration(store, cfg, lambda: None, AgentMetrics(), threading.Event())  # type: ignore[arg-type]


def test_the_previous_session_is_renewed_until_the_agent_is_set_up(tmp_path: Path) -> None:
    (tmp_path / "session").write_text("5e55104\n")
    until = threading.Event()
    store = Sessions([ConsulUnavailable("slow"), None, None], until)  # a failed try is tried again
    registration(store, tmp_path).keep_previous(until)
    assert store.renewed == ["5e55104"] * 3


def keep_previous_in_a_thread(reg: Registration, until: threading.Event) -> threading.Thread:
    t = threading.Thread(target=reg.keep_previous, args=(until,), daemon=True)
    t.start()
    return t


def test_an_expired_previous_session_is_left_to_the_loop(tmp_path: Path) -> None:
    (tmp_path / "session").write_text("5e55104\n")
    until, tried = threading.Event(), threading.Event()
    store = Sessions([SessionExpired("gone")], tried)
    t = keep_previous_in_a_thread(registration(store, tmp_path), until)
    assert tried.wait(5)
    t.join(0.3)
    assert t.is_alive(), "returned before the agent was set up: the loop would publish too early"
    until.set()
    t.join(5)
    assert not t.is_alive() and store.renewed == ["5e55104"]  # not renewed again once expired


def test_no_previous_session_nothing_to_renew_and_it_waits_all_the_same(tmp_path: Path) -> None:
    store = Sessions([], threading.Event())
    reg = registration(store, tmp_path)
    t = keep_previous_in_a_thread(reg, threading.Event())
    t.join(0.3)
    assert t.is_alive()
    reg.stop.set()  # the agent stops while setting up: it returns
    t.join(5)
    assert not t.is_alive() and store.renewed == []


def test_a_try_that_timed_out_is_made_again_at_once() -> None:
    """Tries are `delay` apart from start to start: one that took longer than the delay (a
    request timed out while a partition healed) is followed at once; one refused at once waits."""
    now = time.monotonic()
    assert Registration._wait(now - 1.0, 0.67) == 0.0
    assert 0.6 < Registration._wait(now + 0.5, 0.2) <= 0.7  # (a try that started "later": the rest of its delay)


def test_renewals_keep_their_pace_while_the_record_is_published_again_and_again(tmp_path: Path) -> None:
    """A rotation publishes the node's record every second or so, and a record's write renews
    nothing: the loop renews by the clock all the same (sessions lapsed right after rotations in
    a 30-node lab when a publication took the renewal's turn)."""
    done = threading.Event()
    store = Sessions([None, None, None], done)
    reg = registration(store, tmp_path)
    published: list[int] = []

    def publish() -> None:
        reg.session_id = "0123456789abcdef"
        published.append(1)
    reg.publish = publish  # type: ignore[method-assign]
    stop = reg.stop
    loop = threading.Thread(target=reg.loop)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            reg.republish.set()  # far more often than the renewal interval (0.5 s here)
            time.sleep(0.02)
        assert done.is_set(), f"{len(store.renewed)} renewals while published {len(published)} times"
        assert store.renewed == ["0123456789abcdef"] * 3
    finally:
        stop.set()
        reg.republish.set()
        loop.join(10)


class Writes:
    """Consul's KV and sessions as the registration uses them, counting the record's writes."""

    def __init__(self) -> None:
        self.options = ConsulOptions()
        self.puts: list[str] = []
        self.sessions = 0

    def set_thread_timeout(self, seconds: float) -> None:
        pass

    def get(self, key: str, **_: Any) -> None:
        return None

    def session_create(self, name: str, ttl_s: int, behavior: str = "delete", node: str | None = None) -> str:
        self.sessions += 1
        return f"{self.sessions:016x}"

    def put(self, key: str, value: str, **_: Any) -> bool:
        self.puts.append(value)
        return True


def test_the_same_record_is_written_once_until_consul_s_copy_is_not_ours(tmp_path: Path) -> None:
    """Every write of a record wakes every agent of the cluster: a rotation asked for six, of
    which three differed (the watch running behind a newer write looked like an overwrite)."""
    from wiremesh.clustermesh import NodeRecord

    store = Writes()
    rec = NodeRecord("n1", "lab", "192.0.2.1:51820", "A" * 43 + "=", "10.240.1.0/24", "10.240.1.1")
    cfg = SimpleNamespace(cluster="lab", node="n1", session_ttl=2, state_dir=tmp_path, consul=ConsulOptions())
    current = [rec]
    reg = Registration(store, cfg, lambda: current[0], AgentMetrics(), threading.Event())  # type: ignore[arg-type]
    reg.publish()
    reg.publish()
    assert len(store.puts) == 1 and reg.wrote_recently(rec)
    current[0] = newer = dataclasses.replace(rec, endpoint="192.0.2.9:51820")
    reg.publish()
    assert len(store.puts) == 2
    assert reg.wrote_recently(rec) and reg.wrote_recently(newer)  # (the watch behind: not an overwrite)
    assert not reg.wrote_recently(dataclasses.replace(rec, endpoint="198.51.100.1:51820"))
    reg.forget_written()  # gone from Consul, or overwritten: written whatever this thread wrote before
    reg.publish()
    assert len(store.puts) == 3
    reg.session_id = None  # a new session: the record is written under it
    reg.publish()
    assert len(store.puts) == 4 and store.sessions == 2
