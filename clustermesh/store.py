"""The one Consul boundary: every call wiremesh makes to Consul's HTTP API goes through `ConsulStore`.

KV, transactions, sessions, ACLs, the catalog, health and the local agent's services, plus one
blocking-query watch for any of the reads (`watch.py`). Every failure leaves as a `ConsulError`
built by one function (`consul_errors.consul_error`) with the cause kept; `ConsulUnavailable`
means "Consul cannot answer now", so callers freeze their state and retry.

py-consul is the HTTP transport (a connection per thread, TLS, timeouts that grow with a
blocking query's wait). Endpoints are called through `_request` rather than py-consul's
endpoint wrappers: those turn statuses into exception classes without the status, and some
send no ACL token (txn, agent/self) or refuse a session TTL under 10 s.
Short calls that fail with ConsulUnavailable are retried with exponential backoff (tenacity);
transactions, creations (ACL objects, service registrations) and blocking queries are not (a
watch's caller owns its backoff).
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import consul
import requests
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from .consul_errors import Reply, consul_error
from .consul_values import (
    AclPolicy,
    AclToken,
    CatalogServices,
    CheckStatus,
    KVItem,
    KVOp,
    ServiceHealth,
    parse_acl_policy,
    parse_acl_token,
    parse_kv_item,
    parse_kv_items,
)
from .errors import ConsulError, ConsulUnavailable, SessionExpired
from .tokens import check_token
from .watch import MIN_INTERVAL_S, Endpoint, RateLimit, Stop, follow

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ADDR = "http://127.0.0.1:8500"
_SHAPE_ERRORS = (KeyError, ValueError, TypeError, AttributeError, RecursionError)  # a body nested too deeply too


@dataclass(frozen=True, slots=True)
class ConsulOptions:
    """How to reach Consul: address (scheme://host:port), datacenter, ACL token, TLS.

    HTTPS verifies Consul's certificate against `ca_file` (else the system's CAs); a client
    certificate (`client_cert`, `client_key`) is sent when given. `session_node`: the Consul
    node an agent's sessions are created on (None: the Consul agent it talks to)."""

    address: str = DEFAULT_ADDR
    token: str | None = None
    ca_file: str | None = None
    datacenter: str | None = None
    timeout: float = 5.0
    client_cert: str | None = None
    client_key: str | None = None
    session_node: str | None = None

    def __post_init__(self) -> None:
        # The last line of defence, whatever the token's source: one with a space or a newline
        # would make the HTTP layer's error echo it. Its sources check it first, naming themselves.
        if self.token == "":
            object.__setattr__(self, "token", None)
        elif self.token is not None:
            check_token(self.token, "the Consul token")

    def parsed(self) -> tuple[str, str, int]:
        addr = self.address if "://" in self.address else f"http://{self.address}"
        u = urllib.parse.urlsplit(addr)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConsulError(f"consul address: {self.address!r} is not http(s)://host:port")
        try:
            port = u.port or (443 if u.scheme == "https" else 8500)
        except ValueError as e:
            raise ConsulError(f"consul address: {self.address!r} has a bad port") from e
        return u.scheme, u.hostname, port

    def __repr__(self) -> str:  # never show the token
        return (f"ConsulOptions(address={self.address!r}, datacenter={self.datacenter!r}, "
                f"token={'***' if self.token else None}, ca_file={self.ca_file!r})")


_retry = retry(
    retry=retry_if_exception_type(ConsulUnavailable),
    wait=wait_exponential(multiplier=0.05, max=1.0),
    stop=stop_after_attempt(4),
    reraise=True,
)


def _reply(r: Any) -> Reply:
    return Reply(r.code, r.body, r.headers)


