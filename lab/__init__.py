"""A whole wiremesh mesh on one host, in network namespaces, with real Consul and real agents."""

from . import services
from .errors import LabError, LabExists, LabNotFound
from .lab import HUB_IP, LAB_ROOT, Lab, Node, list_labs
from .topology import DEFAULT_TOPOLOGY, load_topology

__all__ = ["DEFAULT_TOPOLOGY", "HUB_IP", "LAB_ROOT", "Lab", "LabError", "LabExists", "LabNotFound", "Node", "list_labs",
           "load_topology", "services"]
