"""Consul writes that must not hold up the reconcile loop.

The loop replaces a rotating peer's key, or switches this node's own key, at a time agreed
on to the millisecond (keys.rotation); a Consul write in the same pass (a readiness word,
a rotation's progress) costs a round trip, 200 ms and more on a slow link. Those writes go
through a KVWriter: the newest value per key, written in the order the keys were first asked
for by one thread, each retried (backoff 0.2 s doubling to 5 s) until Consul took it.

`SyncWriter` has the same face and writes at once (unit tests, one-shot commands).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from wiremesh.clustermesh import ConsulError, ConsulStore

log = logging.getLogger("wiremesh.agent")
_DELETE = None
BACKOFF_MAX_S = 5.0


class Writer(Protocol):
    def put(self, key: str, value: str, cas: int | None = None,
            unless: Callable[[bytes], bool] | None = None) -> None: ...
    def delete(self, key: str) -> None: ...
    def pending(self) -> int: ...


class SyncWriter:
    """Writes at once; a write Consul refused is logged and given up (the caller repeats it)."""

    def __init__(self, store: ConsulStore) -> None:
        self.store = store
        self.failed = 0

    def put(self, key: str, value: str, cas: int | None = None,
            unless: Callable[[bytes], bool] | None = None) -> None:
        try:
            _put(self.store, key, value, cas, unless)
        except ConsulError as e:
            self.failed += 1
            log.warning("write of %s failed: %s", key, e)

    def delete(self, key: str) -> None:
        try:
            self.store.delete(key)
        except ConsulError as e:
            self.failed += 1
            log.warning("delete of %s failed: %s", key, e)

    def pending(self) -> int:
        return 0


class KVWriter:
    def __init__(self, store: ConsulStore, stop: threading.Event) -> None:
        self.store = store
        self.stop = stop
        # key -> (value or _DELETE, cas): a put with `cas` is made only if the key's ModifyIndex is
        # that (0: only if absent); refused, it is dropped (someone else wrote the key first).
        self._queue: OrderedDict[str, tuple[str | None, int | None, Callable[[bytes], bool] | None]] = OrderedDict()
        self._cv = threading.Condition()
        self._busy = False

    def start(self, spawn: Callable[[str, Callable[[], None]], object]) -> None:
        """Start writing (what was asked for before waits in order)."""
        spawn("kv-writer", self._run)

    def put(self, key: str, value: str, cas: int | None = None,
            unless: Callable[[bytes], bool] | None = None) -> None:
        """Write `value` (the newest asked for wins). With `cas`, only if the key's ModifyIndex
        is that (0: absent); with `unless`, only if the stored value does not satisfy it (read
        just before, the write made with its ModifyIndex)."""
        self._ask(key, value, cas, unless)

    def delete(self, key: str) -> None:
        self._ask(key, _DELETE, None, None)

    def _ask(self, key: str, value: str | None, cas: int | None, unless: Callable[[bytes], bool] | None) -> None:
        with self._cv:
            self._queue[key] = (value, cas, unless)  # a key already waiting keeps its place, with the newest value
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue) + self._busy

    def flush(self, timeout: float) -> bool:
        """Wait until every write asked for so far was made (or `timeout`); True if all were."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _run(self) -> None:
        delay = 0.2
        while not self.stop.is_set():
            with self._cv:
                self._cv.wait_for(lambda: bool(self._queue) or self.stop.is_set())
                if self.stop.is_set():
                    return
                key, asked = next(iter(self._queue.items()))
                value, cas, unless = asked
                self._busy = True
            try:
                if value is _DELETE:
                    self.store.delete(key)
                elif not _put(self.store, key, value, cas, unless):
                    log.info("write of %s not made: the key changed meanwhile (cas %s)", key, cas)
            except ConsulError as e:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
                log.warning("write of %s failed (%s); trying again in %.1f s", key, e, delay)
                self.stop.wait(delay)
                delay = min(BACKOFF_MAX_S, delay * 2)
                continue
            delay = 0.2
            with self._cv:
                if self._queue.get(key) == asked:
                    del self._queue[key]  # not asked again meanwhile (a newer value would stay)
                self._busy = False
                self._cv.notify_all()


def _put(store: ConsulStore, key: str, value: str, cas: int | None, unless: Callable[[bytes], bool] | None) -> bool:
    if unless is not None and cas is None:
        item = store.get(key)
        if item is not None and unless(item.value):
            return False
        cas = item.modify_index if item is not None else 0
    return bool(store.put(key, value, cas=cas))
