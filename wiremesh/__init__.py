"""wiremesh: an encrypted WireGuard overlay mesh for Linux hosts, coordinated through Consul.

The source folders stay at the top of the repository (agent/, tunnels/, keys/, clustermesh/,
lab/); this package reaches them through symlinks, so that users, tests and benchmarks import
`wiremesh.agent`, `wiremesh.tunnels`, ... and nothing generic lands at the top of site-packages.
"""

from .errors import WiremeshError

__version__ = "0.1.0"

__all__ = ["WiremeshError", "__version__"]
