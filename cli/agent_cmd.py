"""`wiremesh agent`: run the node agent in the foreground."""

from __future__ import annotations

from pathlib import Path

import click

from wiremesh.agent import load_config, load_identity


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
    identity = load_identity(cfg, str(config_path))  # a bad certificate is one clear line, before anything starts
    if check:
        click.echo(f"{config_path}: ok (node {cfg.node}, cluster {cfg.cluster})", err=True)
        if identity is not None:
            c = identity.certificate
            click.echo(f"certificate: serial {c.serial}, pod CIDR {c.pod_cidr}, valid until {c.not_after}", err=True)
        return
    from wiremesh.agent import Agent

    raise SystemExit(Agent(cfg).run())
