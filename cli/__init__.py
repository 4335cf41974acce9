"""The wiremesh CLI: one module per command group."""

from .main import cli, main

__all__ = ["cli", "main"]
