"""wiremesh: an encrypted WireGuard overlay mesh for Linux hosts, coordinated through Consul.

The source folders stay at the top of the repository (agent/, tunnels/, keys/, clustermesh/,
lab/, cli/, cni/); pyproject.toml maps each to its one import name (`wiremesh.agent`, ...), so
nothing generic lands at the top of site-packages and no module has a second name.
"""

from .errors import WiremeshError

__version__ = "0.1.0"

__all__ = ["WiremeshError", "__version__"]
