"""agent.readiness: watches started and stopped as a rotation comes and goes, any number of times."""

from __future__ import annotations

import threading
from typing import Any

from wiremesh.agent.readiness import ReadinessWatch
from wiremesh.agent.supervisor import Supervisor
from wiremesh.clustermesh import layout
from wiremesh.clustermesh.consul_values import KVItem
from wiremesh.clustermesh.rotation import RotationReady
from wiremesh.keys import PrivateKey


class BlockingStore:
    """A watch that answers once, then blocks until its stop is set (as a blocking query does)."""

    def __init__(self, items: dict[str, bytes]) -> None:
        self.items = items

    def watch(self, prefix: str, stop: Any, wait_s: int = 30, dc: str | None = None) -> Any:
        yield 1, {k: KVItem(k, v, 1) for k, v in self.items.items() if k.startswith(prefix)}
        while not stop.is_set():
            stop.wait(0.05)


def test_follow_again_while_an_old_watch_still_blocks() -> None:
    nxt = PrivateKey.generate().public_key().base64
    store = BlockingStore({layout.rotation_ready_key("c", "b", "c", "a"): RotationReady(nxt).to_json().encode()})
    stop, woke = threading.Event(), threading.Event()
    sup = Supervisor()
    rw = ReadinessWatch(store, "c/a", stop, woke.set, sup.follow)  # type: ignore[arg-type]
    try:
        for _ in range(3):  # a rotation, ended, and the next: a new watch while the old one blocks
            rw.follow({"c": None})
            assert woke.wait(5)
            woke.clear()
            assert rw.view() == {"c/b": RotationReady(nxt)}
            rw.follow({})
            assert rw.view() == {}
        assert not sup.dead
    finally:
        stop.set()
        rw.close()
        assert sup.join(timeout=5) == []
