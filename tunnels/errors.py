"""Errors of the kernel-facing layer."""

from __future__ import annotations

import errno as _errno

from wiremesh.errors import WiremeshError


class TunnelError(WiremeshError):
    """A device, peer or route operation failed. `errno` is kept when the kernel gave one."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class KernelUnsupported(TunnelError):
    """The running kernel (or this machine) lacks what a backend needs."""


class DeviceNotFound(TunnelError):
    """The WireGuard device does not exist (or its UAPI socket is gone)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.ENODEV)


class UAPIError(TunnelError):
    """wireguard-go answered a UAPI request with a non-zero errno."""
