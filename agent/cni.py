"""Transitional: the CNI's node-local state moved to wiremesh.tunnels (podstate.py).

daemon.py still imports `CniState` from here; once it imports it from `wiremesh.tunnels`, this
module goes.
"""

from wiremesh.tunnels import CniState

__all__ = ["CniState"]
