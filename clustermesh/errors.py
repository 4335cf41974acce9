"""Errors of the shared-state layer (records, Consul, IPAM)."""

from __future__ import annotations

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


class ConsulError(ClusterMeshError):
    """Consul answered, but with an error (ACL denied, bad request, ...)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConsulUnavailable(ConsulError):
    """Consul could not be reached (connection refused, timeout, no leader)."""

    hint = "is Consul running? set --consul or CONSUL_HTTP_ADDR (e.g. http://127.0.0.1:8500)"


class SessionExpired(ConsulError):
    """The agent's Consul session no longer exists (TTL ran out or Consul lost it)."""


class CASConflict(ClusterMeshError):
    """A check-and-set write lost a race."""


class IPAMExhausted(ClusterMeshError):
    """Every pod CIDR of the cluster is leased."""


class ClusterNotFound(ClusterMeshError):
    """No ClusterConfig is stored for the named cluster."""

    hint = "create it with: wiremesh cluster init NAME --id N --pod-cidr CIDR"
