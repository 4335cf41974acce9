"""`wiremesh status`: the cluster's nodes as Consul has them, and, on a node, its tunnels."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import click

from wiremesh.clustermesh import ConsulStore, layout
from wiremesh.keys import PublicKey
from wiremesh.errors import WiremeshError
from wiremesh.tunnels import DeviceState, open_device

from wiremesh.agent import load_config
from .output import Ctx, emit, info
from .view import collect


def _ago(ts: float, now: float) -> str:
    if not ts:
        return "never"
    s = int(now - ts)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago"


def _agent_status(bind: tuple[str, int] | None) -> dict[str, Any] | None:
    """The local agent's /status (every dataplane object), or None if it does not answer."""
    if bind is None:
        return None
    host = f"[{bind[0]}]" if ":" in bind[0] else bind[0]
    try:
        with urllib.request.urlopen(f"http://{host}:{bind[1]}/status", timeout=2) as r:  # noqa: S310 - our own agent
            data = json.loads(r.read())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError) as e:
        info(f"warning: the agent's status endpoint http://{host}:{bind[1]}/status did not answer ({e})")
        return None


def _local_device(interface: str) -> DeviceState | None:
    try:
        dev = open_device(interface, "auto")
        return dev.show() if dev.exists() else None
    except WiremeshError:
        return None


@click.command()
@click.option("--cluster", "cluster_name", default=None, help="Only this cluster (default: every cluster in Consul).")
@click.option("-i", "--interface", default="wm0", show_default=True, help="Local WireGuard device to report on.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              envvar="WIREMESH_AGENT_CONFIG", help="Take the interface and Consul from this agent.toml.")
@click.pass_obj
def status(ctx: Ctx, cluster_name: str | None, interface: str, config_path: Path | None) -> None:
    """Nodes, endpoints, key fingerprints and liveness; on a node also each peer's handshake and rx/tx."""
    consul = ctx.consul
    agent: dict[str, Any] | None = None
    if config_path:
        cfg = load_config(config_path)
        interface, consul = cfg.interface, cfg.consul
        agent = _agent_status(cfg.health_bind)
    views, _ = collect(ConsulStore(consul), only=cluster_name)
    if cluster_name and not views:
        raise WiremeshError(f"cluster {cluster_name!r}: nothing in Consul under {layout.cluster_prefix(cluster_name)}")
    device = _local_device(interface)
    peers = device.peers if device else {}
    now = time.time()
    out: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    nexts: dict[str, tuple[str, str]] = {}  # announced next key -> (cluster, node): staged on the device
    for v in views:
        if v.snapshot is None:
            info(f"warning: cluster {v.name} (datacenter {v.datacenter}) unreachable: {v.error}")
            continue
        for r in v.snapshot.rejected:
            info(f"warning: skipped invalid record {r.key}: {r.reason}")
        for name, rec in sorted(v.snapshot.nodes.items()):
            if rec.next_public_key:
                nexts[rec.next_public_key] = (v.name, name)
            item = v.items[layout.node_key(v.name, name)]
            local = device is not None and device.public_key == rec.public_key
            p = peers.get(rec.public_key)
            d: dict[str, Any] = {
                "cluster": v.name, "datacenter": v.datacenter or "local", "node": name, "endpoint": rec.endpoint,
                "pod_cidr": rec.pod_cidr, "overlay_ip": rec.overlay_ip, "public_key": rec.public_key,
                "fingerprint": PublicKey.from_base64(rec.public_key).fingerprint,
                "alive": bool(item.session), "local": local, "agent_version": rec.agent_version,
            }
            if p is not None:
                d.update(latest_handshake=p.latest_handshake, rx_bytes=p.rx_bytes, tx_bytes=p.tx_bytes,
                         peer_endpoint=p.endpoint)
            out.append(d)
            tunnel = "self" if local else (
                f"hs {_ago(p.latest_handshake, now)}, rx {p.rx_bytes} tx {p.tx_bytes}" if p else ("-" if device is None else "no peer"))
            rows.append([v.name, name, rec.endpoint, rec.overlay_ip, d["fingerprint"], "alive" if d["alive"] else "stale", tunnel])
    if device is not None:
        known = {d["public_key"] for d in out}
        for key, p in sorted(peers.items()):
            if key in nexts:  # a rotating node's next key, staged (locked) until it switches
                c, n = nexts[key]
                out.append({"cluster": c, "node": n, "public_key": key, "peer_endpoint": p.endpoint, "staged": True,
                            "latest_handshake": p.latest_handshake, "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes})
                rows.append([c, f"{n} (next key)", p.endpoint or "-", "-", PublicKey.from_base64(key).fingerprint,
                             "staged", f"rx {p.rx_bytes}"])
            elif key not in known:
                out.append({"node": None, "public_key": key, "peer_endpoint": p.endpoint, "orphan": True,
                            "latest_handshake": p.latest_handshake, "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes})
                rows.append(["?", "(no record)", p.endpoint or "-", ",".join(sorted(p.allowed_ips)),
                             PublicKey.from_base64(key).fingerprint, "orphan", f"hs {_ago(p.latest_handshake, now)}"])
    errors = agent.get("errors", []) if agent else []
    emit(ctx, {"nodes": out, "device": device.name if device else None,
               "agent": {"objects": agent.get("kinds"), "errors": errors} if agent else None},
         ["cluster", "node", "endpoint", "overlay", "key", "liveness", "tunnel"], rows)
    for e in errors:  # what the agent could not program, each with the kernel's reason
        info(f"error: {e['kind']} {e['key']}: {e['op']} failed {e['attempts']}x: {e['message']}")
