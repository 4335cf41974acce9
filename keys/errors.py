"""Errors of key material."""

from __future__ import annotations

from wiremesh.errors import WiremeshError


class KeyMaterialError(WiremeshError):
    """A key is malformed, or a key file cannot be read or written safely.

    Messages name the file or the field, never the key's bytes.
    """


class CertificateError(KeyMaterialError):
    """A node certificate or a signature is malformed, forged, expired or revoked.

    `field` names what was wrong (a certificate's field, or "signature"); `reason` says why.
    Messages never show a private key.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")
