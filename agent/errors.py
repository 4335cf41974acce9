"""Errors of the agent and the CLI."""

from __future__ import annotations

from wiremesh.errors import WiremeshError


class AgentError(WiremeshError):
    """Base of agent errors."""


class ConfigError(AgentError):
    """agent.toml (or a CLI option) is invalid; the message names the field."""

    def __init__(self, source: str, field: str, reason: str, hint: str | None = None) -> None:
        self.source = source
        self.field = field
        self.reason = reason
        self.hint = hint
        super().__init__(f"{source}: {field}: {reason}")
