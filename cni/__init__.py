"""The wiremesh CNI plugin (`wiremesh-cni`); its node-local state lives in wiremesh.tunnels (podstate)."""

from .plugin import main

__all__ = ["main"]
