"""Errors of the shared-state layer (records, Consul, IPAM)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from wiremesh.errors import WiremeshError


class ClusterMeshError(WiremeshError):
    """Base of clustermesh errors."""


class InvalidRecord(ClusterMeshError):
    """A record or config failed validation. `field` names what was wrong."""

    def __init__(self, field: str, reason: str, key: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.key = key
        where = f"{key}: " if key else ""
        super().__init__(f"{where}{field}: {reason}")


class ConsulReason(StrEnum):
    """Why a Consul call failed: callers branch on this, never on the message text."""

    # Consul could not answer now; the same call may succeed later (ConsulUnavailable).
    UNREACHABLE = "unreachable"          # connection refused or reset, DNS failure
    TIMEOUT = "timeout"                  # no answer in time
    NO_LEADER = "no-leader"              # 500 "No cluster leader": servers still electing
    NO_PATH_TO_DC = "no-path-to-dc"      # 500 "No path to datacenter": WAN link down (or unknown dc)
    UNAVAILABLE = "unavailable"          # 500 rpc error, 429, 502, 503, 504
    # Consul answered and refused: the same call fails again until something changes.
    BAD_REQUEST = "bad-request"          # 400, or a 500 carrying a validation message
    ACL_DISABLED = "acl-disabled"        # 401 "ACL support disabled"
    PERMISSION_DENIED = "permission-denied"  # 403 "Permission denied" (also inside a transaction)
    ACL_NOT_FOUND = "acl-not-found"      # 403 "ACL not found": unknown token, policy or token id
    NOT_FOUND = "not-found"              # 404, 500 "Unknown check/service"
    CONFLICT = "conflict"                # 409/412: a transaction rolled back (stale check-and-set index)
    TOO_LARGE = "too-large"              # 413: value over kv_max_value_size, or too many txn ops
    SESSION_TTL = "session-ttl"          # session TTL outside the server's session_ttl_min..24h
    INVALID_SESSION = "invalid-session"  # acquire/release with a session Consul no longer has
    TLS = "tls"                          # certificate verification failed: retrying will not help
    BAD_RESPONSE = "bad-response"        # a 2xx answer this client cannot read
    OTHER = "other"                      # any other status


UNAVAILABLE_REASONS = frozenset({ConsulReason.UNREACHABLE, ConsulReason.TIMEOUT, ConsulReason.NO_LEADER,
                                 ConsulReason.NO_PATH_TO_DC, ConsulReason.UNAVAILABLE})


class ConsulError(ClusterMeshError):
    """Consul answered with an error, or could not be asked.

    `status` is the HTTP status (None when no answer came), `reason` the kind of failure: the
    fields callers test. The message is for people.
    """

    def __init__(self, message: str, status: int | None = None, reason: ConsulReason = ConsulReason.OTHER) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class ConsulUnavailable(ConsulError):
    """Consul could not answer now (unreachable, timeout, no leader, no path to a datacenter):
    keep the last good state and retry."""

    hint = "is Consul running? set --consul or CONSUL_HTTP_ADDR (e.g. http://127.0.0.1:8500)"

    def __init__(self, message: str, status: int | None = None,
                 reason: ConsulReason = ConsulReason.UNAVAILABLE) -> None:
        super().__init__(message, status, reason)


class SessionExpired(ConsulError):
    """The agent's Consul session no longer exists (TTL ran out or Consul lost it)."""

    def __init__(self, message: str, status: int | None = None,
                 reason: ConsulReason = ConsulReason.INVALID_SESSION) -> None:
        super().__init__(message, status, reason)


@dataclass(frozen=True, slots=True)
class TxnOpError:
    """One refused operation of a transaction: its position in the request and Consul's words."""

    op_index: int
    what: str


class TransactionFailed(ConsulError):
    """Consul rolled a transaction back (409): nothing of it was applied. `errors` says which
    operations failed; `reason` is PERMISSION_DENIED when an ACL refused one, else CONFLICT."""

    def __init__(self, message: str, errors: tuple[TxnOpError, ...], status: int | None = 409,
                 reason: ConsulReason = ConsulReason.CONFLICT) -> None:
        super().__init__(message, status, reason)
        self.errors = errors


class CASConflict(ClusterMeshError):
    """A check-and-set write lost a race."""


class IPAMExhausted(ClusterMeshError):
    """Every pod CIDR of the cluster is leased."""


class ClusterNotFound(ClusterMeshError):
    """No ClusterConfig is stored for the named cluster."""

    hint = "create it with: wiremesh cluster init NAME --id N --pod-cidr CIDR"
