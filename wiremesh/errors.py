"""The root of wiremesh's error family.

Every error wiremesh raises on purpose descends from `WiremeshError`; each package subclasses
it in its own `errors` module. The CLI prints these as one line (with `hint`, if set).
"""

from __future__ import annotations


class WiremeshError(Exception):
    """Base of every error wiremesh raises on purpose; the CLI prints these as one line."""

    hint: str | None = None
