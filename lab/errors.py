"""Errors of the lab."""

from wiremesh.errors import WiremeshError


class LabError(WiremeshError):
    """A lab operation failed; the message says which step."""


class LabExists(LabError):
    hint = "run 'wiremesh lab down' first, or pick another --name"


class LabNotFound(LabError):
    hint = "start one with 'wiremesh lab up'"
