"""Fuzz targets for the files an operator writes: agent.toml, a lab topology, the setup answers."""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from wiremesh.agent.config import _CONSUL, _TOP, load_config, parse_config
from wiremesh.agent.errors import ConfigError
from wiremesh.clustermesh.wizard import SetupError, load_answers, parse_answers
from wiremesh.lab.errors import LabError
from wiremesh.lab.topology import load_topology, parse_topology

from . import seeds
from .oracles import Bug, no_leak, split_secrets
from .seeds import Deep, Reader, dumps_json, materialize, mutate

# Where the file-reading targets write (scripts/fuzz.py gives each run its own; the tests, theirs).
SCRATCH = Path(os.environ.get("WIREMESH_FUZZ_SCRATCH") or Path(tempfile.gettempdir()) / f"wiremesh-fuzz-{os.getpid()}")


def scratch(name: str, data: bytes) -> Path:
    """A file of the scratch directory, holding `data`."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    p = SCRATCH / name
    p.write_bytes(data)
    return p


# --- agent.toml ---------------------------------------------------------------------------------


def toml_text(doc: dict[str, Any]) -> str:
    """A document as agent.toml text: each top-level field one `key = value` line, tables inline."""
    return "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items()) + "\n"


def _toml(v: Any) -> str:
    if isinstance(v, Deep):
        return "[" * v.depth + "]" * v.depth
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are TOML's (lone surrogates aside: TOML refuses those)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def tomlish(v: Any) -> Any:
    """What TOML can hold: no null (a date in its place: a type no field takes), string keys."""
    if v is None:
        return datetime.date(1979, 5, 27)
    if isinstance(v, dict):
        return {str(k): tomlish(x) for k, x in v.items()}
    if isinstance(v, list):
        return [tomlish(x) for x in v]
    return v


def config(data: bytes) -> None:
    r = Reader(data)
    mode = r.below(3)
    if mode == 0:
        check_config(raw=r.rest())
    else:
        check_config(tomlish(mutate(seeds.AGENT_TOML, r)), as_text=mode == 2)


def check_config(doc: Any = None, raw: bytes | None = None, as_text: bool = False) -> None:
    """parse_config(doc), or load_config of `raw` (or of `doc` written as TOML): an AgentConfig, or a
    ConfigError naming the file and a field, and never showing the Consul token."""
    src = "agent.toml"
    try:
        if raw is None and not as_text:
            parse_config(materialize(doc), src)
        else:
            path = scratch("agent.toml", raw if raw is not None else toml_text(doc).encode("utf-8", "surrogateescape"))
            src = str(path)
            load_config(path)
    except ConfigError as e:
        top = doc if isinstance(doc, dict) else {}
        consul_doc: dict[str, Any] = top["consul"] if isinstance(top.get("consul"), dict) else {}
        given = set(top) | {f"consul.{k}" for k in consul_doc}
        if e.field not in _TOP | {f"consul.{k}" for k in _CONSUL} | {"file", "syntax"} | given and \
                e.reason != "unknown field":  # (a field of raw bytes' TOML: not in `doc`)
            raise Bug(f"ConfigError names {e.field!r}, not a field") from None
        if not str(e).startswith(f"{src}: {e.field}: ") or not e.reason:
            raise Bug(f"ConfigError without source, field and reason: {e}") from None
        secrets, public = split_secrets(top, ("token",))
        no_leak(str(e), secrets, public + src)


# --- topology and answers files -----------------------------------------------------------------


def yaml_text(doc: Any, r: Reader | None = None) -> bytes:
    """A document as YAML (block style), or as JSON (which YAML reads too) when YAML cannot hold it."""
    if r is not None and r.chance(2):
        return dumps_json(doc).encode("utf-8", "surrogateescape")
    try:
        return yaml.safe_dump(materialize(doc), allow_unicode=True).encode("utf-8", "surrogateescape")
    except (yaml.YAMLError, RecursionError):
        return dumps_json(doc).encode("utf-8", "surrogateescape")


def _yaml_input(r: Reader, seed: dict[str, Any]) -> tuple[Any, bytes | None]:
    """(None, arbitrary bytes), (a mutated document, None), or (that document, its text)."""
    mode = r.below(3)
    if mode == 0:
        return None, r.rest()
    doc = mutate(seed, r)
    return doc, (yaml_text(doc, r) if mode == 2 else None)


def topology(data: bytes) -> None:
    r = Reader(data)
    clusters, nodes = r.pick([None, None, 1, 2, 3, 9, 10, 0]), r.pick([None, None, 0, 3, 50, 51, -1])
    doc, raw = _yaml_input(r, seeds.TOPOLOGY)
    check_topology(doc, raw, clusters, nodes)


def check_topology(doc: Any = None, raw: bytes | None = None, clusters: int | None = None,
                   nodes: int | None = None) -> None:
    """parse_topology(doc), or load_topology of a file: at most 9 distinct clusters, or a LabError
    that starts with the file (or the option) at fault."""
    src = "topology.yaml"
    try:
        if raw is None:
            specs = parse_topology(materialize(doc), src)
        else:
            path = scratch("topology.yaml", raw)
            src = str(path)
            specs = load_topology(path, clusters, nodes)
    except LabError as e:
        if not (str(e).startswith(f"{src}: ") or str(e).startswith("--nodes: ")):
            raise Bug(f"LabError does not name the file or option: {e}") from None
        return
    if not 1 <= len(specs) <= 9 or len({s.name for s in specs}) != len(specs):
        raise Bug(f"load_topology gave {specs}")


def answers(data: bytes) -> None:
    r = Reader(data)
    doc, raw = _yaml_input(r, seeds.ANSWERS)
    check_answers(doc, raw)


def check_answers(doc: Any = None, raw: bytes | None = None) -> None:
    """parse_answers(doc), or load_answers of a file: answers whose repr hides the token, or a
    SetupError naming the answer at fault and showing no token."""
    try:
        got = parse_answers(materialize(doc)) if raw is None else load_answers(scratch("answers.yaml", raw))
    except SetupError as e:
        if not isinstance(e.field, str) or not e.field or not str(e).startswith(f"{e.field}: ") or not e.reason:
            raise Bug(f"SetupError without a field and reason: {e!r}") from None
        secrets, public = split_secrets(doc, ("token",))
        no_leak(f"{e} {e.hint or ''}", secrets, public)
        return
    secrets, public = split_secrets(doc, ("token",))
    no_leak(repr(got), secrets, public)  # a ClusterAnswer's repr never shows its token
