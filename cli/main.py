"""The `wiremesh` command: a thin root group holding the global options."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from wiremesh.clustermesh import ConsulOptions, TokenFileError, check_token, read_token_file
from wiremesh.errors import WiremeshError

from .. import __version__
from .output import Ctx


# Command groups are imported only when used: `wiremesh agent` then never loads rich, the lab or
# the status code, which keeps a long-running agent's memory down.
COMMANDS = {
    "agent": "wiremesh.cli.agent_cmd:agent",
    "cluster": "wiremesh.cli.cluster:cluster",
    "endpoint": "wiremesh.cli.endpoint_cmd:endpoint",
    "keys": "wiremesh.cli.keys_cmd:keys",
    "lab": "wiremesh.cli.lab_cmd:lab",
    "node": "wiremesh.cli.node_cmd:node",
    "policy": "wiremesh.cli.policy_cmd:policy",
    "service": "wiremesh.cli.service_cmd:service",
    "setup": "wiremesh.cli.setup_cmd:setup",
    "status": "wiremesh.cli.status:status",
}


class RootGroup(click.Group):
    """Loads command groups lazily; prints expected errors as one line plus a hint."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except WiremeshError as e:
            _fail(str(e), getattr(e, "hint", None), ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence of a CLI
            verbose = getattr(ctx.obj, "verbose", 0) if ctx.obj else 0
            if verbose:
                traceback.print_exc()
            _fail(f"unexpected error: {e.__class__.__name__}: {e}", "run with -v for the traceback" if not verbose else None, ctx)
        return None


def _fail(msg: str, hint: str | None, ctx: click.Context) -> None:
    color = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    click.echo(click.style("error:", fg="red", bold=True) + f" {msg}" if color else f"error: {msg}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    ctx.exit(1)


@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="wiremesh")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug); tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
              envvar="WIREMESH_OUTPUT", help="Data format on stdout.")
@click.option("--consul", "consul_addr", envvar=["WIREMESH_CONSUL_HTTP_ADDR", "CONSUL_HTTP_ADDR"],
              default="http://127.0.0.1:8500", show_default=True, metavar="URL",
              help="Consul HTTP address [env: WIREMESH_CONSUL_HTTP_ADDR, CONSUL_HTTP_ADDR].")
@click.option("--token", envvar="CONSUL_HTTP_TOKEN", default=None, metavar="TOKEN",
              help="Consul ACL token [env: CONSUL_HTTP_TOKEN]; prefer --token-file: argv is public.")
@click.option("--token-file", envvar="CONSUL_HTTP_TOKEN_FILE", default=None, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Read the Consul ACL token from FILE (mode 0600) [env: CONSUL_HTTP_TOKEN_FILE].")
@click.option("--ca-file", envvar="CONSUL_CACERT", default=None, type=click.Path(dir_okay=False, exists=True),
              help="CA bundle for Consul over HTTPS [env: CONSUL_CACERT].")
@click.option("--client-cert", envvar="CONSUL_CLIENT_CERT", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Client certificate for a Consul that verifies clients [env: CONSUL_CLIENT_CERT].")
@click.option("--client-key", envvar="CONSUL_CLIENT_KEY", default=None, type=click.Path(dir_okay=False, exists=True),
              help="The client certificate's key [env: CONSUL_CLIENT_KEY].")
@click.option("--datacenter", envvar="CONSUL_DATACENTER", default=None, help="Consul datacenter to talk to.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, output: str, consul_addr: str, token: str | None,
        token_file: Path | None, ca_file: str | None, client_cert: str | None, client_key: str | None,
        datacenter: str | None) -> None:
    """wiremesh: an encrypted WireGuard mesh for Linux hosts, coordinated through Consul.

    \b
    Common tasks:
      wiremesh lab up --nodes 3          a whole mesh on this machine, in namespaces
      wiremesh cluster init NAME ...     create a cluster's config in Consul
      wiremesh agent --config FILE       run the node agent
      wiremesh status                    nodes, endpoints, keys and (on a node) tunnels
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if token:  # checked, never echoed: its source and the reason only
        from_env = ctx.get_parameter_source("token") == click.core.ParameterSource.ENVIRONMENT
        check_token(token, "CONSUL_HTTP_TOKEN" if from_env else "--token")
    if token_file is not None and not token:
        from_env = ctx.get_parameter_source("token_file") == click.core.ParameterSource.ENVIRONMENT
        try:
            token = read_token_file(token_file)
        except TokenFileError as e:
            raise TokenFileError(f"{'CONSUL_HTTP_TOKEN_FILE' if from_env else '--token-file'}: {e.source}",
                                 e.reason, e.hint) from None
    ctx.obj = Ctx(verbose=verbose, output=output,
                  consul=ConsulOptions(address=consul_addr, token=token or None, ca_file=ca_file, datacenter=datacenter,
                                       client_cert=client_cert, client_key=client_key))


def main() -> None:
    cli(prog_name="wiremesh")
