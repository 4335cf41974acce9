"""`wiremesh lab`: run a whole mesh on this machine."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import click

from wiremesh.clustermesh import check_labels
from wiremesh.lab import DEFAULT_TOPOLOGY, Lab, LabError, list_labs, load_topology

from .output import Ctx, emit


def _say(msg: str) -> None:
    click.echo(f"  {msg}", err=True)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, WireGuard devices)")


name_option = click.option("-n", "--name", default="wm", show_default=True, envvar="WIREMESH_LAB",
                           help="Lab name (lets several labs live side by side) [env: WIREMESH_LAB].")


@click.group()
def lab() -> None:
    """A whole mesh on this machine: a real Consul and real agents, each node in its own namespaces."""


@lab.command("up")
@name_option
@click.option("--nodes", type=click.IntRange(1, 200), default=None,
              help="Nodes per cluster [default: 3 for one cluster, the topology's for several].")
@click.option("--clusters", type=click.IntRange(1, 9), default=None,
              help="Clusters (Consul datacenters, WAN-joined and connected by `wiremesh setup`).")
@click.option("--topology", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="A topology YAML (clusters, ids, pod CIDRs, nodes); the default ships as lab/topologies/default.yaml.")
@click.option("--cluster", default="lab", show_default=True, help="Cluster name.")
@click.option("--pod-cidr", default="10.240.0.0/16", show_default=True)
@click.option("--node-prefix-len", type=int, default=24, show_default=True, help="Size of each node's pod CIDR.")
@click.option("--routing", type=click.Choice(["wireguard", "vxlan"]), default="wireguard", show_default=True,
              help="How pod traffic crosses nodes: routed into WireGuard, or VXLAN inside WireGuard.")
@click.option("--session-ttl", type=click.IntRange(2, 3600), default=10, show_default=True,
              help="Seconds after an agent's crash until its peers drop it.")
@click.option("--no-check", is_flag=True, help="Skip the ping check at the end.")
@click.option("--tls", is_flag=True, help="Consul serves HTTPS only, with a CA made for this lab; agents verify it.")
@click.option("--acl", is_flag=True, help="Consul ACLs on (default deny); each node's agent gets its own token.")
@click.pass_obj
def up(obj: Any, name: str, nodes: int | None, clusters: int | None, topology: Path | None, cluster: str,
       pod_cidr: str, node_prefix_len: int, routing: str, session_ttl: int, no_check: bool, tls: bool,
       acl: bool) -> None:
    """Start a lab: Consul, nodes with real agents; then show every node pinging every other.

    \b
    One cluster:      wiremesh lab up --nodes 3
    Several clusters: wiremesh lab up --clusters 2 --nodes 2   (or --topology FILE)
    HTTPS and ACLs:   wiremesh lab up --nodes 3 --tls --acl
    """
    _require_root()
    lab_ = Lab(name)
    specs = None
    if topology is not None or (clusters or 1) > 1:
        specs = load_topology(topology or DEFAULT_TOPOLOGY, clusters=clusters, nodes=nodes)
        click.echo(f"lab {name}: starting {len(specs)} clusters ({', '.join(f'{s.name}: {s.nodes} nodes' for s in specs)})",
                   err=True)
    else:
        nodes = 3 if nodes is None else nodes
        click.echo(f"lab {name}: starting {nodes} nodes", err=True)
    t0 = time.monotonic()
    try:
        lab_.up(nodes or 0, cluster=cluster, pod_cidr=pod_cidr, node_prefix_len=node_prefix_len, routing=routing,
                session_ttl=session_ttl, topology=specs, progress=_say, tls=tls, acl=acl)
    except LabError:
        click.echo(f"lab {name}: start failed; 'wiremesh lab down -n {name}' removes what was made", err=True)
        raise
    click.echo(f"lab {name}: mesh converged in {time.monotonic() - t0:.1f}s", err=True)
    if not no_check:
        results = ping_matrix(lab_)
        bad = [r for r in results if not r["ok"]]
        for r in results:
            slow = f" (after {r['seconds']:.1f} s)" if r["ok"] and r["seconds"] > 1.5 else ""
            click.echo(f"  ping {r['from']} -> {r['to']} ({r['address']}): {'ok' if r['ok'] else 'FAILED'}{slow}",
                       err=True)
        if bad:
            raise LabError(f"{len(bad)} of {len(results)} pings failed")
    _print_status(obj, lab_)
    first = min(lab_.nodes, key=lambda n: lab_.node(n).index, default="node1")
    click.echo(f"next: wiremesh lab exec -n {name} {first} -- wg show   |   wiremesh lab down -n {name}", err=True)


def ping_matrix(lab_: Lab) -> list[dict[str, Any]]:
    """Ping every node's overlay address from every other node: one reply each, within 6 s (a
    tunnel's first handshake whose initiation found the other side not ready yet is retried by
    WireGuard only 5 s later: REKEY_TIMEOUT)."""
    nodes = sorted(lab_.nodes)
    addrs = {n: lab_.overlay_ip(n) for n in nodes}
    out = []
    for a, b in itertools.permutations(nodes, 2):
        t0 = time.monotonic()
        p = lab_.run(a, "ping", "-c", "1", "-w", "6", addrs[b])
        out.append({"from": a, "to": b, "address": addrs[b], "ok": p.returncode == 0,
                    "seconds": round(time.monotonic() - t0, 2)})
    return out


def _print_status(obj: Any, lab_: Lab) -> None:
    ctx = obj if obj is not None else Ctx()
    rows, data = [], []
    for n, node in sorted(lab_.nodes.items(), key=lambda kv: (kv[1].cluster, kv[1].index)):
        h = lab_.health(n) if node.pid else {"status": "stopped"}
        d = {"node": n, "cluster": node.cluster or lab_.clusters[0], "netns": node.netns, "underlay": node.underlay,
             "pid": node.pid, "status": h.get("status"), "peers_programmed": h.get("peers_programmed"),
             "peers_desired": h.get("peers_desired")}
        data.append(d)
        rows.append([n, d["cluster"], node.underlay, node.pid or "-", d["status"],
                     f"{d['peers_programmed'] if d['peers_programmed'] is not None else '-'}/"
                     f"{d['peers_desired'] if d['peers_desired'] is not None else '-'}"])
    emit(ctx, {"lab": lab_.name, "consul": {c: lab_.consul_address(c) for c in lab_.clusters}, "nodes": data},
         ["node", "cluster", "underlay", "agent pid", "status", "peers"], rows)


@lab.command("status")
@name_option
@click.pass_obj
def status(obj: Any, name: str) -> None:
    """Nodes of the lab, their agents and how many peers each has programmed."""
    _require_root()
    lab_ = Lab(name).load()
    _print_status(obj, lab_)


@lab.command("list")
@click.pass_obj
def list_(obj: Any) -> None:
    """Labs on this machine."""
    labs = list_labs()
    emit(obj or Ctx(), labs, ["lab"], [[x] for x in labs])


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@name_option
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside a node, a pod, or 'hub' (the underlay switch), e.g. lab exec node1 -- wg show."""
    _require_root()
    lab_ = Lab(name).load()
    cmd = list(command[1:] if command[0] == "--" else command)
    if not cmd:
        raise LabError("lab exec: give a command after NODE, e.g. lab exec node1 -- wg show")
    argv = lab_.exec_argv(node, cmd)
    os.execvp(argv[0], argv)


