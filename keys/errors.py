"""The root of wiremesh's error family, and the errors of key material.

`WiremeshError` lives here because `keys` is the one package every other package may
import (DESIGN.md's import graph); each package subclasses it in its own `errors` module.
"""

from __future__ import annotations


class WiremeshError(Exception):
    """Base of every error wiremesh raises on purpose; the CLI prints these as one line."""

    hint: str | None = None


class KeyMaterialError(WiremeshError):
    """A key is malformed, or a key file cannot be read or written safely.

    Messages name the file or the field, never the key's bytes.
    """
