"""`wiremesh setup`: the multi-cluster setup wizard (interactive, or --answers FILE --yes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from wiremesh.clustermesh import ConsulStore, InvalidToken, check_token, wizard

from .output import Ctx, emit, info


def _ask(prompt: str, check: Any, default: Any = None, type: Any = str, hide_input: bool = False) -> Any:  # noqa: A002
    """Prompt until `check(value)` accepts; a refusal prints its reason and hint, then asks again."""
    while True:
        value = click.prompt(prompt, default=default, type=type, hide_input=hide_input, err=True,
                             show_default=default not in (None, ""))
        try:
            return check(value)
        except wizard.SetupError as e:
            info(f"  refused: {e.reason}" + (f" ({e.hint})" if e.hint else ""))


def _typed_token(value: str) -> str:
    if value:
        try:
            check_token(value, "the token typed")
        except InvalidToken as e:
            raise wizard.SetupError(e.source, e.reason, e.hint) from None
    return value


def _underlay_mtu() -> int | None:
    try:
        from wiremesh.tunnels import link_mtu

        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            f = line.split()
            if f[1] == "00000000":
                return link_mtu(f[0])
    except Exception:  # noqa: BLE001 - only a hint for the prompt
        return None
    return None


def interview(ctx: Ctx) -> list[wizard.ClusterAnswer]:
    info("wiremesh setup: connect clusters (one Consul datacenter each) into one mesh.\n")
    count = click.prompt("How many clusters", type=click.IntRange(1, 32), default=2, err=True)
    answers: list[wizard.ClusterAnswer] = []
    taken: dict[int, str] = {}
    taken_cidrs: list[str] = []
    mtu = _underlay_mtu()
    for i in range(count):
        info(f"\nCluster {i + 1} of {count}")
        default_consul = ctx.consul.address if i == 0 else None
        while True:
            address = click.prompt("  Consul HTTP address", default=default_consul, err=True)
            token = _ask("  Consul ACL token (empty: none)", _typed_token, default="", hide_input=True) \
                or ctx.consul.token
            a = wizard.ClusterAnswer(consul=address, name="x", id=1, pod_cidr="10.0.0.0/8", token=token,
                                     ca_file=ctx.consul.ca_file)
            try:
                facts = wizard.probe(a, f"clusters[{i}]")
                break
            except wizard.SetupError as e:
                info(f"  refused: {e.reason}" + (f" ({e.hint})" if e.hint else ""))
        info(f"  reached: datacenter {facts.datacenter!r}, WAN-federated with {', '.join(facts.datacenters)}")
        for m in facts.mesh.values():
            taken.setdefault(m.id, m.name)
            taken_cidrs.append(m.pod_cidr)

        def dc_ok(dc: str, facts: Any = facts) -> str:
            if dc != facts.datacenter:
                raise wizard.SetupError("datacenter", f"this Consul is datacenter {facts.datacenter!r}, not {dc!r}")
            if any(a.datacenter == dc for a in answers):
                raise wizard.SetupError("datacenter", f"datacenter {dc!r} is already in this setup",
                                        "each cluster needs its own Consul datacenter")
            return dc

        dc = _ask("  Datacenter", dc_ok, default=facts.datacenter)
        existing = next((m for m in facts.mesh.values() if m.datacenter == dc), None)
        name = _ask("  Cluster name", lambda v: wizard.check_name(v, answers), default=existing.name if existing else dc)
        known = facts.mesh.get(name)
        cid = _ask("  Cluster id (1-255)", lambda v: wizard.check_id(v, answers, taken, name), type=int,
                   default=known.id if known else wizard.suggest_id(answers, taken))
        others = [c for c in taken_cidrs if not (known and c == known.pod_cidr)]

        def cidr_ok(v: str) -> str:
            cidr = wizard.check_pod_cidr(v, answers)
            import ipaddress

            for c in others:
                if ipaddress.ip_network(c).overlaps(ipaddress.ip_network(cidr)):
                    raise wizard.SetupError("pod_cidr", f"{cidr} overlaps {c}, in use in the mesh",
                                            f"try {wizard.suggest_pod_cidr(answers, others) or 'another range'}")
            return cidr

        cidr = _ask("  Pod CIDR", cidr_ok, default=known.pod_cidr if known else wizard.suggest_pod_cidr(answers, others))
        routing = click.prompt("  Routing mode", type=click.Choice(["wireguard", "vxlan"]), default="wireguard", err=True)
        hint = f"detected underlay MTU {mtu}: pods get {mtu - 80 - (50 if routing == 'vxlan' else 0)}" if mtu else ""
        pod_mtu = click.prompt(f"  Pod MTU (0: derive on each node{'; ' + hint if hint else ''})",
                               type=click.IntRange(0, 9000), default=0, err=True)
        answers.append(wizard.ClusterAnswer(consul=address, name=name, id=cid, pod_cidr=cidr, datacenter=dc,
                                            token=token, ca_file=ctx.consul.ca_file, routing=routing, mtu=pod_mtu))
    return answers


@click.command()
@click.option("--answers", "answers_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Answers as YAML/JSON ({clusters: [{consul, name, id, pod_cidr, ...}]}) instead of questions.")
@click.option("-y", "--yes", is_flag=True, help="Apply without asking for confirmation.")
@click.option("--dry-run", is_flag=True, help="Check and show the plan; write nothing.")
@click.option("--acl-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With acl_nodes in the answers: write each node's new ACL token here (DIR/CLUSTER/NODE.token, 0600).")
@click.option("--signing-keys", "signing_keys", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where new clusters' signing keys go (DIR/CLUSTER.key, 0600) unless the answers name one "
                   "[default: ~/.config/wiremesh/signing, or $WIREMESH_SIGNING_KEY_DIR].")
@click.pass_obj
def setup(ctx: Ctx, answers_file: Path | None, yes: bool, dry_run: bool, acl_out: Path | None,
          signing_keys: Path | None) -> None:
    """Connect clusters into one mesh: checks every answer, then writes every datacenter.

    \b
    For each cluster it asks the Consul address, datacenter and token, the cluster's name and
    id (suggesting the next free one), its pod CIDR (suggesting one that overlaps nothing),
    routing mode and MTU. It checks as it goes: Consul reachable, WAN federation in place, no
    overlapping CIDR, no duplicate id or name. It shows a summary to confirm, applies it to
    every datacenter (all or nothing), and prints what each node's agent.toml needs.
    Running it again changes only what changed; a pod CIDR that nodes already use cannot change.
    A new cluster gets a signing key (a file kept here, never in Consul) and refuses unsigned
    records: enroll each node with `wiremesh node enroll` (answers: `unsigned: true` to opt out).
    """
    answers = wizard.load_answers(answers_file) if answers_file else interview(ctx)
    for a in answers:  # --token / CONSUL_HTTP_TOKEN and --ca-file stand in for answers that give none
        a.token = a.token or ctx.consul.token
        a.ca_file = a.ca_file or ctx.consul.ca_file
        if not a.unsigned and not a.signing_key_file:
            from wiremesh.clustermesh import signing_key_dir

            a.signing_key_file = str((signing_keys or signing_key_dir()) / f"{a.name}.key")
    if any(a.acl_nodes for a in answers) and acl_out is None:
        raise wizard.SetupError("--acl-out", "acl_nodes are listed: say where the tokens go (a directory)")
    o = ctx.consul  # a client certificate (--client-cert, CONSUL_CLIENT_CERT) goes to every cluster's Consul
    plan, stores = wizard.prepare(answers, progress=lambda m: info(f"  {m}"), store_for=lambda a: ConsulStore(
        dataclasses.replace(a.options(), client_cert=o.client_cert, client_key=o.client_key), retries=False))
    summary = plan.summary()
    if not ctx.json:
        info("")
        emit(ctx, summary, ["cluster", "id", "datacenter", "pod cidr", "routing", "mtu", "changes"],
             [[s["cluster"], s["id"], s["datacenter"], s["pod_cidr"], s["routing"], s["mtu"], s["changes"]]
              for s in summary])
    if not plan.changes or dry_run:
        info("nothing to change: every datacenter already has this setup" if not plan.changes
             else f"dry run: {plan.changes} change(s) not written")
        if not dry_run and acl_out is not None:
            wizard.create_agent_tokens(answers, stores, acl_out, progress=lambda m: info(f"  {m}"))
        if ctx.json:
            emit(ctx, {"clusters": summary, "changes": plan.changes, "applied": False})
        return
    if not yes and not click.confirm(f"Apply {plan.changes} change(s) to {len(plan.writes)} datacenter(s)?",
                                     default=False, err=True):
        info("nothing written")
        raise SystemExit(1)
    result = wizard.apply_setup(plan, stores, progress=lambda m: info(f"  {m}"))
    if acl_out is not None:
        wizard.create_agent_tokens(answers, stores, acl_out, progress=lambda m: info(f"  {m}"))
    if ctx.json:
        emit(ctx, {"clusters": summary, "changes": plan.changes, "result": result, "applied": True})
        return
    info("applied: " + ", ".join(f"{k} ({v})" for k, v in result.items()))
    for a, f in zip(plan.answers, plan.facts):
        if f.config is None and not a.unsigned and a.signing_key_file:
            info(f"cluster {a.name}: records must be signed; its signing key is {a.signing_key_file} "
                 f"(enroll each node: wiremesh node enroll NODE --cluster {a.name} --signing-key {a.signing_key_file} ...)")
    info("\nEach node's agent.toml needs:")
    for a, f in zip(plan.answers, plan.facts):
        click.echo(wizard.agent_toml(a, f.datacenter))


__all__ = ["setup"]
