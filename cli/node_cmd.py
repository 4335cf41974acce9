"""`wiremesh node`: enroll nodes in a signed cluster (certificates), revoke them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from wiremesh.clustermesh import (DEFAULT_VALIDITY_S, ConsulStore, cluster_signers, default_signing_key_path, enroll,
                                  load_cluster_config, next_key_path, node_serials, revocation_list, revoke)
from wiremesh.keys import SigningKey, VerifyKey, load_or_generate_signing_key, read_signing_key

from .cluster import _duration

CLUSTER_PUB = "cluster.pub"  # beside node.crt: where the agent looks for its cluster's signing key
from .output import Ctx, emit, info


@click.group()
def node() -> None:
    """Node certificates of signed clusters: a node signs its records with an identity key that
    the cluster's signing key certified (its name, cluster and pod CIDR).

    \b
    wiremesh node enroll node1 --cluster prod --identity-key /var/lib/wiremesh/identity.key \\
        --cert-out /var/lib/wiremesh/node.crt
    wiremesh node revoke --cluster prod --node node1
    wiremesh node revoked --cluster prod --prune
    """


@node.command("enroll")
@click.argument("node_name", metavar="NODE")
@click.option("--cluster", "cluster_name", required=True, help="The node's cluster.")
@click.option("--signing-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The cluster's signing key file [default: ~/.config/wiremesh/signing/CLUSTER.key].")
@click.option("--identity-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The node's identity key file (created 0600 if absent): when enrolling on the node.")
@click.option("--identity-public", default=None, metavar="BASE64",
              help="The node's identity public key, when its key file stays on the node.")
@click.option("--cidr", default=None, help="The node's pod CIDR [default: the one it holds, else the lowest free].")
@click.option("--valid-for", callback=_duration, default=str(DEFAULT_VALIDITY_S), show_default="365d",
              metavar="DURATION", help="How long the certificate is valid, e.g. 90d, 12h.")
@click.option("--cert-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the certificate here (the agent's certificate_file) instead of to stdout.")
@click.pass_obj
def enroll_cmd(ctx: Ctx, node_name: str, cluster_name: str, signing_key: Path | None, identity_key: Path | None,
               identity_public: str | None, cidr: str | None, valid_for: int, cert_out: Path | None) -> None:
    """Certify NODE for cluster --cluster: its identity key and one pod CIDR, reserved in IPAM."""
    if (identity_key is None) == (identity_public is None):
        raise click.UsageError("give the node's identity as --identity-key FILE or --identity-public BASE64")
    ca_path = signing_key or default_signing_key_path(cluster_name)
    if signing_key is None and next_key_path(ca_path).exists():
        ca_path = next_key_path(ca_path)  # a roll-over under way: certificates of the new key outlive it
    ca = read_signing_key(ca_path)
    private: SigningKey | None = None
    if identity_key is not None:
        private, created = load_or_generate_signing_key(identity_key)
        if created:
            info(f"created identity key {identity_key}")
        public = private.public_key()
    else:
        try:
            public = VerifyKey.from_base64(identity_public, "--identity-public")
        except Exception as e:  # noqa: BLE001 - KeyMaterialError or CertificateError
            raise click.BadParameter(str(e).split(": ", 1)[-1], param_hint="--identity-public") from None
    done = enroll(ConsulStore(ctx.consul), cluster_name, node_name, ca, public, time.time(), cidr, valid_for, private)
    cert = done.certificate
    text = json.dumps(cert.to_dict(), indent=1, sort_keys=True) + "\n"
    if cert_out is not None:
        for path, content in ((cert_out, text), (cert_out.with_name(CLUSTER_PUB), done.cluster_key + "\n")):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(content)
            tmp.replace(path)
        info(f"wrote {cert_out} and {cert_out.with_name(CLUSTER_PUB)} (the cluster signing key the agent pins)")
    info(f"enrolled {cluster_name}/{node_name}: pod CIDR {cert.pod_cidr} ({done.lease or 'not leased'}), "
         f"serial {cert.serial}, valid until {time.strftime('%Y-%m-%d %H:%M', time.localtime(cert.not_after))}")
    if ctx.json:
        emit(ctx, {"cluster": cluster_name, "node": node_name, "pod_cidr": cert.pod_cidr, "serial": cert.serial,
                   "not_after": cert.not_after, "lease": done.lease, "certificate": cert.to_dict(),
                   "cluster_signing_key": done.cluster_key,
                   "path": str(cert_out) if cert_out else None})
    elif cert_out is None:
        click.echo(text, nl=False)


@node.command("revoke")
@click.argument("serials", nargs=-1, metavar="[SERIAL]...")
@click.option("--cluster", "cluster_name", required=True, help="The cluster.")
@click.option("--node", "node_name", default=None, help="Revoke the certificates NODE's record and lease carry.")
@click.option("--not-after", type=click.IntRange(0, 2**40), default=None, metavar="UNIX_SECONDS",
              help="When the SERIALs' certificates expire, for those no live record or lease carries "
                   "[default: 10 years from now, the longest a certificate lasts].")
@click.option("--signing-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The cluster's signing key file, which signs a change of its config "
                   "[default: ~/.config/wiremesh/signing/CLUSTER.key].")
@click.pass_obj
def revoke_cmd(ctx: Ctx, serials: tuple[str, ...], cluster_name: str, node_name: str | None,
               not_after: int | None, signing_key: Path | None) -> None:
    """Add certificate serials to the cluster's revocation list: their records and leases are refused.

    Each serial stays listed until a day after its certificate expires; serials past that are
    pruned on every revocation (or with `wiremesh node revoked --prune`)."""
    store = ConsulStore(ctx.consul)
    wanted = list(serials)
    if node_name:
        found = node_serials(store, cluster_name, node_name)
        if not found:
            raise click.UsageError(f"node {node_name!r} has no signed record or lease in cluster {cluster_name!r}; "
                                   "give its certificate's SERIAL")
        wanted += [s for s in found if s not in wanted]
    if not wanted:
        raise click.UsageError("give SERIAL(s) or --node NODE")
    config = load_cluster_config(store, cluster_name)
    signers = cluster_signers(config, signing_key or default_signing_key_path(cluster_name)) if config.signing_key else []
    done = revoke(store, cluster_name, wanted, not_after=not_after, sign=signers)
    fresh = set(done.added) | set(done.migrated)
    info(f"cluster {cluster_name}: " + "; ".join(
        part for part in (f"revoked {', '.join(s for s in wanted if s in fresh)}" if fresh & set(wanted) else "",
                          f"already revoked {', '.join(s for s in wanted if s not in fresh)}"
                          if set(wanted) - fresh else "",
                          f"pruned {len(done.pruned)} expired" if done.pruned else "",
                          f"moved {len(done.migrated)} from the config's list" if done.migrated else "") if part)
         + f" ({len(done.revocations)} listed)")
    emit(ctx, {"cluster": cluster_name, "serials": wanted, "added": done.added, "pruned": done.pruned,
               "migrated": done.migrated, "listed": len(done.revocations), "changed": done.changed},
         ["serial", "not after"], [[s, _when(done.revocations.entries.get(s))] for s in wanted])


@node.command("revoked")
@click.option("--cluster", "cluster_name", required=True, help="The cluster.")
@click.option("--prune", is_flag=True, help="First drop the serials whose certificates expired over a day ago.")
@click.pass_obj
def revoked_cmd(ctx: Ctx, cluster_name: str, prune: bool) -> None:
    """List the cluster's revoked certificate serials, each with its certificate's expiry."""
    store = ConsulStore(ctx.consul)
    if prune:
        done = revoke(store, cluster_name, [])
        info(f"cluster {cluster_name}: pruned {len(done.pruned)} expired serial(s)"
             + (f", moved {len(done.migrated)} from the config's list" if done.migrated else ""))
    listed, legacy = revocation_list(store, cluster_name)
    rows = sorted(listed.entries.items(), key=lambda kv: (kv[1], kv[0]))
    info(f"cluster {cluster_name}: {len(listed)} revoked serial(s)"
         + (f", and {len(legacy)} in the config's own list" if legacy else ""))
    emit(ctx, {"cluster": cluster_name, "revoked": [{"serial": s, "not_after": na} for s, na in rows],
               "config_revoked": list(legacy)},
         ["serial", "not after"], [[s, _when(na)] for s, na in rows] + [[s, "(config)"] for s in legacy])


def _when(not_after: int | None) -> str:
    return "" if not_after is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(not_after)) + "Z"
