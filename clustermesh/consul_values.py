"""Typed values read from and written to Consul, and the parsers that check Consul's JSON.

A parser raises ValueError, KeyError or TypeError on an answer of the wrong shape: the store
turns that into a `ConsulError` (reason BAD_RESPONSE). A service instance that is well formed
JSON but unusable (an address that is not an IP, a port out of range) is not an error of the
answer: it is skipped, with a reason, so the other instances are still used.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

CheckStatus = Literal["passing", "warning", "critical"]
_SEVERITY: dict[str, int] = {"passing": 0, "warning": 1, "critical": 2}
CatalogServices = dict[str, frozenset[str]]  # service name -> the tags of its instances (no order)


@dataclass(frozen=True, slots=True)
class KVItem:
    key: str
    value: bytes
    modify_index: int
    session: str | None = None


@dataclass(frozen=True, slots=True)
class KVOp:
    """One KV operation of a transaction (`ConsulStore.txn`)."""

    verb: Literal["set", "cas", "get", "delete", "delete-cas", "check-index", "check-not-exists"]
    key: str
    value: bytes | None = None
    index: int | None = None

    @classmethod
    def set(cls, key: str, value: str | bytes) -> KVOp:
        return cls("set", key, _bytes(value))

    @classmethod
    def cas(cls, key: str, value: str | bytes, index: int) -> KVOp:
        """Write only if the key's ModifyIndex is still `index` (0: only if absent)."""
        return cls("cas", key, _bytes(value), index)

    @classmethod
    def delete(cls, key: str) -> KVOp:
        return cls("delete", key)

    @classmethod
    def delete_cas(cls, key: str, index: int) -> KVOp:
        return cls("delete-cas", key, None, index)

    @classmethod
    def check_index(cls, key: str, index: int) -> KVOp:
        return cls("check-index", key, None, index)

    def to_json(self) -> dict[str, Any]:
        """The operation as Consul's /v1/txn takes it."""
        kv: dict[str, Any] = {"Verb": self.verb, "Key": self.key}
        if self.index is not None:
            kv["Index"] = self.index
        if self.value is not None:
            kv["Value"] = base64.b64encode(self.value).decode()
        return {"KV": kv}


