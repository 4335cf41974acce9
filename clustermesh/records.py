"""Record schemas stored in Consul: strict about what this agent knows, tolerant of what it does not.

Every value read from Consul is untrusted: `from_json` checks size (16 KiB), JSON, and every
known field's type and range, and raises `InvalidRecord` naming the field and the reason.

Versions. Every record (ClusterConfig, NodeRecord, the federation's MeshMember) carries a schema
version in its `"schema"` field: the text `"MAJOR.MINOR"` (an integer `MAJOR` is read as
`MAJOR.0`). A minor bump only adds optional fields, which older agents ignore; a major bump
changes the meaning of existing ones, so a record whose major is newer than `SCHEMA_MAJOR` is
refused (`schema: schema version 2.0 is newer than this agent's 1.0; upgrade the agent`),
before any other field is looked at. A record without the field is version 1.0: that is what
agents wrote before versioning, and what this one writes for a 1.0 record. `to_json` leaves the
field out at 1.0 because agents released before versioning refuse every field they do not know:
writing `"schema": "1.0"` would make each of them drop this node's tunnel for the length of a
rolling upgrade. Fields added since 1.0 (`NodeRecord.next_public_key`) are likewise written only
when set.

Unknown fields. A field this agent does not know is not an error: it is kept, unvalidated but
bounded by the size limit (and JSON's own nesting limit), in the record's `extra` mapping, and
`to_json` writes it back, so a record rewritten by this agent keeps what a newer agent (or
another writer) added; `keep_unknown` carries them from the stored record to a rebuilt one.
`schema` and `extra` are left out of equality and hashing: two records that differ only in
what this agent cannot act on are the same record to it, and cause no change in the dataplane.
One exception: a field whose name says it holds a private key refuses the record, because its
writer has leaked that key into Consul.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from wiremesh.keys import KeyMaterialError, PublicKey, VerifyKey

from .errors import InvalidRecord

MAX_RECORD_BYTES = 16 * 1024
ROUTING_MODES = ("wireguard", "vxlan")
SCHEMA_FIELD = "schema"
SCHEMA_MAJOR = 1
SCHEMA = "1.0"  # a record's version when it says none, and the version of the records this agent builds
ROTATE_EVERY_MIN, ROTATE_EVERY_MAX = 3600, 365 * 86400  # ClusterConfig.rotate_every, when set (seconds)
MAX_SETTINGS_SIGNATURES = 4  # the current and the next signing key sign a roll-over; room for more
MAX_REVOKED = 256  # serials in ClusterConfig.revoked (32 hex digits each: well inside the size limit)

# Cilium's cluster-name rule: lowercase letters, digits and dashes, at most 32.
_CLUSTER_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?")
# Node names: a DNS label, optionally dotted, at most 63.
_NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_PORT = re.compile(r"[0-9]{1,5}")
_SCHEMA = re.compile(r"([0-9]{1,4})(?:\.([0-9]{1,4}))?")
_SERIAL = re.compile(r"[0-9a-f]{32}")
# A record never carries a private key: a field named like one means its writer leaked it.
_PRIVATE_KEY_FIELD = re.compile(r"private[_-]?key|privkey", re.IGNORECASE)


def _shown(value: object) -> str:
    """A refused value as an error message shows it: text cut to 64 characters, a number or null as
    it is, anything else only by its type (a list or an object may be 16 KiB, or hold a secret)."""
    if isinstance(value, str):
        return repr(value[:64])
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)[:32]
    return f"a {type(value).__name__}"


def check_cluster_name(name: object, field: str = "name", key: str | None = None) -> str:
    if not isinstance(name, str) or not _CLUSTER_NAME.fullmatch(name):
        raise InvalidRecord(
            field, f"{_shown(name)} is not a cluster name (lowercase letters, digits, dashes; at most 32)", key
        )
    return name


def check_node_name(name: object, field: str = "name", key: str | None = None) -> str:
    if not isinstance(name, str) or not _NODE_NAME.fullmatch(name):
        raise InvalidRecord(
            field, f"{_shown(name)} is not a node name (lowercase letters, digits, '-' and '.'; at most 63)", key
        )
    return name


def parse_endpoint(value: object, field: str = "endpoint", key: str | None = None) -> str:
    """'IP:port' (or '[IPv6]:port') -> canonical text."""
    if not isinstance(value, str):
        raise InvalidRecord(field, "must be a string IP:port", key)
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep:
        raise InvalidRecord(field, f"{value[:64]!r} is not IP:port", key)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidRecord(field, f"{host[:64]!r} is not an IP address", key) from None
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise InvalidRecord(field, f"port {port[:16]!r} is not 1-65535", key)
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidRecord(field, f"{ip} cannot be a peer's address", key)
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


def parse_network(value: object, field: str, key: str | None = None) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise InvalidRecord(field, "must be a CIDR string", key)
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise InvalidRecord(field, f"{value[:64]!r} is not a network CIDR ({e})", key) from None


def overlay_address(pod_cidr: str) -> str:
    """A node's overlay address: the first host address of its pod CIDR (x.y.z.1 of a /24)."""
    net = ipaddress.ip_network(pod_cidr)
    return str(net.network_address + 1) if net.num_addresses > 1 else str(net.network_address)


