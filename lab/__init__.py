"""A whole wiremesh mesh on one host, in network namespaces, with real Consul and real agents."""

from .errors import LabError, LabExists, LabNotFound
from .lab import HUB_IP, LAB_ROOT, Lab, Node, list_labs

__all__ = ["HUB_IP", "LAB_ROOT", "Lab", "LabError", "LabExists", "LabNotFound", "Node", "list_labs"]
