"""The operator's signing key for the commands that write control inputs (`service create|sign`,
`keys rotate`): they sign what they write when the operator has the cluster's key at hand.

A cluster that requires signed records refuses unsigned service definitions and rotation
requests (clustermesh.control), so there the key must be at hand and be the cluster's; in a
cluster that does not, a key that is there and is the cluster's signs anyway (ready for the day
signatures are required), and none is needed.
"""

from __future__ import annotations

from pathlib import Path

import click

from wiremesh.clustermesh import ClusterConfig, EnrollError, default_signing_key_path
from wiremesh.keys import SigningKey, VerifyKey, read_signing_key

from .output import info

SIGNING_KEY_OPTION = click.option(
    "--signing-key", "signing_key_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    envvar="WIREMESH_SIGNING_KEY",
    help="The cluster's signing key file, to sign what this writes [default: ~/.config/wiremesh/signing/"
         "CLUSTER.key if it exists; env: WIREMESH_SIGNING_KEY].")


def operator_key(config: ClusterConfig | None, path: Path | None, what: str) -> SigningKey | None:
    """The key to sign `what` with for `config`'s cluster, or None to write it unsigned; EnrollError
    (one line and a hint) where the cluster requires a signature this cannot make."""
    if config is None:
        return None
    given = path is not None
    path = path or default_signing_key_path(config.name)
    required = config.require_signed
    if not given and not path.exists():
        if required:
            raise EnrollError("--signing-key", f"cluster {config.name!r} requires {what} signed by its signing key, "
                              f"and there is none at {path}",
                              "give the cluster's signing key file: --signing-key FILE (or WIREMESH_SIGNING_KEY)")
        return None
    key = read_signing_key(path)
    theirs = config.signing_key
    if theirs != key.public_key().base64:
        why = (f"{path} is not the signing key of cluster {config.name!r} (that is "
               f"{VerifyKey.from_base64(theirs).fingerprint}, this is {key.public_key().fingerprint})" if theirs else
               f"cluster {config.name!r} has no signing key")
        if required or given and theirs:
            raise EnrollError("--signing-key", why)
        info(f"warning: {why}; {what} written unsigned")
        return None
    return key