def _int(d: dict[str, Any], name: str, lo: int, hi: int, key: str | None, default: int | None = None) -> int:
    v = d.get(name, default)
    if v is None:
        raise InvalidRecord(name, "is required", key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRecord(name, f"must be an integer, not {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise InvalidRecord(name, f"{v} is outside {lo}-{hi}", key)
    return v


def _str(d: dict[str, Any], name: str, key: str | None, default: str | None = None) -> str:
    v = d.get(name, default)
    if v is None:
        raise InvalidRecord(name, "is required", key)
    if not isinstance(v, str):
        raise InvalidRecord(name, f"must be a string, not {type(v).__name__}", key)
    return v


def parse_schema(value: object, key: str | None = None) -> str:
    """A record's schema version -> canonical 'MAJOR.MINOR'; a major newer than this agent's is refused."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**4:
        major, minor = value, 0
    elif isinstance(value, str) and (m := _SCHEMA.fullmatch(value)):
        major, minor = int(m.group(1)), int(m.group(2) or 0)
    else:
        shown = repr(value)[:32] if isinstance(value, (str, int, float)) else type(value).__name__
        raise InvalidRecord(SCHEMA_FIELD, f"{shown} is not a schema version ('MAJOR.MINOR', e.g. {SCHEMA!r})", key)
    if major > SCHEMA_MAJOR:
        raise InvalidRecord(SCHEMA_FIELD, f"schema version {major}.{minor} is newer than this agent's {SCHEMA}; "
                                          "upgrade the agent", key)
    if major < 1:
        raise InvalidRecord(SCHEMA_FIELD, f"schema version {major}.{minor} does not exist (versions start at 1.0)", key)
    return f"{major}.{minor}"


def _schema_order(schema: str) -> tuple[int, int]:
    major, _, minor = schema.partition(".")
    return int(major), int(minor or 0)


def _load(raw: bytes | str, key: str | None, known: frozenset[str]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The envelope every record shares -> (known fields, schema version, unknown fields)."""
    try:
        size = len(raw.encode()) if isinstance(raw, str) else len(raw)
    except UnicodeEncodeError:  # a str holding lone surrogates: no UTF-8 text could have made it
        raise InvalidRecord("value", "not UTF-8 text", key) from None
    if size > MAX_RECORD_BYTES:
        raise InvalidRecord("value", f"{size} bytes is over the {MAX_RECORD_BYTES}-byte limit", key)
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRecord("value", f"not JSON ({e.__class__.__name__})", key) from None
    except RecursionError:
        raise InvalidRecord("value", "not JSON (nested too deeply)", key) from None
    if not isinstance(d, dict):
        raise InvalidRecord("value", "must be a JSON object", key)
    # The version first: a newer major may have changed what the known fields mean.
    schema = parse_schema(d[SCHEMA_FIELD], key) if SCHEMA_FIELD in d else SCHEMA
    extra = {k: v for k, v in d.items() if k not in known and k != SCHEMA_FIELD}
    _check_extra(extra, known, key)
    return {k: v for k, v in d.items() if k in known}, schema, extra


def _check_extra(extra: Mapping[str, Any], known: frozenset[str], key: str | None) -> None:
    for name in extra:
        if not isinstance(name, str) or name in known or name == SCHEMA_FIELD:
            raise InvalidRecord("extra", f"{str(name)[:64]!r} is a known field, not an unknown one", key)
        if _PRIVATE_KEY_FIELD.search(name):
            raise InvalidRecord(name[:64], "a record never carries a private key (its writer has leaked it)", key)


def _envelope(record: Any, known: frozenset[str]) -> None:
    """Shared constructor checks: a valid schema, and unknown fields that are really unknown.

    `extra` is copied, so the caller's dict never aliases a frozen record's."""
    object.__setattr__(record, "schema", parse_schema(record.schema))
    _check_extra(record.extra, known, None)
    object.__setattr__(record, "extra", dict(record.extra))


def _dump(known: dict[str, Any], schema: str, extra: Mapping[str, Any]) -> str:
    d = {**extra, **known}
    if schema != SCHEMA:
        d[SCHEMA_FIELD] = schema
    return json.dumps(d, sort_keys=True)


class _Versioned(Protocol):
    @property
    def schema(self) -> str: ...
    @property
    def extra(self) -> Mapping[str, Any]: ...


_R = TypeVar("_R", bound=_Versioned)


def keep_unknown(new: _R, stored: _R | None) -> _R:
    """`new` with the unknown fields (and the newer minor version) of `stored`, the version in Consul.

    For a writer that rebuilds a record it owns: what a newer agent added survives the rewrite."""
    if stored is None or (not stored.extra and stored.schema == new.schema):
        return new
    schema = max(new.schema, stored.schema, key=_schema_order)
    return replace(new, schema=schema, extra={**stored.extra, **new.extra})  # type: ignore[type-var]


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """One cluster's settings, shared by all of its agents."""

    name: str
    id: int
    pod_cidr: str
    node_prefix_len: int = 24
    service_cidr: str = "10.96.0.0/16"
    routing: str = "wireguard"
    vni: int = 1
    wg_port: int = 51820
    mtu: int = 0  # 0: derive from the underlay (WireGuard's 80 bytes off)
    # Seconds between scheduled key rotations of each node (0: never; an hour to a year).
    rotate_every: int = 0
    # Signed records (clustermesh.signed): the cluster's Ed25519 signing public key (base64; the
    # private half stays with the operator), whether unsigned records are refused, and the
    # serials of revoked node certificates.
    require_signed: bool = False
    signing_key: str = ""
    revoked: tuple[str, ...] = ()
    # The signing settings above are signed by the cluster key (clustermesh.anchor): a key being
    # rolled over to (certificates it signs are valid too), a counter that grows with each signed
    # change, and the signatures ((public key, signature) pairs; JSON: an object).
    next_signing_key: str = ""
    signing_serial: int = 0
    settings_signatures: tuple[tuple[str, str], ...] = ()
    schema: str = field(default=SCHEMA, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _envelope(self, _CONFIG_FIELDS)
        if isinstance(self.revoked, list):
            object.__setattr__(self, "revoked", tuple(self.revoked))
        if isinstance(self.settings_signatures, Mapping):
            object.__setattr__(self, "settings_signatures", tuple(sorted(self.settings_signatures.items())))
        self.validate()
        # One spelling per network ("FD00::/48" and "fd00::/48" are the same cluster range).
        object.__setattr__(self, "pod_cidr", str(ipaddress.ip_network(self.pod_cidr)))
        object.__setattr__(self, "service_cidr", str(ipaddress.ip_network(self.service_cidr)))

    def _known(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CONFIG_FIELDS}

    def validate(self, key: str | None = None) -> None:
        check_cluster_name(self.name, "name", key)
        d = self._known()
        _int(d, "id", 1, 255, key)
        pod = parse_network(self.pod_cidr, "pod_cidr", key)
        _int(d, "node_prefix_len", pod.prefixlen + 1 if pod.prefixlen < pod.max_prefixlen else pod.max_prefixlen,
             30 if pod.version == 4 else 126, key)
        svc = parse_network(self.service_cidr, "service_cidr", key)
        if svc.version == pod.version and svc.overlaps(pod):
            raise InvalidRecord("service_cidr", f"{svc} overlaps pod_cidr {pod}", key)
        if self.routing not in ROUTING_MODES:
            raise InvalidRecord("routing", f"{self.routing!r} is not one of {', '.join(ROUTING_MODES)}", key)
        if self.routing == "vxlan" and pod.version != 4:
            raise InvalidRecord("routing", "vxlan needs an IPv4 pod_cidr (its VTEPs are IPv4)", key)
        _int(d, "vni", 1, 2**24 - 1, key)
        _int(d, "wg_port", 1, 65535, key)
        if self.mtu != 0:
            _int(d, "mtu", 1280, 9000, key)
        every = _int(d, "rotate_every", -(2**63), 2**63, key)
        if every != 0 and not ROTATE_EVERY_MIN <= every <= ROTATE_EVERY_MAX:
            raise InvalidRecord("rotate_every", f"{every} is outside {ROTATE_EVERY_MIN}-{ROTATE_EVERY_MAX} "
                                                "(seconds: an hour to a year; 0: never)", key)
        self._validate_signing(key)

    def _validate_signing(self, key: str | None) -> None:
        if not isinstance(self.require_signed, bool):
            raise InvalidRecord("require_signed", f"must be true or false, not {_shown(self.require_signed)}", key)
        if not isinstance(self.signing_key, str):
            raise InvalidRecord("signing_key", f"must be a string, not {_shown(self.signing_key)}", key)
        if self.signing_key:
            _verify_key(self.signing_key, "signing_key", key)
        elif self.require_signed:
            raise InvalidRecord("require_signed", "set without a signing_key to verify records with", key)
        if not isinstance(self.revoked, tuple) or len(self.revoked) > MAX_REVOKED:
            raise InvalidRecord("revoked", f"must be a list of at most {MAX_REVOKED} certificate serials", key)
        for serial in self.revoked:
            if not isinstance(serial, str) or not _SERIAL.fullmatch(serial):
                raise InvalidRecord("revoked", f"{_shown(serial)} is not a certificate serial (32 hex digits)", key)
        if not isinstance(self.next_signing_key, str):
            raise InvalidRecord("next_signing_key", f"must be a string, not {_shown(self.next_signing_key)}", key)
        if self.next_signing_key:
            _verify_key(self.next_signing_key, "next_signing_key", key)
            if not self.signing_key:
                raise InvalidRecord("next_signing_key", "set without a signing_key to roll over from", key)
            if self.next_signing_key == self.signing_key:
                raise InvalidRecord("next_signing_key", "is the current signing_key", key)
        _int({"signing_serial": self.signing_serial}, "signing_serial", 0, 2**53, key)
        sigs = self.settings_signatures
        if not isinstance(sigs, tuple) or len(sigs) > MAX_SETTINGS_SIGNATURES:
            raise InvalidRecord("settings_signatures", f"must be an object of at most {MAX_SETTINGS_SIGNATURES} "
                                                       "signatures (public key: signature)", key)
        for pair in sigs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
                raise InvalidRecord("settings_signatures", "must map public keys to signatures (strings)", key)
            _verify_key(pair[0], "settings_signatures", key)
            if not 0 < len(pair[1]) <= 128:
                raise InvalidRecord("settings_signatures", "a signature must be 1-128 characters", key)

    @property
    def pod_network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.pod_cidr)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str | None = None) -> "ClusterConfig":
        d, schema, extra = _load(raw, key, _CONFIG_FIELDS)
        for name in ("name", "pod_cidr"):
            _str(d, name, key)
        for name in ("service_cidr", "routing", "signing_key", "next_signing_key"):
            if name in d:
                _str(d, name, key)
        if not isinstance(d.get("revoked", []), list):
            raise InvalidRecord("revoked", f"must be a list, not {_shown(d['revoked'])}", key)
        if not isinstance(d.get("settings_signatures", {}), dict):
            raise InvalidRecord("settings_signatures", f"must be an object, not {_shown(d['settings_signatures'])}",
                                key)
        for name in ("id", "node_prefix_len", "vni", "wg_port", "mtu", "rotate_every", "signing_serial"):
            if name in d:
                _int(d, name, -(2**31), 2**31, key)
        _int(d, "id", -(2**31), 2**31, key)
        try:
            return cls(**d, schema=schema, extra=extra)
        except InvalidRecord as e:
            raise InvalidRecord(e.field, e.reason, key) from None

    def to_json(self) -> str:
        known = self._known()
        for name in ("rotate_every", "require_signed", "signing_key", "revoked", "next_signing_key", "signing_serial",
                     "settings_signatures"):
            if not known[name]:
                del known[name]  # agents released before them refuse fields they do not know
        if self.revoked:
            known["revoked"] = list(self.revoked)
        if self.settings_signatures:
            known["settings_signatures"] = dict(self.settings_signatures)
        return _dump(known, self.schema, self.extra)


_CONFIG_FIELDS = frozenset(ClusterConfig.__dataclass_fields__) - {SCHEMA_FIELD, "extra"}


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What a node publishes about itself: never its private key."""

    name: str
    cluster: str
    endpoint: str
    public_key: str
    pod_cidr: str
    overlay_ip: str
    key_epoch: int = 0
    vtep_mac: str = ""
    agent_version: str = ""
    # The key this node will switch to (key rotation announces it so peers can prepare); "" if none.
    next_public_key: str = ""
    # When the node switches to next_public_key (unix milliseconds; 0: not scheduled). Peers
    # replace its key in place a moment after it (key rotation, agent.rotation).
    switch_at: int = 0
    schema: str = field(default=SCHEMA, compare=False)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # The node's certificate and its identity key's signature over the rest of the record
    # (clustermesh.signed checks both). Not compared: a record signed again is the same record.
    certificate: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    node_signature: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        _envelope(self, _NODE_FIELDS)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str | None = None) -> "NodeRecord":
        d, schema, extra = _load(raw, key, _NODE_FIELDS)
        name = check_node_name(d.get("name"), "name", key)
        cluster = check_cluster_name(d.get("cluster"), "cluster", key)
        endpoint = parse_endpoint(d.get("endpoint"), "endpoint", key)
        public_key = _public_key(d, "public_key", key)
        pod = parse_network(_str(d, "pod_cidr", key), "pod_cidr", key)
        ov = _str(d, "overlay_ip", key)
        try:
            overlay = ipaddress.ip_address(ov)
        except ValueError:
            raise InvalidRecord("overlay_ip", f"{ov[:64]!r} is not an IP address", key) from None
        if str(overlay) != overlay_address(str(pod)):
            raise InvalidRecord("overlay_ip", f"{overlay} is not the first address of pod_cidr {pod}", key)
        epoch = _int(d, "key_epoch", 0, 2**53, key, default=0)
        mac = _str(d, "vtep_mac", key, default="")
        if mac and not _MAC.fullmatch(mac):
            raise InvalidRecord("vtep_mac", f"{mac[:32]!r} is not a lowercase MAC address", key)
        version = _str(d, "agent_version", key, default="")
        if len(version) > 64:
            raise InvalidRecord("agent_version", "longer than 64 characters", key)
        next_key = _public_key(d, "next_public_key", key) if d.get("next_public_key", "") != "" else ""
        switch_at = _int(d, "switch_at", 0, 2**53, key, default=0)
        if switch_at and not next_key:
            raise InvalidRecord("switch_at", "set without a next_public_key to switch to", key)
        if next_key and next_key == public_key:
            raise InvalidRecord("next_public_key", "is the current public key", key)
        cert = d.get("certificate")
        if cert is not None and not isinstance(cert, dict):
            raise InvalidRecord("certificate", f"must be a JSON object, not {_shown(cert)}", key)
        signature = _str(d, "node_signature", key, default="")
        if len(signature) > 128:
            raise InvalidRecord("node_signature", "longer than 128 characters", key)
        return cls(name, cluster, endpoint, public_key, str(pod), str(overlay), epoch, mac, version, next_key,
                   switch_at, schema, extra, cert, signature)

    def to_json(self) -> str:
        known = {name: getattr(self, name) for name in _NODE_FIELDS}
        if not self.next_public_key:
            del known["next_public_key"]  # agents released before it refuse fields they do not know
        for name in ("switch_at", "certificate", "node_signature"):
            if not known[name]:
                del known[name]
        return _dump(known, self.schema, self.extra)

    @property
    def fingerprint(self) -> str:
        return PublicKey.from_base64(self.public_key).fingerprint


_NODE_FIELDS = frozenset(NodeRecord.__dataclass_fields__) - {SCHEMA_FIELD, "extra"}


def _verify_key(text: str, name: str, key: str | None) -> None:
    try:
        VerifyKey.from_base64(text, name)
    except KeyMaterialError as e:
        raise InvalidRecord(name, str(e).split(": ", 1)[-1], key) from None


def _public_key(d: dict[str, Any], name: str, key: str | None) -> str:
    try:
        return PublicKey.from_base64(_str(d, name, key)).base64
    except KeyMaterialError as e:
        raise InvalidRecord(name, str(e).split(": ", 1)[-1], key) from None
