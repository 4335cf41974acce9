"""Errors of the lab."""

from wiremesh.errors import WiremeshError


class LabError(WiremeshError):
    """A lab operation failed; the message says which step."""


class LabExists(LabError):
    hint = "run 'wiremesh lab down' first, or pick another --name"


class LabNotFound(LabError):
    hint = "start one with 'wiremesh lab up'"


class ProcessesSurvived(LabError):
    """Processes the lab stopped were still running after SIGKILL (stuck in the kernel, say)."""

    hint = "see them with 'ps -o pid,stat,wchan:30,cmd -p PID'; run 'wiremesh lab down' again once they are gone"

    def __init__(self, message: str, pids: list[int]) -> None:
        super().__init__(message)
        self.pids = pids
