"""`wiremesh lab service`: global services with backends in the lab's pods, checked by Consul."""

from __future__ import annotations

import os
from typing import Any

import click

from wiremesh.clustermesh import AFFINITIES
from wiremesh.lab import Lab, LabError, services

from .output import Ctx, emit


def _say(msg: str) -> None:
    click.echo(f"  {msg}", err=True)


def _lab(name: str) -> Lab:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, WireGuard devices)")
    return Lab(name).load()


name_option = click.option("-n", "--name", default="wm", show_default=True, envvar="WIREMESH_LAB",
                           help="Lab name [env: WIREMESH_LAB].")
wait_option = click.option("--no-wait", "no_wait", is_flag=True,
                           help="Return at once, without waiting for Consul and the nodes' maps to follow.")


@click.group("service")
def service() -> None:
    """Global services: backends in pods, health-checked by a Consul client agent on their node.

    \b
    wiremesh lab service add web --port 8080 --pods web-east,web-west --affinity local
    wiremesh lab exec client -- curl -s $(wiremesh lab service vip web):8080
    wiremesh lab service fail web-east      (its health check fails; Consul marks it critical)
    """


@service.command("add")
@name_option
@click.argument("service_name", metavar="NAME")
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="The service's port (VIP and backends).")
@click.option("--pods", required=True, metavar="P1,P2", help="Pods that run a backend.")
@click.option("--affinity", type=click.Choice(AFFINITIES), default="none", show_default=True,
              help="local: other clusters' backends only while none of the local cluster is healthy; "
                   "remote: the mirror; none: all.")
@click.option("--prefer", default="", metavar="C1,C2", help="Clusters in order of preference (overrides affinity).")
@click.option("--udp", is_flag=True, help="A UDP service (the backends answer datagrams; health over HTTP).")
@wait_option
@click.pass_obj
def add(obj: Any, name: str, service_name: str, port: int, pods: str, affinity: str, prefer: str, udp: bool,
        no_wait: bool) -> None:
    """Define NAME in every cluster and start a backend in each pod (again: the backends become
    exactly these pods). Waits until Consul has them passing and every node programmed them."""
    lab = _lab(name)
    try:
        st = services.add(lab, service_name, port, [p.strip() for p in pods.split(",") if p.strip()],
                          affinity=affinity, prefer=[c.strip() for c in prefer.split(",") if c.strip()], udp=udp,
                          wait=not no_wait, progress=_say)
    finally:
        lab.close()
    _emit(obj, [{"service": service_name, **{k: st[k] for k in ("vips", "port", "protocol")},
                 "policy": services.policy(st), "backends": sorted(st["backends"])}])


@service.command("del")
@name_option
@click.argument("service_name", metavar="NAME")
def delete(name: str, service_name: str) -> None:
    """Stop NAME's backends, deregister them from Consul and remove its definition everywhere."""
    lab = _lab(name)
    try:
        services.delete(lab, service_name)
    finally:
        lab.close()
    click.echo(f"service {service_name}: deleted", err=True)


def _set_failing(name: str, pod: str, failing: bool, no_wait: bool) -> None:
    lab = _lab(name)
    try:
        names = services.set_failing(lab, pod, failing, wait=not no_wait)
    finally:
        lab.close()
    what = "critical" if failing else "passing"
    click.echo(f"pod {pod}: health check of {', '.join(names)} {'set to fail' if failing else 'set to pass'}"
               f"{'' if no_wait else f'; Consul shows it {what} and the nodes follow'}", err=True)


@service.command("fail")
@name_option
@click.argument("pod")
@wait_option
def fail(name: str, pod: str, no_wait: bool) -> None:
    """Make the health checks of POD's backends fail (Consul marks them critical by itself)."""
    _set_failing(name, pod, True, no_wait)


@service.command("recover")
@name_option
@click.argument("pod")
@wait_option
def recover(name: str, pod: str, no_wait: bool) -> None:
    """Make the health checks of POD's backends pass again."""
    _set_failing(name, pod, False, no_wait)


@service.command("list")
@name_option
@click.pass_obj
def list_(obj: Any, name: str) -> None:
    """The lab's services: VIP, port, affinity, and each backend's health in Consul."""
    lab = _lab(name)
    try:
        _emit(obj, services.listing(lab))
    finally:
        lab.close()


@service.command("vip")
@name_option
@click.argument("service_name", metavar="NAME")
@click.option("--cluster", default=None, help="The VIP in this cluster (default: the first cluster's).")
def vip(name: str, service_name: str, cluster: str | None) -> None:
    """Print NAME's virtual IP, for scripts: lab exec POD -- curl $(wiremesh lab service vip web):8080."""
    lab = Lab(name).load()
    vips = services.service_state(lab, service_name)["vips"]
    c = cluster or lab.clusters[0]
    if c not in vips:
        raise LabError(f"service {service_name}: no cluster {c!r} ({', '.join(vips)})")
    click.echo(vips[c])


def _emit(obj: Any, rows: list[dict[str, Any]]) -> None:
    table = []
    for r in rows:
        vips = r["vips"]
        vip_text = next(iter(vips.values())) if len(set(vips.values())) == 1 else \
            ",".join(f"{c}={v}" for c, v in vips.items())
        backends = r["backends"]
        shown = ", ".join(b if isinstance(b, str) else f"{b['pod']}@{b['cluster']} {b['status']}" for b in backends)
        table.append([r["service"], vip_text, f"{r['port']}/{r['protocol']}", r["policy"], shown or "-"])
    emit(obj or Ctx(), {"services": rows}, ["service", "vip", "port", "policy", "backends"], table)
