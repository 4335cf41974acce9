"""The owner of the agent's threads: starts each one, knows which are alive, joins them all,
and notices the one that died.

Two kinds of thread:
- loops (registration, the watch, the reconcile loop, the mesh watch, the KV writer): one each,
  for the agent's whole life. One that raises, or returns while the agent is not stopping, is
  *dead*: the agent cannot do its work any more, and says so (`/healthz` fails naming it; the
  agent exits non-zero after `FATAL_GRACE_S`, so that systemd or the lab restarts it).
- followers (a service's health in one cluster, a remote cluster, readiness): started and
  stopped as what they follow comes and goes. Each is keyed by a generation, so a follower
  stopped a moment ago (it may still sit in its blocking query) and its successor never
  collide. A follower that raises is dead as well: what it followed is frozen otherwise.

The loops catch what they expect; what reaches this module is a bug, and a bug must be loud.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

log = logging.getLogger("wiremesh.agent")
T = TypeVar("T")

FATAL_GRACE_S = 5.0  # a dead thread: /healthz says so this long, then the agent exits non-zero


class Supervisor:
    def __init__(self, stopping: threading.Event | None = None) -> None:
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._gen = itertools.count(1)
        self.stopping = stopping or threading.Event()  # set by the agent on its way out
        self.dead: dict[str, str] = {}  # thread -> why it died
        self.died = threading.Event()  # set at the first death
        self.died_at: float | None = None  # time.monotonic() of the first death

    def spawn(self, name: str, fn: Callable[[], object]) -> threading.Thread:
        """Start the loop `fn` in a thread called `name`: unique for the agent's life."""
        with self._lock:
            old = self._threads.get(name)
            if old is not None and old.is_alive():
                raise RuntimeError(f"thread {name} is already running")
        return self._start(name, fn, loop=True)

    def follow(self, name: str, fn: Callable[[], object]) -> threading.Thread:
        """Start a follower `fn` in a thread called `name#<generation>` (never collides)."""
        with self._lock:
            for n in [n for n, t in self._threads.items() if "#" in n and not t.is_alive()]:
                del self._threads[n]  # finished followers: forgotten
        return self._start(f"{name}#{next(self._gen)}", fn, loop=False)

    def _start(self, name: str, fn: Callable[[], object], loop: bool) -> threading.Thread:
        def main() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - a thread that died must be visible, never silent
                self._died(name, f"{type(e).__name__}: {e}")
                log.error("thread %s ended with an error", name, exc_info=True)
                return
            if loop and not self.stopping.is_set():
                self._died(name, "returned while the agent was running")
                log.error("thread %s returned while the agent was running", name)

        t = threading.Thread(target=main, name=name, daemon=True)
        with self._lock:
            self._threads[name] = t
        t.start()
        return t

    def _died(self, name: str, why: str) -> None:
        with self._lock:
            self.dead[name] = why
            if self.died_at is None:
                self.died_at = time.monotonic()
        self.died.set()

    def alive(self) -> list[str]:
        with self._lock:
            return sorted(n for n, t in self._threads.items() if t.is_alive())

    def join(self, names: Iterable[str] | None = None, timeout: float = 5.0) -> list[str]:
        """Wait for the named threads (all if None) to end, `timeout` seconds in all.

        Returns the names of those still running.
        """
        wanted = set(names) if names is not None else None
        with self._lock:
            chosen = [t for n, t in self._threads.items() if wanted is None or n in wanted]
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
