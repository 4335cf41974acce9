"""Shared CLI plumbing: global options, output (table or JSON), one-line errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click

from wiremesh.clustermesh import ConsulOptions


@dataclass
class Ctx:
    verbose: int = 0
    output: str = "table"
    consul: ConsulOptions = ConsulOptions()

    @property
    def json(self) -> bool:
        return self.output == "json"


def info(msg: str) -> None:
    """A message for people (stderr), never mixed into data."""
    click.echo(msg, err=True)


def emit(ctx: Ctx, data: Any, columns: Sequence[str] | None = None, rows: Sequence[Sequence[Any]] | None = None,
         title: str | None = None) -> None:
    """Data to stdout: JSON with --output json, else a table (rich on a terminal, plain text otherwise)."""
    if ctx.json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    if columns is None or rows is None:
        click.echo(str(data))
        return
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, show_lines=False)
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*[str(x) for x in r])
        Console(no_color="NO_COLOR" in os.environ).print(t)
        return
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c)) for i, c in enumerate(columns)]
    if title:
        click.echo(title)
    click.echo("  ".join(str(c).upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in rows:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
