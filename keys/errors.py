"""Errors of key material."""

from __future__ import annotations

from wiremesh.errors import WiremeshError


class KeyMaterialError(WiremeshError):
    """A key is malformed, or a key file cannot be read or written safely.

    Messages name the file or the field, never the key's bytes.
    """
