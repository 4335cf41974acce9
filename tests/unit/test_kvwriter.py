"""agent.kvwriter: the newest value per key, in the order asked, retried until Consul takes it."""

from __future__ import annotations

import threading
from typing import Any

from wiremesh.agent.kvwriter import KVWriter
from wiremesh.clustermesh import ConsulUnavailable


class FlakyStore:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.log: list[tuple[str, str | None]] = []
        self.gate = threading.Event()
        self.gate.set()

    def put(self, key: str, value: str, **_: Any) -> bool:
        self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ConsulUnavailable("connection refused")
        self.log.append((key, value))
        return True

    def delete(self, key: str, **_: Any) -> bool:
        self.log.append((key, None))
        return True


def run(store: FlakyStore) -> tuple[KVWriter, threading.Event, list[threading.Thread]]:
    stop = threading.Event()
    w = KVWriter(store, stop)  # type: ignore[arg-type]
    threads: list[threading.Thread] = []

    def spawn(name: str, fn: Any) -> None:
        threads.append(threading.Thread(target=fn, name=name, daemon=True))
        threads[-1].start()
    w.start(spawn)
    return w, stop, threads


def test_newest_value_per_key_in_the_order_first_asked() -> None:
    store = FlakyStore(0)
    store.gate.clear()  # hold the first write while more are asked for
    w, stop, threads = run(store)
    w.put("a", "1")
    w.put("b", "1")
    w.put("a", "2")
    w.delete("c")
    store.gate.set()
    assert w.flush(5)
    stop.set()
    w.close()
    threads[0].join(5)
    # "a" may have been taken with "1" before "2" came: then "2" follows it at once (its place kept)
    assert store.log in ([("a", "2"), ("b", "1"), ("c", None)],
                         [("a", "1"), ("a", "2"), ("b", "1"), ("c", None)])
    assert w.pending() == 0


def test_a_refused_write_is_retried_until_taken() -> None:
    store = FlakyStore(2)
    w, stop, threads = run(store)
    w.put("k", "v")
    assert w.flush(10)
    assert store.log == [("k", "v")] and store.failures == 0
    stop.set()
    w.close()
    threads[0].join(5)
    assert not threads[0].is_alive()
