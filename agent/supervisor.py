"""The owner of the agent's threads: starts each one, knows which are alive, joins them all.

Every thread of the agent is started here (registration, the watches, the reconcile loop, one
watch per federated cluster), so shutdown can tell which loops have really ended before it
removes the node's record. A thread that raises is logged with its name and counted; the
loops themselves catch what they expect, so this only ever sees bugs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

log = logging.getLogger("wiremesh.agent")
T = TypeVar("T")


class Supervisor:
    def __init__(self) -> None:
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self.crashed: list[str] = []

    def spawn(self, name: str, fn: Callable[[], object]) -> threading.Thread:
        """Start `fn` in a thread called `name` (unique among the living; a finished one is replaced)."""

        def main() -> None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a loop that died must be visible, never silent
                self.crashed.append(name)
                log.exception("thread %s ended with an error", name)

        with self._lock:
            old = self._threads.get(name)
            if old is not None and old.is_alive():
                raise RuntimeError(f"thread {name} is already running")
            t = threading.Thread(target=main, name=name, daemon=True)
            self._threads[name] = t
        t.start()
        return t

    def alive(self) -> list[str]:
        with self._lock:
            return sorted(n for n, t in self._threads.items() if t.is_alive())

    def join(self, names: Iterable[str] | None = None, timeout: float = 5.0) -> list[str]:
        """Wait for the named threads (all if None) to end, `timeout` seconds in all.

        Returns the names of those still running.
        """
        with self._lock:
            chosen = [t for n, t in self._threads.items() if names is None or n in set(names)]
        deadline = time.monotonic() + timeout
        for t in chosen:
            t.join(max(0.0, deadline - time.monotonic()))
        return sorted(t.name for t in chosen if t.is_alive())


class Mailbox(Generic[T]):
    """The latest value a producer handed over, taken once by the consumer (older ones are moot).

    A watch hands each whole snapshot here; the reconcile loop takes the newest when it wakes.
    """

    def __init__(self, wake: threading.Event) -> None:
        self._lock = threading.Lock()
        self._value: T | None = None
        self._wake = wake

    def put(self, value: T) -> None:
        with self._lock:
            self._value = value
        self._wake.set()

    def take(self) -> T | None:
        with self._lock:
            value, self._value = self._value, None
            return value
