"""A cluster's policy records as an agent takes them from its snapshot (pure).

`policies/<name>` select the cluster's endpoints; `mesh-policies/<name>` every cluster's (the
CLI writes them into each member's Consul). A record that fails validation, or whose signature
the cluster's key does not make where the cluster requires it, is refused with its reason, and
the last good version of that key stays in force: a policy that fails never opens anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from . import layout
from .errors import InvalidRecord
from .policy import Policy


def parse_policies(items: Mapping[str, bytes], cluster: str,
                   verify: Callable[[str, bytes, Policy], None] | None = None,
                   last: dict[str, Policy] | None = None) -> tuple[dict[str, Policy], list[tuple[str, str]]]:
    """(key -> policy, refused (key, reason)). `last` (kept by the caller between snapshots) is
    updated with the good ones and stands in for a key whose new value is refused."""
    own, mesh = layout.policies_prefix(cluster), layout.mesh_policies_prefix(cluster)
    out: dict[str, Policy] = {}
    refused: list[tuple[str, str]] = []
    for key, raw in sorted(items.items()):
        if key.startswith(own):
            name, scope = key[len(own):], cluster
        elif key.startswith(mesh):
            name, scope = key[len(mesh):], ""
        else:
            continue
        try:
            p = Policy.from_json(raw, key)
            if p.name != name:
                raise InvalidRecord("name", f"{p.name!r} does not match the key's name {name!r}", key)
            if p.cluster != scope:
                raise InvalidRecord("cluster", f"{p.cluster or 'mesh'!r} is not where it is stored "
                                               f"({scope or 'mesh'})", key)
            if verify is not None:
                verify(key, raw, p)
        except InvalidRecord as e:
            refused.append((key, str(e).removeprefix(f"{key}: ")))
            if last is not None and key in last:
                out[key] = last[key]  # (the last good version stays in force)
            continue
        out[key] = p
    if last is not None:
        last.clear()
        last.update(out)
    return out, refused
