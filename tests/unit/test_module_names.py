"""Every module of wiremesh is loaded under one name, from this repository's folders."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOPS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
SOURCES = [ROOT / folder for folder in TOPS.values()]


def in_sources(path: str) -> bool:
    return any(Path(os.path.realpath(path)).is_relative_to(s) for s in SOURCES)


def import_everything() -> list[str]:
    """Imports every module below wiremesh and each of its subpackages (their folders are not
    below wiremesh/: pyproject.toml maps them, so the walk starts at each)."""
    names = list(TOPS)
    for top in TOPS:
        package = importlib.import_module(top)
        for info in pkgutil.walk_packages(package.__path__, f"{top}.", onerror=pytest.fail):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue  # a command, run by `python -m`, not a module to import
            importlib.import_module(info.name)
            names.append(info.name)
    return sorted(set(names))


def test_no_module_is_loaded_twice() -> None:
    names = import_everything()
    assert len(names) > 50, f"walked only {len(names)} modules: {names}"
    assert {"wiremesh.agent.daemon", "wiremesh.cli.main", "wiremesh.cni.plugin", "wiremesh.tunnels.bpf.lb",
            "wiremesh.tunnels.podstate", "wiremesh.lab.lab"} <= set(names)
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and in_sources(path):
            by_file[os.path.realpath(path)].append(name)
    assert len(by_file) >= len(names)
    twice = {f: n for f, n in by_file.items() if len(n) > 1}
    assert not twice, f"one file loaded as two modules: {twice}"
    for name in names:
        path = sys.modules[name].__file__ or ""
        assert in_sources(path), f"{name} comes from {path}, not from this repository (pip install -e .)"


@pytest.mark.parametrize("bare", ["agent", "tunnels", "keys", "clustermesh", "lab", "cli", "cni"])
def test_a_bare_folder_name_does_not_import(bare: str) -> None:
    sys.modules.pop(bare, None)
    with pytest.raises(ImportError, match=rf"wiremesh\.{bare}"):
        importlib.import_module(bare)
