"""The cluster's signing settings, signed by the cluster key an agent has pinned (its trust anchor).

`signing_key`, `next_signing_key`, `require_signed` and `revoked` decide which records an
agent accepts, so whoever could rewrite them in Consul could turn signing off. An agent that
knows its cluster's signing key from its own config or enrollment (`Anchor`) accepts a change
to them only when that key signed it (`settings_signatures`, over `settings_doc` under
SETTINGS_DOMAIN) with a `signing_serial` not older than the last it accepted; anything else is
refused and the last accepted settings stay (`apply_settings`). The other fields of the config
(MTU, rotation period, ...) are not signed and follow Consul as before.

Roll-over of the cluster key, without downtime (README "Rolling the cluster signing key"):
1. announce: `next_signing_key` = the new key, signed by the current and the new key;
   certificates of either key are valid;
2. enroll every node again with the new key (its agent takes the new certificate live);
3. commit: `signing_key` = the new key, signed by both; an agent whose anchor signed it moves
   its anchor to the new key (and remembers that in its state dir).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wiremesh.keys import SETTINGS_DOMAIN, CertificateError, SigningKey, VerifyKey, canonical

from .errors import InvalidRecord
from .records import ClusterConfig

SIGNATURES_FIELD = "settings_signatures"


def settings_doc(cfg: ClusterConfig) -> dict[str, Any]:
    """What the cluster key signs: the cluster's name and every signing setting."""
    return {"cluster": cfg.name, "signing_key": cfg.signing_key, "next_signing_key": cfg.next_signing_key,
            "require_signed": cfg.require_signed, "revoked": sorted(cfg.revoked), "signing_serial": cfg.signing_serial}


def settings_digest(cfg: ClusterConfig) -> str:
    return hashlib.sha256(canonical(settings_doc(cfg))).hexdigest()


def sign_settings(cfg: ClusterConfig, keys: Sequence[SigningKey], bump: bool = True) -> ClusterConfig:
    """`cfg` with its signing settings signed by `keys` (and, with `bump`, a serial one higher)."""
    if bump:
        cfg = dataclasses.replace(cfg, signing_serial=cfg.signing_serial + 1)
    doc = settings_doc(cfg)
    sigs = {k.public_key().base64: k.sign(SETTINGS_DOMAIN, doc) for k in keys}
    return dataclasses.replace(cfg, settings_signatures=tuple(sorted(sigs.items())))


def signed_by(cfg: ClusterConfig, key: str) -> bool:
    """Whether `key` (base64) signed `cfg`'s signing settings."""
    sig = dict(cfg.settings_signatures).get(key)
    if sig is None:
        return False
    try:
        VerifyKey.from_base64(key, "signing key").verify(SETTINGS_DOMAIN, settings_doc(cfg), sig)
    except CertificateError:
        return False
    return True


def with_settings(cfg: ClusterConfig, settings: ClusterConfig) -> ClusterConfig:
    """`cfg` with the signing settings of `settings`."""
    return dataclasses.replace(cfg, signing_key=settings.signing_key, next_signing_key=settings.next_signing_key,
                               require_signed=settings.require_signed, revoked=settings.revoked,
                               signing_serial=settings.signing_serial,
                               settings_signatures=settings.settings_signatures)