@dataclass(frozen=True, slots=True)
class HealthCheck:
    check_id: str
    name: str
    status: CheckStatus


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One instance of a service as the health endpoint reports it.

    `address` is the service's own address, or its node's when it registered none (Consul's
    rule). `status` is the worst of its checks (node checks included).
    """

    service: str
    service_id: str
    node: str
    datacenter: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int  # 0: none registered
    status: CheckStatus
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)
    checks: tuple[HealthCheck, ...] = ()


@dataclass(frozen=True, slots=True)
class SkippedInstance:
    """An instance the health endpoint returned that cannot be used, and why."""

    node: str
    service_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    service: str
    instances: tuple[ServiceInstance, ...] = ()
    skipped: tuple[SkippedInstance, ...] = ()


@dataclass(frozen=True, slots=True)
class AclPolicy:
    policy_id: str
    name: str
    description: str = ""
    rules: str | None = None  # None: not in the answer (policy lists carry no rules)


@dataclass(frozen=True, slots=True)
class AclToken:
    accessor_id: str
    secret_id: str | None = field(default=None, repr=False)  # never in logs
    description: str = ""
    policies: tuple[str, ...] = ()  # policy names


# --- parsers -------------------------------------------------------------------------------------


def parse_kv_items(body: Any) -> dict[str, KVItem]:
    """A KV read (recurse or not); None (404: nothing there) is an empty result."""
    return {i.key: i for i in map(parse_kv_item, _list(body))}


class KVParser:
    """parse_kv_items for a watch: an item whose ModifyIndex (and session) did not change since the
    last answer is the same KVItem object, not decoded again (a prefix watch gets every value on
    every change: with 1 000 records, decoding them all was most of a change's cost)."""

    def __init__(self) -> None:
        self._last: dict[str, KVItem] = {}

    def __call__(self, body: Any) -> dict[str, KVItem]:
        out: dict[str, KVItem] = {}
        last = self._last
        for raw in _list(body):
            old = last.get(raw["Key"]) if isinstance(raw, dict) else None
            if old is not None and old.modify_index == raw.get("ModifyIndex") and old.session == (raw.get("Session") or None):
                out[old.key] = old
                continue
            item = parse_kv_item(raw)
            out[item.key] = item
        self._last = out
        return out


def parse_kv_item(raw: Any) -> KVItem:
    value = raw.get("Value")
    data = base64.b64decode(value, validate=True) if value else b""
    return KVItem(key=_str(raw["Key"]), value=data, modify_index=_index(raw["ModifyIndex"]),
                  session=_str(raw["Session"]) if raw.get("Session") else None)


def parse_catalog_services(body: Any) -> CatalogServices:
    if not isinstance(body, dict):
        raise TypeError(f"catalog services: expected an object, got {type(body).__name__}")
    return {_str(name): frozenset(_str(t) for t in _list(tags)) for name, tags in body.items()}


def parse_health(service: str, body: Any) -> ServiceHealth:
    instances, skipped = [], []
    for raw in _list(body):
        node, svc = raw["Node"], raw["Service"]
        node_name, service_id = _str(node["Node"]), _str(svc["ID"])
        try:
            instances.append(_instance(node, svc, raw.get("Checks")))
        except ValueError as e:
            skipped.append(SkippedInstance(node_name, service_id, str(e)))
    return ServiceHealth(service, tuple(instances), tuple(skipped))


def _instance(node: Any, svc: Any, raw_checks: Any) -> ServiceInstance:
    address = svc.get("Address") or node.get("Address") or ""
    try:
        if not isinstance(address, str):  # ip_address() would take 167772165, or true, as an IPv4 address
            raise ValueError
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"address {address!r} is not an IP address") from None
    port = svc.get("Port") or 0
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port {port!r} is not in 0-65535")
    checks = tuple(HealthCheck(_str(c["CheckID"]), _str(c.get("Name") or ""), _status(c.get("Status")))
                   for c in _list(raw_checks))
    status: CheckStatus = max((c.status for c in checks), key=_SEVERITY.__getitem__, default="passing")
    meta = svc.get("Meta") or {}
    return ServiceInstance(
        service=_str(svc["Service"]), service_id=_str(svc["ID"]), node=_str(node["Node"]),
        datacenter=_str(node.get("Datacenter") or ""), address=ip, port=port, status=status,
        tags=tuple(_str(t) for t in _list(svc.get("Tags"))),
        meta={_str(k): _str(v) for k, v in meta.items()}, checks=checks,
    )


def parse_acl_policy(raw: Any) -> AclPolicy:
    rules = raw.get("Rules")
    return AclPolicy(_str(raw["ID"]), _str(raw["Name"]), _str(raw.get("Description") or ""),
                     _str(rules) if rules is not None else None)


def parse_acl_token(raw: Any) -> AclToken:
    secret = raw.get("SecretID")
    # Consul shows "<hidden>" to a token that may read ACLs but not write them.
    return AclToken(_str(raw["AccessorID"]), _str(secret) if secret and secret != "<hidden>" else None,
                    _str(raw.get("Description") or ""),
                    tuple(_str(p["Name"]) for p in _list(raw.get("Policies"))))


def _status(s: Any) -> CheckStatus:
    # Anything Consul might add later counts as failing: a backend is used only when known good.
    return s if s in ("passing", "warning") else "critical"


def _list(v: Any) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise TypeError(f"expected a list, got {type(v).__name__}")
    return v


def _index(v: Any) -> int:
    # Consul's indexes are unsigned integers; int() would take "7", 7.9 and true, and raise
    # OverflowError (not a shape error) on 1e400.
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an index, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"index {v} is negative")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _bytes(v: str | bytes) -> bytes:
    return v.encode() if isinstance(v, str) else v
