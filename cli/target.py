"""Which cluster a command acts on, and through which Consul: --cluster, or an agent.toml's (-c)."""

from __future__ import annotations

from pathlib import Path

import click

from wiremesh.clustermesh import ConsulStore

from wiremesh.agent import load_config
from .output import Ctx

CONFIG_OPTION = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    envvar="WIREMESH_AGENT_CONFIG", help="An agent.toml: its cluster and Consul are the defaults [env: WIREMESH_AGENT_CONFIG].")


def target(ctx: Ctx, cluster_name: str | None, config_path: Path | None) -> tuple[ConsulStore, str]:
    """The store and cluster to act on: --cluster wins; else the agent.toml's cluster, whose Consul
    is used unless --consul was given."""
    consul = ctx.consul
    if config_path is not None:
        cfg = load_config(config_path)
        consul = cfg.consul if ctx.consul.address == type(ctx.consul)().address else ctx.consul
        cluster_name = cluster_name or cfg.cluster
    if not cluster_name:
        raise click.UsageError("which cluster? give --cluster NAME (or -c agent.toml)")
    return ConsulStore(consul), cluster_name
