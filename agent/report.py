"""What the agent reports about its dataplane objects: /peers and /status."""

from __future__ import annotations

from typing import Any

from .planner import DesiredState
from .reconciler import Reconciler


def peer_report(reconciler: Reconciler, desired: DesiredState | None) -> list[dict[str, Any]]:
    """Each desired peer (by node) and its programming status: /peers."""
    peers = desired.peers if desired else {}
    return [
        {"node": node, "public_key": peers[node].public_key if node in peers else None, "state": st.state,
         "message": st.message, "programmed_at": st.done_at}
        for node, st in sorted(reconciler.snapshot().items())
    ]


def object_report(reconciler: Reconciler, node: str, cluster: str, threads: list[str]) -> dict[str, Any]:
    """Every dataplane object's status, by kind (/status): what `wiremesh status` shows in error."""
    objects = [o.as_dict() for o in reconciler.objects()]
    kinds: dict[str, dict[str, int]] = {}
    for o in objects:
        kinds.setdefault(o["kind"], {"pending": 0, "done": 0, "error": 0})[o["state"]] += 1
    return {"node": node, "cluster": cluster, "kinds": kinds, "errors": [o for o in objects if o["state"] == "error"],
            "objects": objects, "threads": threads}
