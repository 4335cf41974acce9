"""The README is true: its shell examples run in order, as a user types them, against a real lab.

The lab they bring up gets a unique name through WIREMESH_LAB (the README's commands use the
default name), so a user's own lab is never touched; it is removed even when an example fails.
"""

from __future__ import annotations

import os
from pathlib import Path

from wiremesh.lab import Lab
from tests.readme_runner import parse, run

from .conftest import RUN_MARKER, new_lab_name

ROOT = Path(__file__).resolve().parents[2]
MAX_SKIPPED = 6  # examples that cannot run here stay visibly few (the 6th boots VMs)


def test_every_readme_example_runs_as_written() -> None:
    blocks = parse((ROOT / "README.md").read_text())
    skipped = [b for b in blocks if b.skip]
    assert len(skipped) <= MAX_SKIPPED, [(b.line, b.skip) for b in skipped]
    examples = [e for b in blocks if not b.skip for e in b.examples]
    assert len(examples) >= 10, "the README lost its walk-through"
    name = new_lab_name()
    # The run's marker stays: what the examples start is this run's (conftest.nothing_left_behind).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WIREMESH_", "CONSUL_HTTP")) or k == RUN_MARKER}
    env.update(WIREMESH_LAB=name, NO_COLOR="1")
    try:
        for ex in examples:
            run(ex, ROOT, env)
    finally:
        Lab(name).down()
