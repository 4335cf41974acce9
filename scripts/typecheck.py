"""Runs `mypy --strict` over the wiremesh package, laid out as it is installed.

mypy neither follows setuptools' editable finder nor knows pyproject's package-dir (wiremesh.agent
lives in agent/, ...), so this lays out the installed package as links under build/typecheck/
(wiremesh/ holding the root modules and one link per mapped folder) and runs mypy there; error
paths are given back as the repository's (agent/daemon.py, not wiremesh/agent/daemon.py).
  .venv/bin/python scripts/typecheck.py [mypy options]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


MAPPING: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def lay_out(mapping: dict[str, str]) -> Path:
    """build/typecheck/wiremesh/... mirroring [tool.setuptools.package-dir]."""
    shutil.rmtree(TREE, ignore_errors=True)
    for name, folder in sorted(mapping.items()):
        link = TREE.joinpath(*name.split("."))
        if name == "wiremesh":  # the root's own modules only: its subpackages are other folders
            link.mkdir(parents=True)
            for f in (ROOT / folder).glob("*.py"):
                (link / f.name).symlink_to(f)
        else:
            link.symlink_to(ROOT / folder, target_is_directory=True)
    return TREE


def main(argv: list[str]) -> int:
    tree = lay_out(MAPPING)
    mypy = [sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports", "--no-error-summary",
            "--cache-dir", str(ROOT / ".mypy_cache"), *argv, "-p", "wiremesh"]
    p = subprocess.run(mypy, cwd=tree, env={**os.environ, "MYPYPATH": ""}, stdout=subprocess.PIPE, text=True)
    # Longest import names first: wiremesh/tunnels/... before wiremesh/...
    prefixes = sorted(((name.replace(".", "/") + "/", folder + "/") for name, folder in MAPPING.items()), reverse=True)
    for line in p.stdout.splitlines():
        for tree_path, folder in prefixes:
            if line.startswith(tree_path):
                line = folder + line[len(tree_path):]
                break
        print(line)
    return p.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
