"""A typed face on Consul's HTTP API (py-consul): KV, check-and-set, sessions, blocking queries.

Every Consul failure leaves here as a `ConsulError`: `ConsulUnavailable` when Consul could not
be reached (connection, timeout, 5xx, no leader), so callers can freeze their state and retry.
Short requests are retried with exponential backoff (tenacity); blocking queries are not (the
watch loop owns its own backoff).
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import consul
from consul.callback import CB
import requests
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from .errors import ConsulError, ConsulUnavailable, SessionExpired

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ADDR = "http://127.0.0.1:8500"


@dataclass(frozen=True, slots=True)
class ConsulOptions:
    """How to reach Consul: address (scheme://host:port), datacenter, ACL token, TLS."""

    address: str = DEFAULT_ADDR
    token: str | None = None
    ca_file: str | None = None
    datacenter: str | None = None
    timeout: float = 5.0

    def parsed(self) -> tuple[str, str, int]:
        addr = self.address if "://" in self.address else f"http://{self.address}"
        u = urllib.parse.urlsplit(addr)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConsulError(f"consul address: {self.address!r} is not http(s)://host:port")
        try:
            port = u.port or (443 if u.scheme == "https" else 8500)
        except ValueError:
            raise ConsulError(f"consul address: {self.address!r} has a bad port") from None
        return u.scheme, u.hostname, port

    def __repr__(self) -> str:  # never show the token
        return f"ConsulOptions(address={self.address!r}, datacenter={self.datacenter!r}, token={'***' if self.token else None})"


@dataclass(frozen=True, slots=True)
class KVItem:
    key: str
    value: bytes
    modify_index: int
    session: str | None = None


def _translate(e: Exception, what: str, address: str = "") -> ConsulError:
    if isinstance(e, (requests.ConnectionError, requests.Timeout, consul.Timeout)):
        kind = "timed out" if isinstance(e, (requests.Timeout, consul.Timeout)) else "unreachable"
        return ConsulUnavailable(f"{what}: Consul at {address} {kind}" if address else f"{what}: Consul {kind}")
    if isinstance(e, consul.ACLPermissionDenied):
        return ConsulError(f"{what}: permission denied by Consul ACLs", 403)
    if isinstance(e, consul.NotFound):
        return ConsulError(f"{what}: not found", 404)
    text = str(e)
    if text.startswith("500") or "No cluster leader" in text or text.startswith(("502", "503", "504")):
        return ConsulUnavailable(f"{what}: Consul not ready ({text[:80]})")
    return ConsulError(f"{what}: {text[:200]}")


_retry = retry(
    retry=retry_if_exception_type(ConsulUnavailable),
    wait=wait_exponential(multiplier=0.05, max=1.0),
    stop=stop_after_attempt(4),
    reraise=True,
)


class ConsulStore:
    """One Consul agent's HTTP API. Thread-safe: each thread gets its own HTTP session."""

    def __init__(self, options: ConsulOptions | None = None, *, retries: bool = True) -> None:
        self.options = options or ConsulOptions()
        self._scheme, self._host, self._port = self.options.parsed()
        self._local = threading.local()
        self._retries = retries

    def _client(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            verify: bool | str = self.options.ca_file or True
            c = consul.Consul(
                host=self._host, port=self._port, scheme=self._scheme, token=self.options.token,
                dc=self.options.datacenter, verify=verify, connections_timeout=self.options.timeout,
            )
            self._local.client = c
        return c

    def _call(self, what: str, fn: Callable[[Any], T], retry_it: bool = True) -> T:
        def once() -> T:
            try:
                return fn(self._client())
            except (requests.RequestException, consul.ConsulException) as e:
                raise _translate(e, what, self.options.address) from None

        if retry_it and self._retries:
            return _retry(once)()
        return once()

    # --- KV -------------------------------------------------------------------------------
    def get(self, key: str, dc: str | None = None) -> KVItem | None:
        _, item = self._call(f"get {key}", lambda c: c.kv.get(key, dc=dc))
        return _item(item) if item else None

    def list(self, prefix: str, dc: str | None = None) -> tuple[int, dict[str, KVItem]]:
        index, items = self._call(f"list {prefix}", lambda c: c.kv.get(prefix, recurse=True, dc=dc))
        return int(index), {i["Key"]: _item(i) for i in items or []}

    def put(self, key: str, value: str | bytes, *, cas: int | None = None, acquire: str | None = None,
            dc: str | None = None) -> bool:
        """Write a value. With `cas`, only if the key's ModifyIndex still equals it (0: only if absent).

        With `acquire`, only if no other session holds the key. Returns whether it was written.
        """
        return bool(self._call(f"put {key}", lambda c: c.kv.put(key, value, cas=cas, acquire=acquire, dc=dc)))

    def delete(self, key: str, *, cas: int | None = None, recurse: bool = False, dc: str | None = None) -> bool:
        return bool(self._call(f"delete {key}", lambda c: c.kv.delete(key, cas=cas, recurse=recurse, dc=dc)))

    def blocking_list(self, prefix: str, index: int, wait_s: int, dc: str | None = None) -> tuple[int, dict[str, KVItem]]:
        """A blocking query: returns when anything under `prefix` changes after `index`, or after `wait_s`."""
        result = self._call(
            f"watch {prefix}",
            lambda c: c.kv.get(prefix, recurse=True, index=index or None, wait=f"{wait_s}s", dc=dc),
            retry_it=False,
        )
        new_index, items = result
        return int(new_index), {i["Key"]: _item(i) for i in items or []}

    def watch(self, prefix: str, stop: threading.Event, wait_s: int = 30, dc: str | None = None) -> Iterator[tuple[int, dict[str, KVItem]]]:
        """Yield whole snapshots of `prefix` each time it changes; raises ConsulError on failure.

        Follows Consul's blocking-query rules: an index that goes backwards (a restored or
        restarted server) resets to 0, and an index is never allowed to be 0 on the next call.
        """
        index = 0
        while not stop.is_set():
            new_index, items = self.blocking_list(prefix, index, wait_s, dc=dc)
            if new_index < index:
                new_index = 0
            if new_index != index or index == 0:
                yield new_index, items
            index = max(new_index, 1)

    # --- sessions -------------------------------------------------------------------------
    def session_create(self, name: str, ttl_s: int, behavior: str = "delete", lock_delay_s: int = 0) -> str:
        """A session with a TTL. Sent by hand: py-consul refuses TTLs under 10 s, which a server
        with a lower session_ttl_min accepts."""
        body = json.dumps({"Name": name, "TTL": f"{ttl_s}s", "Behavior": behavior, "LockDelay": f"{lock_delay_s}s"})
        params = [("dc", self.options.datacenter)] if self.options.datacenter else []
        return str(self._call(
            "create session",
            lambda c: c.http.put(CB.json(is_id=True), "/v1/session/create", params=params,
                                 headers=c.prepare_headers(None), data=body),
        ))

    def session_renew(self, session_id: str) -> None:
        try:
            result = self._call("renew session", lambda c: c.session.renew(session_id))
        except ConsulError as e:
            if e.status == 404:
                raise SessionExpired(f"session {session_id[:8]} expired") from None
            raise
        if result is None:
            raise SessionExpired(f"session {session_id[:8]} expired")

    def session_destroy(self, session_id: str) -> None:
        self._call("destroy session", lambda c: c.session.destroy(session_id))

    def session_info(self, session_id: str) -> dict[str, Any] | None:
        _, info = self._call("session info", lambda c: c.session.info(session_id))
        return info  # type: ignore[no-any-return]

    def leader(self) -> str:
        return str(self._call("status leader", lambda c: c.status.leader()))

    def datacenters(self) -> "builtins.list[str]":
        """Datacenters this Consul knows, through WAN federation (its own included)."""
        return [str(d) for d in self._call("catalog datacenters", lambda c: c.catalog.datacenters())]

    def local_datacenter(self) -> str:
        # py-consul's agent.self() sends no token; ACL-enabled agents need one (agent:read).
        info = self._call("agent self", lambda c: c.http.get(CB.json(), "/v1/agent/self",
                                                             headers=c.prepare_headers(None)))
        return str(info["Config"]["Datacenter"])


def _item(raw: dict[str, Any]) -> KVItem:
    value = raw.get("Value") or b""
    if isinstance(value, str):
        value = value.encode()
    return KVItem(key=raw["Key"], value=value, modify_index=int(raw["ModifyIndex"]), session=raw.get("Session"))