class ConsulStore:
    """One Consul agent's HTTP API. Thread-safe: each thread gets its own HTTP session."""

    def __init__(self, options: ConsulOptions | None = None, *, retries: bool = True) -> None:
        self.options = options or ConsulOptions()
        self._scheme, self._host, self._port = self.options.parsed()
        self._local = threading.local()
        self._retries = retries

    def set_thread_timeout(self, seconds: float) -> None:
        """Requests from the calling thread time out after `seconds` (others keep the option's):
        for a loop whose request is worthless once late (a session renewal past its TTL)."""
        self._local.timeout = seconds
        self._local.client = None

    def _http(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            verify: bool | str = self.options.ca_file or True
            o = self.options
            cert = (o.client_cert, o.client_key) if o.client_cert and o.client_key else o.client_cert
            c = consul.Consul(host=self._host, port=self._port, scheme=self._scheme, verify=verify, cert=cert,
                              connections_timeout=getattr(self._local, "timeout", None) or self.options.timeout)
            # No proxy, netrc or CA-bundle lookups in the environment on every request: Consul
            # is addressed directly (they were half of a small change's cost).
            c.http.session.trust_env = False
            self._local.client = c
        return c.http

    def _request(self, method: str, path: str, what: str, *, params: Sequence[tuple[str, str]] = (),
                 body: str | bytes | None = None, dc: str | None = None, local: bool = False,
                 ok_404: bool = False, retry_it: bool = False) -> Reply:
        """Send one request; a failure of any kind raises the ConsulError of `consul_error`.

        `local`: an endpoint of the agent itself (no datacenter). `ok_404`: a 404 is an answer.
        """
        query = list(params)
        if not local and (dc or self.options.datacenter):
            query.append(("dc", dc or self.options.datacenter or ""))
        headers = {"X-Consul-Token": self.options.token} if self.options.token else {}

        def once() -> Reply:
            http = self._http()
            try:
                reply: Reply = (http.get(_reply, path, params=query, headers=headers) if method == "get" else
                                getattr(http, method)(_reply, path, params=query, data=body or "", headers=headers))
            except requests.RequestException as e:
                raise consul_error(what, e, self.options.address) from e
            if reply.status >= 400 and not (ok_404 and reply.status == 404):
                raise consul_error(what, reply, self.options.address)
            return reply

        return _retry(once)() if retry_it and self._retries else once()

    def _json(self, what: str, reply: Reply, parse: Callable[[Any], T]) -> T:
        """Parse a reply's JSON body (None for a 404) with `parse`; a wrong shape is BAD_RESPONSE."""
        try:
            return parse(None if reply.status == 404 else json.loads(reply.body))
        except _SHAPE_ERRORS as e:
            raise consul_error(what, e, self.options.address) from e

    # --- any blocking-query read -----------------------------------------------------------
    def _fetch(self, endpoint: Endpoint[T], index: int, wait_s: int, dc: str | None, *, watch: bool) -> tuple[int, T]:
        """Read `endpoint`: at once (index 0), or blocking until it changes after `index` or `wait_s`."""
        what = f"{'watch' if watch else 'read'} {endpoint.what}"
        params = list(endpoint.params)
        if index:
            params += [("index", str(index)), ("wait", f"{wait_s}s")]
        reply = self._request("get", endpoint.path, what, params=params, dc=dc, ok_404=endpoint.absent_ok,
                              retry_it=not watch)
        try:
            new_index = int(reply.headers["X-Consul-Index"])
        except _SHAPE_ERRORS as e:
            raise consul_error(what, e, self.options.address) from e
        return new_index, self._json(what, reply, endpoint.parse)

    def read(self, endpoint: Endpoint[T], dc: str | None = None) -> tuple[int, T]:
        """One read of `endpoint` now: (X-Consul-Index, value)."""
        return self._fetch(endpoint, 0, 0, dc, watch=False)

    @overload
    def watch(self, endpoint: str, stop: Stop, wait_s: int = 30, dc: str | None = None, *,
              min_interval_s: float = MIN_INTERVAL_S) -> Iterator[tuple[int, dict[str, KVItem]]]: ...

    @overload
    def watch(self, endpoint: Endpoint[T], stop: Stop, wait_s: int = 30, dc: str | None = None, *,
              min_interval_s: float = MIN_INTERVAL_S) -> Iterator[tuple[int, T]]: ...

    def watch(self, endpoint: str | Endpoint[Any], stop: Stop, wait_s: int = 30, dc: str | None = None, *,
              min_interval_s: float = MIN_INTERVAL_S) -> Iterator[tuple[int, Any]]:
        """Yield (index, value) now and each time the value changes, until `stop`; raises ConsulError.

        `endpoint` is an `Endpoint` (catalog services, a service's health, ...) or a KV prefix
        (whole snapshots: key -> KVItem). Index resets, index 0 and rate limiting follow
        Consul's blocking-query rules (see `watch.follow`).
        """
        ep = Endpoint.kv_prefix(endpoint) if isinstance(endpoint, str) else endpoint
        return follow(lambda index: self._fetch(ep, index, wait_s, dc, watch=True), stop,
                      RateLimit(min_interval_s))

    # --- KV -------------------------------------------------------------------------------
    def get(self, key: str, dc: str | None = None) -> KVItem | None:
        reply = self._request("get", f"/v1/kv/{key}", f"get {key}", dc=dc, ok_404=True, retry_it=True)
        items = self._json(f"get {key}", reply, parse_kv_items)
        return items.get(key)

    def list(self, prefix: str, dc: str | None = None) -> tuple[int, dict[str, KVItem]]:
        return self._fetch(Endpoint.kv_prefix(prefix), 0, 0, dc, watch=False)

    def blocking_list(self, prefix: str, index: int, wait_s: int, dc: str | None = None) -> tuple[int, dict[str, KVItem]]:
        """A blocking query: returns when anything under `prefix` changes after `index`, or after `wait_s`."""
        return self._fetch(Endpoint.kv_prefix(prefix), index, wait_s, dc, watch=True)

    def put(self, key: str, value: str | bytes, *, cas: int | None = None, acquire: str | None = None,
            dc: str | None = None, retry: bool = True) -> bool:
        """Write a value. With `cas`, only if the key's ModifyIndex still equals it (0: only if absent).

        With `acquire`, only if no other session holds the key (SessionExpired if Consul no
        longer has that session). Returns whether it was written. `retry=False`: one try (for
        a caller that has its own pace to keep, like the session's renewals).
        """
        params = [(k, str(v)) for k, v in (("cas", cas), ("acquire", acquire)) if v is not None]
        data = value.encode() if isinstance(value, str) else value
        reply = self._request("put", f"/v1/kv/{key}", f"put {key}", params=params, body=data, dc=dc, retry_it=retry)
        return self._json(f"put {key}", reply, _bool)

    def delete(self, key: str, *, cas: int | None = None, recurse: bool = False, dc: str | None = None) -> bool:
        params = ([("cas", str(cas))] if cas is not None else []) + ([("recurse", "1")] if recurse else [])
        reply = self._request("delete", f"/v1/kv/{key}", f"delete {key}", params=params, dc=dc, retry_it=True)
        return self._json(f"delete {key}", reply, _bool)

    def txn(self, ops: Sequence[KVOp], dc: str | None = None) -> tuple[KVItem, ...]:
        """Apply `ops` atomically: all or none. Raises TransactionFailed (with each op's error) if
        Consul rolled it back. Returns the items the operations report (for get: the value).
        Not retried: after a lost answer, a retried check-and-set would fail on its own write."""
        body = json.dumps([op.to_json() for op in ops])
        reply = self._request("put", "/v1/txn", "transaction", body=body, dc=dc)
        return self._json("transaction", reply,
                          lambda b: tuple(parse_kv_item(r["KV"]) for r in b.get("Results") or [] if "KV" in r))

    # --- sessions -------------------------------------------------------------------------
    def session_create(self, name: str, ttl_s: int, behavior: str = "delete", lock_delay_s: int = 0,
                       node: str | None = None) -> str:
        """A session with a TTL (a TTL outside the server's range: ConsulError, reason SESSION_TTL).

        With `node`, on that catalog node and tied to no health check (the TTL alone ends it);
        else on the node of the Consul agent asked, tied to its serfHealth."""
        d = {"Name": name, "TTL": f"{ttl_s}s", "Behavior": behavior, "LockDelay": f"{lock_delay_s}s"}
        body = json.dumps(d if node is None else {**d, "Node": node, "Checks": []})
        reply = self._request("put", "/v1/session/create", "create session", body=body, retry_it=True)
        return self._json("create session", reply, lambda b: _str(b["ID"]))

    def session_renew(self, session_id: str, retry: bool = True) -> None:
        reply = self._request("put", f"/v1/session/renew/{session_id}", "renew session", ok_404=True, retry_it=retry)
        if reply.status == 404 or not self._json("renew session", reply, lambda b: b):
            raise SessionExpired(f"session {session_id[:8]} expired", reply.status)

    def session_destroy(self, session_id: str) -> None:
        self._request("put", f"/v1/session/destroy/{session_id}", "destroy session", retry_it=True)

    def session_info(self, session_id: str) -> dict[str, Any] | None:
        reply = self._request("get", f"/v1/session/info/{session_id}", "session info", ok_404=True, retry_it=True)
        return self._json("session info", reply, lambda b: dict(b[0]) if b else None)

    # --- status, catalog, health ----------------------------------------------------------
    def catalog_node_exists(self, node: str) -> bool:
        reply = self._request("get", f"/v1/catalog/node/{urllib.parse.quote(node, safe='')}", f"catalog node {node}",
                              retry_it=True)
        return self._json(f"catalog node {node}", reply, lambda b: b is not None and bool(b.get("Node")))

    def catalog_register_node(self, node: str, address: str, meta: dict[str, str] | None = None) -> None:
        """Register `node` in the catalog (an external node: no Consul agent runs its checks)."""
        body = json.dumps({"Node": node, "Address": address, "NodeMeta": meta or {}})
        self._request("put", "/v1/catalog/register", f"register catalog node {node}", body=body, retry_it=True)

    def leader(self) -> str:
        reply = self._request("get", "/v1/status/leader", "status leader", local=True, retry_it=True)
        return self._json("status leader", reply, _str)

    def datacenters(self) -> "builtins.list[str]":
        """Datacenters this Consul knows, through WAN federation (its own included)."""
        reply = self._request("get", "/v1/catalog/datacenters", "catalog datacenters", local=True, retry_it=True)
        return self._json("catalog datacenters", reply, lambda b: [_str(d) for d in b])

    def local_datacenter(self) -> str:
        reply = self._request("get", "/v1/agent/self", "agent self", local=True, retry_it=True)
        return self._json("agent self", reply, lambda b: _str(b["Config"]["Datacenter"]))

    def catalog_services(self, dc: str | None = None) -> CatalogServices:
        """Every service of datacenter `dc` (default: the store's), name -> tags."""
        return self.read(Endpoint.catalog_services(), dc)[1]

    def health_service(self, name: str, passing: bool = True, dc: str | None = None) -> ServiceHealth:
        """Instances of service `name` in `dc`: only those whose checks all pass if `passing`."""
        return self.read(Endpoint.health_service(name, passing), dc)[1]

    # --- the local agent's services (backends register through their Consul agent) ---------
    def agent_service_register(self, name: str, *, service_id: str | None = None, address: str = "", port: int = 0,
                               tags: Sequence[str] = (), meta: dict[str, str] | None = None,
                               ttl_s: int | None = None) -> str | None:
        """Register a service with the local agent; with `ttl_s`, a TTL check (critical until
        updated). Returns the check's id (for `agent_check_update`), or None without a check."""
        sid = service_id or name
        d: dict[str, Any] = {"Name": name, "ID": sid, "Address": address, "Port": port, "Tags": list(tags),
                             "Meta": meta or {}}
        if ttl_s is not None:
            d["Check"] = {"CheckID": f"service:{sid}", "Name": f"{name} TTL", "TTL": f"{ttl_s}s"}
        self._request("put", "/v1/agent/service/register", f"register service {sid}", body=json.dumps(d), local=True)
        return f"service:{sid}" if ttl_s is not None else None

    def agent_service_register_http(self, name: str, *, url: str, service_id: str | None = None, address: str = "",
                                    port: int = 0, interval_s: float = 10.0, timeout_s: float = 5.0,
                                    tags: Sequence[str] = (), meta: dict[str, str] | None = None) -> str:
        """Register a service with the local agent and an HTTP check that the agent itself runs:
        GET `url` every `interval_s` (2xx passing, 429 warning, anything else or no answer
        within `timeout_s` critical). The check is critical until its first run. Returns its id."""
        sid = service_id or name
        d: dict[str, Any] = {"Name": name, "ID": sid, "Address": address, "Port": port, "Tags": list(tags),
                             "Meta": meta or {},
                             "Check": {"CheckID": f"service:{sid}", "Name": f"{name} HTTP", "HTTP": url,
                                       "Method": "GET", "Interval": f"{interval_s:g}s", "Timeout": f"{timeout_s:g}s"}}
        self._request("put", "/v1/agent/service/register", f"register service {sid}", body=json.dumps(d), local=True)
        return f"service:{sid}"

    def agent_check_update(self, check_id: str, status: CheckStatus, output: str = "") -> None:
        self._request("put", f"/v1/agent/check/update/{check_id}", f"update check {check_id}", local=True,
                      body=json.dumps({"Status": status, "Output": output}), retry_it=True)

    def agent_service_deregister(self, service_id: str) -> None:
        self._request("put", f"/v1/agent/service/deregister/{service_id}", f"deregister service {service_id}",
                      local=True, retry_it=True)

    # --- ACLs -----------------------------------------------------------------------------
    def acl_policy_list(self) -> "builtins.list[AclPolicy]":
        reply = self._request("get", "/v1/acl/policies", "list ACL policies", retry_it=True)
        return self._json("list ACL policies", reply, lambda b: [parse_acl_policy(p) for p in b or []])

    def acl_policy_read(self, policy_id: str) -> AclPolicy:
        reply = self._request("get", f"/v1/acl/policy/{policy_id}", "read ACL policy", retry_it=True)
        return self._json("read ACL policy", reply, parse_acl_policy)

    def acl_policy_create(self, name: str, rules: str, description: str = "") -> AclPolicy:
        body = json.dumps({"Name": name, "Rules": rules, "Description": description})
        reply = self._request("put", "/v1/acl/policy", f"create ACL policy {name}", body=body)
        return self._json(f"create ACL policy {name}", reply, parse_acl_policy)

    def acl_policy_update(self, policy_id: str, name: str, rules: str, description: str = "") -> AclPolicy:
        body = json.dumps({"ID": policy_id, "Name": name, "Rules": rules, "Description": description})
        reply = self._request("put", f"/v1/acl/policy/{policy_id}", f"update ACL policy {name}", body=body,
                              retry_it=True)
        return self._json(f"update ACL policy {name}", reply, parse_acl_policy)

    def acl_token_list(self) -> "builtins.list[AclToken]":
        reply = self._request("get", "/v1/acl/tokens", "list ACL tokens", retry_it=True)
        return self._json("list ACL tokens", reply, lambda b: [parse_acl_token(t) for t in b or []])

    def acl_token_read(self, accessor_id: str) -> AclToken:
        reply = self._request("get", f"/v1/acl/token/{accessor_id}", "read ACL token", retry_it=True)
        return self._json("read ACL token", reply, parse_acl_token)

    def acl_token_create(self, description: str, policy_names: Sequence[str]) -> AclToken:
        body = json.dumps({"Description": description, "Policies": [{"Name": n} for n in policy_names]})
        reply = self._request("put", "/v1/acl/token", "create ACL token", body=body)
        return self._json("create ACL token", reply, parse_acl_token)


def _bool(b: Any) -> bool:
    if not isinstance(b, bool):
        raise TypeError(f"expected true or false, got {b!r}"[:80])
    return b


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


__all__ = ["DEFAULT_ADDR", "ConsulOptions", "ConsulStore", "KVItem", "KVOp"]
