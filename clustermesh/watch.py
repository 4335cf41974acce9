"""Blocking-query watches on any Consul read: a KV prefix, the catalog's services, a service's health.

An `Endpoint` says what to read and how to type it; `follow` is the loop, written after
Consul's blocking-query rules (https://developer.hashicorp.com/consul/api-docs/features/blocking):

- an index that goes backwards (a restored snapshot, the highest key of a KV list removed)
  resets the loop to 0, that is: the next read returns at once and its value is taken as new;
- an index is never sent as 0 after the first read (0 does not block: a busy loop), it is at
  least 1;
- an unchanged index is a timeout or an idempotent write: nothing is delivered, and neither is
  a new index whose value equals the last one delivered;
- the loop is rate limited with a token bucket of burst 2: a couple of quick successive
  deliveries go through at once, churn degrades into one read per interval (with jitter).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .consul_values import CatalogServices, KVItem, KVParser, ServiceHealth, parse_catalog_services, parse_health

log = logging.getLogger(__name__)
T = TypeVar("T")

# Churn degrades into at most one read per MIN_INTERVAL_S per watch. Consul's page suggests
# seconds for a generic client; a mesh agent wants a change within tens of milliseconds, and
# each read delivers the whole state, so changes during churn are batched, never lost.
MIN_INTERVAL_S = 0.025


class Stop(Protocol):
    """What a watch needs of its stop signal (a threading.Event is one)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True, slots=True)
class Endpoint(Generic[T]):
    """A Consul read that supports blocking queries, and the parser that types its JSON body."""

    what: str  # for messages: "watch <what>: ..."
    path: str
    parse: Callable[[Any], T]
    params: tuple[tuple[str, str], ...] = ()
    absent_ok: bool = False  # 404 means "nothing there" (KV): parse(None)

    @staticmethod
    def kv_prefix(prefix: str) -> Endpoint[dict[str, KVItem]]:
        """Every key under `prefix`: key -> KVItem."""
        return Endpoint(prefix, f"/v1/kv/{prefix}", KVParser(), (("recurse", "1"),), absent_ok=True)

    @staticmethod
    def catalog_services() -> Endpoint[CatalogServices]:
        """The datacenter's service names, each with its tags."""
        return Endpoint("catalog services", "/v1/catalog/services", parse_catalog_services)

    @staticmethod
    def health_service(name: str, passing: bool = True) -> Endpoint[ServiceHealth]:
        """The instances of service `name` with their health; only passing ones if `passing`."""
        path = f"/v1/health/service/{name}"  # quoted by the HTTP layer
        params = (("passing", "1"),) if passing else ()
        return Endpoint(f"health of service {name}", path, lambda body: parse_health(name, body), params)


class RateLimit:
    """A token bucket: `burst` reads at once, then one per `interval_s` (plus up to half of it
    in jitter, so that watchers woken by the same change do not come back in step)."""

    def __init__(self, interval_s: float = MIN_INTERVAL_S, burst: int = 2,
                 clock: Callable[[], float] = time.monotonic, rand: Callable[[], float] = random.random) -> None:
        self.interval_s, self.burst = interval_s, burst
        self._clock, self._rand = clock, rand
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> float:
        """Take a token; return how long to wait first (0.0: go now)."""
        if self.interval_s <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) / self.interval_s) - 1
        self._last = now
        if self._tokens >= 0:
            return 0.0
        return -self._tokens * self.interval_s + self._rand() * self.interval_s / 2


def follow(fetch: Callable[[int], tuple[int, T]], stop: Stop, limit: RateLimit | None = None) -> Iterator[tuple[int, T]]:
    """Yield (index, value) from `fetch(index)` each time the value changes, until `stop`.

    `fetch(0)` is the first, non-blocking read; later ones block on the last index (>= 1).
    Errors of `fetch` propagate: the caller owns the retry policy.
    """
    index = 0
    delivered: list[T] = []  # the last value yielded, once there is one
    while not stop.is_set():
        delay = limit.take() if limit else 0.0
        if delay > 0 and stop.wait(delay):
            return
        new_index, value = fetch(index)
        if stop.is_set():
            return
        went_back = new_index < index
        unchanged = new_index == index and bool(delivered)
        if went_back:
            log.info("Consul index went back from %d to %d: reading again from the start", index, new_index)
        index = max(0 if went_back else new_index, 1)
        if unchanged or (delivered and delivered[0] == value):
            continue
        delivered = [value]
        yield new_index, value


__all__ = ["Endpoint", "MIN_INTERVAL_S", "RateLimit", "Stop", "follow"]
