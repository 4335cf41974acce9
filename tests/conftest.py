"""For every test: each module of this repository has one name, `wiremesh.X...`.

pytest puts the repository's root on sys.path (tests/ is a package; `python -m pytest` adds the
working directory too), so `import agent` would load agent/ a second time, beside
`wiremesh.agent`: two copies of every class, and isinstance checks that fail for no visible
reason. The finder below turns that into an ImportError that says what to import instead.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
# The folders that are subpackages of wiremesh (pyproject.toml, [tool.setuptools.package-dir]).
SUBPACKAGES = ("agent", "tunnels", "keys", "clustermesh", "lab", "cli", "cni")


class OneNameFinder(importlib.abc.MetaPathFinder):
    """Refuses a top-level import of one of the repository's folders under its bare name."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
        if path is not None or fullname not in SUBPACKAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is not None and origin.is_relative_to(ROOT):
            raise ImportError(f"`import {fullname}` would load {origin.parent.relative_to(ROOT)}/ a second time: "
                              f"its one name is `wiremesh.{fullname}` (DESIGN.md, Packaging)", name=fullname)
        return None


if not any(isinstance(f, OneNameFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, OneNameFinder())
