"""The import contract of DESIGN.md ("The parts", "Packaging"), read from the source with ast.

- layers: a package imports only the packages below it in DESIGN's table (`wiremesh` and
  `wiremesh.errors`, the error root, are open to all);
- face: another package is reached only through its face, `wiremesh.X` (never `wiremesh.X.sub`);
- public: only names in that face's `__all__`, never a `_private` one;
- one name: nothing in the repository imports `agent`, `tunnels`, ... without `wiremesh.`;
- packaged: every source folder with an `__init__.py` is a package of pyproject.toml.

Tests and benchmarks may import internals, but only under their `wiremesh.` names.
"""

from __future__ import annotations

import ast
import functools
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
# import name -> folder, from pyproject.toml's package-dir: the mapping the install uses.
FOLDERS: dict[str, str] = PYPROJECT["package-dir"]
PACKAGES = {name.split(".")[1] for name in FOLDERS if name != "wiremesh"}
OPEN_TO_ALL = {"wiremesh", "wiremesh.errors"}
# Which packages each package may import (DESIGN.md, "The parts"); its own modules are always fine.
MAY_IMPORT: dict[str, set[str]] = {
    "": set(),
    "keys": set(),
    "tunnels": {"keys"},
    "clustermesh": {"keys"},
    "agent": {"keys", "tunnels", "clustermesh"},
    "lab": {"keys", "tunnels", "clustermesh", "agent"},
    "cni": {"keys", "tunnels", "clustermesh", "agent"},
    "cli": {"keys", "tunnels", "clustermesh", "agent", "lab"},
}
# Folders outside the package that may import anything of ours, under wiremesh. names only.
OTHER_CODE = ["tests", "bench", "scripts", "vagrant"]


def package_files() -> Iterator[tuple[Path, str]]:
    """Every module of the package with its one import name."""
    for name, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if name == "wiremesh" and len(rel) > 1:
                continue  # wiremesh/ holds only the root modules
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            yield path, ".".join((name, *parts))


def imports(path: Path, module: str | None) -> Iterator[tuple[int, str, list[str]]]:
    """(line, absolute module, names imported from it) for every import, also inside functions."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level and module is None:
                continue  # a test's or a tool's own helper modules
            if node.level and module is not None:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, target, [a.name for a in node.names]


@functools.cache
def face_names(package: str) -> set[str]:
    """The names in `__all__` of wiremesh.<package>'s __init__.py."""
    init = ROOT / FOLDERS[f"wiremesh.{package}"] / "__init__.py"
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else ""


def violations_in(path: Path, module: str) -> Iterator[str]:
    here = package_of(module)
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for line, target, names in imports(path, module):
        top = target.split(".")[0]
        if top in PACKAGES:
            yield f"{where}:{line}: one name: `{target}` must be imported as `wiremesh.{target}`"
            continue
        if top != "wiremesh":
            continue
        if target == "wiremesh":  # `from wiremesh import agent` reaches the face of wiremesh.agent
            for name in names:
                if name in PACKAGES:
                    yield from check_target(where, line, here, f"wiremesh.{name}", [])
            continue
        yield from check_target(where, line, here, target, names)


def check_target(where: Path, line: int, here: str, target: str, names: list[str]) -> Iterator[str]:
    there = package_of(target)
    if target in OPEN_TO_ALL or there == here:
        return
    if there not in MAY_IMPORT[here]:
        what = there or "a module that is no package of wiremesh"
        yield f"{where}:{line}: layers: {here or 'wiremesh'} may not import {what} (`{target}`; DESIGN.md, The parts)"
        return
    if target != f"wiremesh.{there}":
        missing = sorted(set(names) - face_names(there))
        todo = f" (first add {', '.join(missing)} to its __all__)" if missing else ""
        yield f"{where}:{line}: face: `{target}` is inside {there}; import from `wiremesh.{there}`{todo}"
        return
    public = face_names(there)
    for name in names:
        if name.startswith("_"):
            yield f"{where}:{line}: public: `{name}` is private to {there}"
        elif name != "*" and name not in public:
            yield f"{where}:{line}: public: `{name}` is not in wiremesh.{there}'s __all__"


def test_packages_meet_only_through_their_faces() -> None:
    checked = list(package_files())
    assert len(checked) > 50, f"only {len(checked)} modules found: is pyproject's package-dir read right?"
    found = [v for path, module in checked for v in violations_in(path, module)]
    assert not found, "import contract broken:\n  " + "\n  ".join(found)


def test_tests_and_tools_use_wiremesh_names() -> None:
    files = [p for folder in OTHER_CODE for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50
    found = [f"{p.relative_to(ROOT)}:{line}: one name: `{target}` must be imported as `wiremesh.{target}`"
             for p in files for line, target, _ in imports(p, None) if target.split(".")[0] in PACKAGES]
    assert not found, "import contract broken:\n  " + "\n  ".join(found)


def test_every_source_package_is_packaged() -> None:
    listed = set(PYPROJECT["packages"])
    missing = [f"{init.parent.relative_to(ROOT)} (wiremesh.{'.'.join((name.split('.')[1], *init.parent.relative_to(ROOT / folder).parts))})"
               for name, folder in FOLDERS.items() if name != "wiremesh"
               for init in (ROOT / folder).rglob("__init__.py")
               if f"{name}.{'.'.join(init.parent.relative_to(ROOT / folder).parts)}".rstrip(".") not in listed]
    assert not missing, f"packaged: add to [tool.setuptools] packages in pyproject.toml: {missing}"
    assert set(FOLDERS) <= listed


def test_the_checker_sees_every_rule(tmp_path: Path) -> None:
    """The rules above fire: a checker that finds nothing is no contract."""
    bad = tmp_path / "bad.py"
    bad.write_text("import agent.daemon\nimport wiremesh.clustermesh.services\n"
                   "from wiremesh.tunnels import _private, Route\nfrom wiremesh.lab import Lab\n")
    found = list(violations_in(bad, "wiremesh.agent.bad"))
    rules = [v.split(": ")[1] for v in found]
    assert rules == ["one name", "face", "public", "layers"], found
