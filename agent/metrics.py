"""The agent's Prometheus metrics and its /healthz + /metrics HTTP endpoint."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.peers_desired = Gauge("wiremesh_peers_desired", "Peers the agent wants on its device", registry=r)
        self.peers_programmed = Gauge("wiremesh_peers_programmed", "Desired peers programmed on the device", registry=r)
        self.invalid_records = Gauge("wiremesh_records_invalid", "Records skipped as invalid in the last snapshot", registry=r)
        self.invalid_records_total = Counter(
            "wiremesh_invalid_records_total", "Invalid records seen (each key and reason once)", ["reason"], registry=r
        )
        self.sync_errors_total = Counter(
            "wiremesh_sync_errors_total", "Failed syncs, by where they failed", ["stage"], registry=r
        )
        self.consul_up = Gauge("wiremesh_consul_up", "1 while the watch of Consul works", registry=r)
        self.last_sync = Gauge("wiremesh_last_sync_timestamp_seconds", "Unix time of the last good snapshot", registry=r)
        self.last_sync_age = Gauge("wiremesh_last_sync_age_seconds", "Seconds since the last good snapshot", registry=r)
        self.reconcile_seconds = Histogram(
            "wiremesh_reconcile_duration_seconds", "Time of one reconcile pass", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.peer_changes_total = Counter(
            "wiremesh_peer_changes_total", "Peer changes applied", ["op"], registry=r
        )
        self.remote_up = Gauge("wiremesh_remote_cluster_up", "1 while a federated cluster can be read",
                               ["cluster"], registry=r)
        self.session_renewals_total = Counter("wiremesh_session_renewals_total", "Consul session renewals", registry=r)
        self.registrations_total = Counter(
            "wiremesh_registrations_total", "Times the node record was (re)published", registry=r
        )
        self.objects_in_error = Gauge("wiremesh_objects_in_error",
                                      "Dataplane objects (peers, routes, ...) whose last programming failed", registry=r)
        self.pass_errors_total = Counter(
            "wiremesh_pass_errors_total", "Passes of the reconcile loop that failed, by the stage that raised",
            ["stage"], registry=r)
        # How long the loop could not answer a wake-up (one pass from its start to its end): a
        # key switch due meanwhile waits this long. Fine buckets: a switch is timed to the ms.
        self.loop_blocked_seconds = Histogram(
            "wiremesh_loop_blocked_seconds", "Time the reconcile loop was busy with one pass", registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.process_stalls_total = Counter(
            "wiremesh_process_stalls_total", "Times the whole agent process stood still for 2 s or more", registry=r)
        self._last_sync_mono: float | None = None
        self.last_sync_age.set_function(self._age)

    def _age(self) -> float:
        return -1.0 if self._last_sync_mono is None else time.monotonic() - self._last_sync_mono

    def synced(self) -> None:
        self._last_sync_mono = time.monotonic()
        self.last_sync.set(time.time())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def serve(
    address: tuple[str, int],
    metrics: AgentMetrics,
    health: Callable[[], tuple[bool, dict[str, Any]]],
    peers: Callable[[], list[dict[str, Any]]],
    objects: Callable[[], dict[str, Any]] | None = None,
) -> ThreadingHTTPServer:
    """Start the HTTP endpoint in a daemon thread and return the server (call .shutdown()).

    /healthz: 200 once the device is up and the first snapshot is programmed, else 503.
    /metrics: Prometheus text. /peers: each desired peer's programming status, as JSON.
    /status: every dataplane object (peers, routes, VXLAN, FDB, neighbours, MTUs) with its
    status, those in error listed apart, as JSON.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/metrics":
                body, ctype, code = metrics.exposition(), CONTENT_TYPE_LATEST, 200
            elif self.path in ("/healthz", "/health"):
                ok, detail = health()
                body, ctype, code = json.dumps(detail).encode() + b"\n", "application/json", 200 if ok else 503
            elif self.path == "/peers":
                body, ctype, code = json.dumps(peers()).encode() + b"\n", "application/json", 200
            elif self.path == "/status" and objects is not None:
                body, ctype, code = json.dumps(objects()).encode() + b"\n", "application/json", 200
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet access log
            pass

    cls = ThreadingHTTPServer
    if ":" in address[0]:  # an IPv6 health address

        class V6Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        cls = V6Server
    server = cls(address, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("health and metrics on http://%s:%d/", *server.server_address[:2])
    return server


def reject_label(reason: str) -> str:
    """A metric label from a closed set: never the text a record's author chose."""
    head = reason.split(":", 1)[0].strip().split("[", 1)[0].split(".", 1)[0]
    if head in _REJECT_LABELS:
        return head
    if head.startswith("bad IPAM lease"):
        return "lease"
    if "unknown field" in reason:
        return "unknown_field"
    if "unknown key" in reason:
        return "unknown_key"
    return "other"


_REJECT_LABELS = {"schema", "value", "name", "cluster", "endpoint", "public_key", "pod_cidr", "overlay_ip", "key_epoch",
                  "vtep_mac", "agent_version", "id", "routing", "vni", "wg_port", "mtu", "service_cidr",
                  "node_prefix_len", "vip", "ports", "port", "affinity", "prefer", "next_public_key",
                  "certificate", "node_signature", "signature", "require_signed", "signing_key", "revoked",
                  "request_signature", "backend", "settings_signatures", "signing_serial", "next_signing_key"}
