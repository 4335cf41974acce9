"""`wiremesh agent`: run the node agent in the foreground."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import load_config


@click.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              envvar="WIREMESH_AGENT_CONFIG", help="agent.toml [env: WIREMESH_AGENT_CONFIG].")
@click.option("--check", is_flag=True, help="Validate the config and exit.")
def agent(config_path: Path, check: bool) -> None:
    """Run the node agent: publish this node in Consul, keep a WireGuard tunnel to every peer.

    SIGTERM removes the node's record (peers drop it at once) and leaves the device up;
    SIGHUP forces a full reconcile. Health and metrics: http://HEALTH_ADDRESS/healthz, /metrics.
    """
    cfg = load_config(config_path)
    if check:
        click.echo(f"{config_path}: ok (node {cfg.node}, cluster {cfg.cluster})", err=True)
        return
    from ..daemon import Agent

    raise SystemExit(Agent(cfg).run())