@lab.command("add")
@name_option
@click.argument("node", required=False)
def add(name: str, node: str | None) -> None:
    """Add a node (named NODE, or the next nodeN) and wait until the mesh has it."""
    _require_root()
    lab_ = Lab(name).load()
    n = lab_.add_node(node, progress=_say)
    click.echo(f"added {n.name} ({n.underlay})", err=True)


@lab.command("stop")
@name_option
@click.argument("node")
@click.option("--signal", "sig", type=click.Choice(["TERM", "KILL"]), default="TERM", show_default=True)
def stop(name: str, node: str, sig: str) -> None:
    """Stop NODE's agent (TERM removes its record; KILL leaves it to expire). Its tunnels stay up."""
    _require_root()
    Lab(name).load().stop_agent(node, getattr(signal, f"SIG{sig}"))


@lab.command("start")
@name_option
@click.argument("node")
def start(name: str, node: str) -> None:
    """Start NODE's agent again."""
    _require_root()
    pid = Lab(name).load().start_agent(node)
    click.echo(f"{node}: agent pid {pid}", err=True)


@lab.command("routing")
@name_option
@click.argument("mode", type=click.Choice(["wireguard", "vxlan"]))
def routing_(name: str, mode: str) -> None:
    """Switch the running cluster to routing MODE; agents move over without a restart."""
    _require_root()
    result = Lab(name).load().set_routing(mode)
    click.echo(f"lab {name}: routing {mode} ({result})", err=True)


