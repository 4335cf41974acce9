"""`wiremesh cluster signing-key`, `require-signed` and `roll-signing-key`: a cluster's signing settings.

Every change to them is signed by the cluster's signing key (agents that pinned it refuse any
other): the key file is needed for each."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from wiremesh.clustermesh import (ConsulStore, EnrollError, InvalidRecord, KVItem, Rotation, announce,
                                  attach_signing_key, cluster_signers, commit, default_signing_key_path, layout,
                                  load_cluster_config, next_key_path, parse_cluster, promote_key_files, update_config)
from wiremesh.keys import load_or_generate_signing_key, read_signing_key

from .output import Ctx, emit, info


def _active(items: dict[str, KVItem], key: str) -> bool:
    try:
        return Rotation.from_json(items[key].value).active
    except InvalidRecord:
        return True


@click.command("signing-key")
@click.argument("name")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The signing key file [default: ~/.config/wiremesh/signing/NAME.key].")
@click.option("--create", is_flag=True, help="Create the key file (0600) if it does not exist.")
@click.option("--force", is_flag=True, help="Replace another signing key the cluster has (its certificates stop verifying).")
@click.pass_obj
def signing_key(ctx: Ctx, name: str, key_path: Path | None, create: bool, force: bool) -> None:
    """Give cluster NAME a signing key: the private key stays in its file, the public one goes to Consul.

    Records are not required to be signed until `wiremesh cluster require-signed NAME`."""
    path = key_path or default_signing_key_path(name)
    if create:
        key, created = load_or_generate_signing_key(path)
        info(f"{'created' if created else 'kept existing'} signing key {path}")
    else:
        key = read_signing_key(path)
    changed = attach_signing_key(ConsulStore(ctx.consul), name, key, force=force)
    pub = key.public_key()
    info(f"cluster {name}: signing key {pub.fingerprint} {'stored' if changed else 'unchanged'}")
    emit(ctx, {"cluster": name, "signing_key": pub.base64, "fingerprint": pub.fingerprint, "path": str(path),
               "changed": changed}, ["cluster", "signing key", "fingerprint"], [[name, pub.base64, pub.fingerprint]])


@click.command("require-signed")
@click.argument("name")
@click.option("--off", is_flag=True, help="Accept unsigned records again.")
@click.option("--force", is_flag=True, help="Require signatures even though some live records would be refused.")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The signing key file, which signs the change [default: ~/.config/wiremesh/signing/NAME.key].")
@click.pass_obj
def require_signed(ctx: Ctx, name: str, off: bool, force: bool, key_path: Path | None) -> None:
    """Refuse unsigned records in cluster NAME (or, with --off, accept them again).

    Before it turns on, every live node record and lease is checked as a cluster requiring
    signatures would: if any would be refused, nothing changes (unless --force) and they are
    listed. The step that ends a migration from unsigned records: enroll every node, restart
    its agent (its records are then signed), then this."""
    store = ConsulStore(ctx.consul)
    config = load_cluster_config(store, name)
    refused: list[dict[str, str]] = []
    if not off:
        if not config.signing_key:
            raise EnrollError("NAME", f"cluster {name!r} has no signing key",
                              f"first: wiremesh cluster signing-key {name} --create")
        index, items = store.list(layout.cluster_prefix(name))
        trial = dataclasses.replace(config, require_signed=True)
        items = {k: v for k, v in items.items() if k != layout.config_key(name)}
        snap = parse_cluster(name, index, items, last_config=trial, now=time.time())
        # Node records, leases, service definitions (clustermesh.control: `wiremesh service sign`),
        # and rotations under way; an ended rotation's unsigned record is history (agents skip it).
        live = (layout.nodes_prefix(name), layout.ipam_prefix(name), layout.services_prefix(name))
        refused = [{"key": r.key, "reason": r.reason} for r in snap.rejected
                   if r.key.startswith(live) or r.key.startswith(layout.rotations_prefix(name)) and _active(items, r.key)]
        for r in refused:
            info(f"  would be refused: {r['key']}: {r['reason']}")
        if refused and not force:
            raise EnrollError("NAME", f"{len(refused)} live record(s) or lease(s) of cluster {name!r} are not "
                              "validly signed; nothing changed",
                              "enroll those nodes and restart their agents, sign the services "
                              f"(wiremesh service sign --all --cluster {name}), or pass --force")
    signers = cluster_signers(config, key_path or default_signing_key_path(name)) if config.signing_key else []
    new, changed = update_config(store, name, lambda c: dataclasses.replace(c, require_signed=not off), signers)
    info(f"cluster {name}: require_signed {'on' if new.require_signed else 'off'}"
         f"{'' if changed else ' (unchanged)'}")
    emit(ctx, {"cluster": name, "require_signed": new.require_signed, "changed": changed, "refused": refused},
         ["cluster", "require signed", "changed"], [[name, new.require_signed, changed]])


@click.command("roll-signing-key")
@click.argument("name")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The current signing key file [default: ~/.config/wiremesh/signing/NAME.key].")
@click.option("--new", "new_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The new signing key file, created (0600) if absent [default: NAME.next.key beside --key].")
@click.option("--commit", "do_commit", is_flag=True,
              help="Make the announced key the cluster's signing key (after every node was enrolled with it).")
@click.option("--force", is_flag=True, help="Commit even though some live records still carry old certificates "
                                           "(those nodes are cut) or a rotation is under way (it stalls).")
@click.pass_obj
def roll_signing_key(ctx: Ctx, name: str, key_path: Path | None, new_path: Path | None, do_commit: bool,
                     force: bool) -> None:
    """Roll cluster NAME's signing key over to a new one, without downtime.

    \b
    1. wiremesh cluster roll-signing-key NAME            (announce: both keys' certificates valid)
    2. wiremesh node enroll NODE --cluster NAME ...      (each node again: its certificate by the new key)
    3. wiremesh cluster roll-signing-key NAME --commit   (the new key is the cluster's)

    The commit signs the service definitions again with the new key and deletes finished
    rotation records only the old key vouches for; it waits for no rotation: one under way
    makes it refuse (run it again when the rotation ended).
    """
    store = ConsulStore(ctx.consul)
    path = key_path or default_signing_key_path(name)
    current = read_signing_key(path)
    nxt = new_path or next_key_path(path)
    if do_commit:
        new = read_signing_key(nxt)
        done = commit(store, name, current, new, time.time(), force=force)
        cfg, changed = done.config, done.changed
        if changed and new_path is None:
            promote_key_files(path)
            info(f"{path} now holds the new key (the old one is kept beside it)")
        for key in done.resigned:
            info(f"service {key.rsplit('/', 1)[1]}: signed with the new key")
        if done.dropped:
            info(f"{len(done.dropped)} finished rotation record(s) vouched for by the old key only deleted")
        info(f"cluster {name}: signing key {new.public_key().fingerprint} "
             f"{'committed' if changed else 'already committed'}"
             + (f"; {len(done.cut)} record(s) with old certificates cut" if done.cut else ""))
    else:
        new, created = load_or_generate_signing_key(nxt)
        cfg, changed = announce(store, name, current, new)
        info(f"{'created' if created else 'using'} new signing key {nxt}")
        info(f"cluster {name}: next signing key {new.public_key().fingerprint} {'announced' if changed else 'unchanged'}"
             f"; now enroll every node again, then: wiremesh cluster roll-signing-key {name} --commit")
    extra = {"services_signed": [k.rsplit("/", 1)[1] for k in done.resigned],
             "rotations_deleted": [k.rsplit("/", 1)[1] for k in done.dropped], "cut": done.cut} if do_commit else {}
    emit(ctx, {"cluster": name, "signing_key": cfg.signing_key, "next_signing_key": cfg.next_signing_key,
               "signing_serial": cfg.signing_serial, "changed": changed, **extra},
         ["cluster", "signing key", "next signing key", "serial"],
         [[name, cfg.signing_key, cfg.next_signing_key or "-", cfg.signing_serial]])
