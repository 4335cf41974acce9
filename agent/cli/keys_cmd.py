"""`wiremesh keys`: key files and their public halves."""

from __future__ import annotations

from pathlib import Path

import click

from wiremesh.keys import load_or_generate, read_key_file

from .output import Ctx, emit, info


@click.group()
def keys() -> None:
    """WireGuard key files (private keys stay in their 0600 file)."""


@keys.command("generate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def generate(ctx: Ctx, path: Path) -> None:
    """Create a key file at PATH (mode 0600) unless one exists; print its public key."""
    key, created = load_or_generate(path)
    info(f"{'created' if created else 'kept existing'} {path}")
    pub = key.public_key()
    emit(ctx, {"path": str(path), "public_key": pub.base64, "fingerprint": pub.fingerprint, "created": created},
         ["public key", "fingerprint"], [[pub.base64, pub.fingerprint]])


@keys.command("public")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def public(ctx: Ctx, path: Path) -> None:
    """Print the public key of the key file at PATH."""
    pub = read_key_file(path).public_key()
    emit(ctx, {"public_key": pub.base64, "fingerprint": pub.fingerprint}, ["public key", "fingerprint"],
         [[pub.base64, pub.fingerprint]])
