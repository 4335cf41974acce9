"""The wiremesh node agent and CLI."""

__version__ = "0.1.0"