@dataclass(frozen=True, slots=True)
class Anchor:
    """The cluster signing key an agent trusts now, and the last signing settings it accepted.

    `pinned` is the key its config or enrollment named (the anchor moves on from it only through
    signed roll-overs); `serial` and `digest` are those of the settings accepted last
    (`settings`, None until the first), so an older signed config written back is refused."""

    cluster: str
    key: str
    pinned: str
    serial: int = 0
    digest: str = ""
    settings: ClusterConfig | None = None

    @property
    def fingerprint(self) -> str:
        return VerifyKey.from_base64(self.key, "signing key").fingerprint

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "key": self.key, "pinned": self.pinned, "serial": self.serial,
                "digest": self.digest,
                "settings": json.loads(self.settings.to_json()) if self.settings is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Anchor":
        """Raise InvalidRecord, KeyError, TypeError or ValueError if `d` is not an anchor."""
        settings = d.get("settings")
        anchor = cls(str(d["cluster"]), str(d["key"]), str(d["pinned"]), int(d["serial"]), str(d.get("digest", "")),
                     ClusterConfig.from_json(json.dumps(settings)) if settings is not None else None)
        for k in (anchor.key, anchor.pinned):
            VerifyKey.from_base64(k, "signing key")
        return anchor

    def strict(self, cfg: ClusterConfig) -> ClusterConfig:
        """`cfg` with the settings this anchor stands for until signed ones come: the last accepted,
        else its key required for every record (and the revocations `cfg` lists, signed or not: a
        cluster signed before its settings were, keeps refusing what it revoked)."""
        if self.settings is not None:
            return with_settings(cfg, self.settings)
        return dataclasses.replace(cfg, signing_key=self.key, next_signing_key="", require_signed=True,
                                   signing_serial=self.serial, settings_signatures=())


def resolve_anchor(cluster: str, pinned: str, saved: Anchor | None) -> Anchor:
    """The anchor an agent starts with: its saved one if that grew from the same pinned key;
    else the pinned key (re-pinned by the operator), keeping the highest serial seen."""
    if saved is not None and saved.cluster == cluster and saved.pinned == pinned:
        return saved
    if saved is not None and saved.cluster == cluster:
        return Anchor(cluster, pinned, pinned, saved.serial, saved.digest, saved.settings)
    return Anchor(cluster, pinned, pinned)


def accept_settings(cfg: ClusterConfig, anchor: Anchor, key: str | None = None) -> Anchor:
    """The anchor after `cfg`'s signing settings were accepted; InvalidRecord if they are refused."""
    if not cfg.settings_signatures:
        raise InvalidRecord(SIGNATURES_FIELD, f"missing: the signing settings are not signed by the cluster key "
                                              f"{anchor.fingerprint} this agent trusts", key)
    if anchor.key not in dict(cfg.settings_signatures):
        raise InvalidRecord(SIGNATURES_FIELD, f"not signed by the cluster key {anchor.fingerprint} this agent "
                                              "trusts", key)
    if not signed_by(cfg, anchor.key):
        raise InvalidRecord(SIGNATURES_FIELD, f"forged: does not verify with the cluster key {anchor.fingerprint}",
                            key)
    digest = settings_digest(cfg)
    if cfg.signing_serial < anchor.serial:
        raise InvalidRecord("signing_serial", f"{cfg.signing_serial} is older than the {anchor.serial} this agent "
                                              "accepted (an old config written back)", key)
    if cfg.signing_serial == anchor.serial and anchor.digest and digest != anchor.digest:
        raise InvalidRecord("signing_serial", f"{cfg.signing_serial} is the serial of other signing settings than "
                                              "these (a signed change must raise it)", key)
    # The anchor signed a config whose key is another: the commit of a roll-over, it moves on.
    moved = cfg.signing_key and anchor.key not in (cfg.signing_key, cfg.next_signing_key)
    return Anchor(anchor.cluster, cfg.signing_key if moved else anchor.key, anchor.pinned, cfg.signing_serial, digest,
                  cfg)


def apply_settings(cfg: ClusterConfig, anchor: Anchor | None, key: str | None = None
                   ) -> tuple[ClusterConfig, Anchor | None, InvalidRecord | None]:
    """`cfg` as an agent with `anchor` takes it: (config, anchor after it, why its signing
    settings were refused or None). Refused settings leave the anchor's last accepted ones in
    the config (or, before any, its key required); without an anchor, `cfg` as it is."""
    if anchor is None:
        return cfg, None, None
    try:
        new = accept_settings(cfg, anchor, key)
    except InvalidRecord as e:
        return anchor.strict(cfg), anchor, e
    return cfg, new, None
