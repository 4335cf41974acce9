"""The wiremesh CNI plugin and the node-local state it shares with the agent."""

from .state import Attachment, CniState, NodeInfo

__all__ = ["Attachment", "CniState", "NodeInfo"]
