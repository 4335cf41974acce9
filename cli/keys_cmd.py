"""`wiremesh keys`: key files, and each node's key with its rotations (`keys rotate` lives in rotate_cmd)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from wiremesh.clustermesh import Rotation, layout
from wiremesh.keys import PublicKey, load_or_generate, read_key_file

from .output import Ctx, emit, info
from .rotate_cmd import CLUSTER_OPTION, rotate, snapshot
from .target import CONFIG_OPTION, target


@click.group()
def keys() -> None:
    """WireGuard keys: key files (private keys stay in their 0600 file), and rotating nodes' keys.

    \b
    wiremesh keys rotate node2 --wait          a new key for node2, waiting for its peers to take it
    wiremesh keys rotate --all --parallel 3    every node, three at a time
    wiremesh keys status                       fingerprints, epochs, last and pending rotations
    """


keys.add_command(rotate)


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


# --- rotations' status ----------------------------------------------------------------------------


def age(then_ms: int, now_ms: int) -> str:
    """'42s ago', '3m ago', '5h ago', '12d ago'."""
    if not then_ms:
        return "at an unknown time"
    s = max(0, (now_ms - then_ms) // 1000)
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    if s < 2 * 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def _rotation_json(r: Rotation, now_ms: int) -> dict[str, Any]:
    return {"id": r.id, "state": r.state, "requested_at": r.requested_at, "updated_at": r.updated_at,
            "age_s": max(0, now_ms - (r.updated_at or r.requested_at)) // 1000, "epoch_from": r.epoch_from,
            "epoch_to": r.epoch_to, "next_fingerprint": r.next_fingerprint, "confirmed": list(r.confirmed),
            "lagging": list(r.lagging), "error": r.error}


@keys.command("status")
@CLUSTER_OPTION
@CONFIG_OPTION
@click.pass_obj
def status(ctx: Ctx, cluster_name: str | None, config_path: Path | None) -> None:
    """Per node: key fingerprint and epoch, its last rotation, one in progress, and the peers that lagged."""
    store, cluster = target(ctx, cluster_name, config_path)
    snap = snapshot(store, cluster)
    for rej in snap.rejected:
        if rej.key.startswith(layout.rotations_prefix(cluster)):
            info(f"warning: skipped invalid rotation record {rej.key}: {rej.reason}")
    now = int(time.time() * 1000)
    out: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    rotations = snap.rotations.rotations
    for node in sorted(set(snap.nodes) | set(rotations)):
        rec, rot = snap.nodes.get(node), rotations.get(node)
        last = rot if rot is not None and not rot.active else None
        pending = rot if rot is not None and rot.active else None
        next_fp = PublicKey.from_base64(rec.next_public_key).fingerprint if rec and rec.next_public_key else None
        out.append({"node": node, "live": rec is not None, "fingerprint": rec.fingerprint if rec else None,
                    "key_epoch": rec.key_epoch if rec else None, "next_fingerprint": next_fp,
                    "last_rotation": _rotation_json(last, now) if last else None,
                    "pending": _rotation_json(pending, now) if pending else None,
                    "lagging": list(last.lagging) if last else []})
        last_cell = "-"
        if last is not None:
            last_cell = f"{last.state} {age(last.updated_at or last.requested_at, now)}"
            if last.error:
                last_cell += f" ({last.error[:60]})"
        pending_cell = "-"
        if pending is not None:
            pending_cell = f"{pending.state}, asked {age(pending.requested_at, now)}"
            if pending.confirmed:
                pending_cell += f", {len(pending.confirmed)} confirmed"
            if next_fp:
                pending_cell += f", next key {next_fp}"
        rows.append([node, rec.fingerprint if rec else "(no record)", rec.key_epoch if rec else "-", last_cell,
                     pending_cell, ", ".join(last.lagging) if last and last.lagging else "-"])
    emit(ctx, {"cluster": cluster, "nodes": out},
         ["node", "key", "epoch", "last rotation", "pending", "lagging peers"], rows)