@lab.group("pod")
def pod() -> None:
    """Pods: network namespaces wired up by the wiremesh CNI plugin, as a container runtime would."""


@pod.command("add")
@name_option
@click.argument("pod_name", metavar="NAME")
@click.option("--node", required=True, help="The node the pod runs on.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="A label of the pod (repeatable); network policies select pods by their labels.")
@click.pass_obj
def pod_add(obj: Any, name: str, pod_name: str, node: str, labels: tuple[str, ...]) -> None:
    """Create pod NAME on NODE through the CNI plugin (CNI ADD)."""
    _require_root()
    given: dict[str, str] = {}
    for text in labels:
        k, eq, v = text.partition("=")
        if not eq:
            raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--label")
        given[k] = v
    try:
        check_labels(given, "--label")
    except ValueError as e:
        raise click.BadParameter(str(e).removeprefix("--label: ").removeprefix("--label."), param_hint="--label") from None
    p = Lab(name).load().add_pod(pod_name, node, given)
    click.echo(f"pod {p.name} on {p.node}: {p.address}" + (f" ({', '.join(labels)})" if labels else ""), err=True)


@pod.command("del")
@name_option
@click.argument("pod_name", metavar="NAME")
def pod_del(name: str, pod_name: str) -> None:
    """Delete pod NAME (CNI DEL, then its namespace)."""
    _require_root()
    Lab(name).load().del_pod(pod_name)
    click.echo(f"pod {pod_name}: deleted", err=True)


@pod.command("list")
@name_option
@click.pass_obj
def pod_list(obj: Any, name: str) -> None:
    """Pods of the lab with their node and address."""
    pods = Lab(name).load().pods
    emit(obj or Ctx(), [p.__dict__ for p in pods.values()], ["pod", "node", "address", "netns"],
         [[p.name, p.node, p.address, p.netns] for p in pods.values()])


@pod.command("ip")
@name_option
@click.argument("pod_name", metavar="NAME")
def pod_ip(name: str, pod_name: str) -> None:
    """Print pod NAME's address, for scripts: lab exec web -- ping $(wiremesh lab pod ip db)."""
    pods = Lab(name).load().pods
    if pod_name not in pods:
        raise LabError(f"pod {pod_name!r}: no such pod in lab {name} (pods: {', '.join(sorted(pods)) or 'none'})")
    click.echo(pods[pod_name].ip)


@lab.command("down")
@name_option
@click.option("--all", "all_", is_flag=True, help="Every lab on this machine.")
def down(name: str, all_: bool) -> None:
    """Remove everything the lab made: processes, namespaces, files. Safe to run twice."""
    _require_root()
    names = list_labs() if all_ else [name]
    for n in names:
        removed = Lab(n).down(progress=_say)
        click.echo(f"lab {n}: {'removed' if removed else 'nothing to remove'}", err=True)


from .lab_service_cmd import service as _service_group  # noqa: E402 - the group lives in its own module

lab.add_command(_service_group)
