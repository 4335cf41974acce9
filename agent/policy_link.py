"""Network policy on the node: the datapath's loading, the pass's target, the endpoints it publishes.

- `load_policy`: the tc programs and pinned maps (tunnels.PolicyDatapath), adopted after a
  restart (pinned maps keep enforcing meanwhile); None where eBPF is unavailable (logged once).
- `local_pods`: this node's pods as the CNI plugin recorded them, with their veths' ifindex.
- `PolicyTarget`: the reconciler's step: the maps first (so a new pod is enforced from its first
  packet), then the programs onto veths that lack them.
- `EndpointsPublisher`: this node's endpoints record in Consul (signed by its identity),
  written through the writer thread only when it changed.
- `VerdictCollector`: `wiremesh_policy_verdicts_total{rule, verdict}` in /metrics, read from the
  programs' per-rule counters at each scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, Metric

from wiremesh.clustermesh import EndpointEntry, EndpointsRecord, layout, sign_endpoints
from wiremesh.keys import NodeIdentity
from wiremesh.tunnels import BpfError, CniState, PolicyDatapath, PolicyMaps, TunnelError, link_index

from .kvwriter import Writer
from .policy_plan import LocalEndpoint

log = logging.getLogger("wiremesh.policy")


def load_policy(pin_dir: Path) -> PolicyDatapath | None:
    try:
        dp = PolicyDatapath(pin_dir).load_or_adopt()
    except BpfError as e:
        log.warning("network policy not enforced on this node: %s", e)
        return None
    log.info("network policy datapath loaded (maps pinned in %s)", pin_dir)
    return dp


def local_pods(cni: CniState) -> tuple[LocalEndpoint, ...]:
    out = []
    for a in cni.attachments():
        try:
            idx = link_index(a.host_ifname)
        except TunnelError:
            continue  # (its veth is gone: the CNI DEL is on its way)
        out.append(LocalEndpoint(idx, a.address.split("/")[0], dict(a.labels), a.host_ifname))
    return tuple(sorted(out, key=lambda p: p.ifindex))


class PolicyTarget:
    """The policy maps and the programs on pod veths, as the pass plans them."""

    def __init__(self, dp: PolicyDatapath, on_synced: Callable[[frozenset[int]], None] = lambda _v: None) -> None:
        """`on_synced(veths)`: called after every sync that left `veths` (ifindexes) under policy."""
        self.dp = dp
        self.on_synced = on_synced
        self._applied: tuple[PolicyMaps, frozenset[int]] | None = None
        self._attached: set[int] = set()

    def forget(self) -> None:
        self._applied = None
        self._attached.clear()

    def sync(self, maps: PolicyMaps, veths: frozenset[int], full: bool) -> int:
        """Errors (0: all applied)."""
        if not full and self._applied == (maps, veths):
            return 0
        try:
            report = self.dp.sync(maps)
            for ifindex in sorted(veths):
                if full or ifindex not in self._attached:
                    self.dp.attach(ifindex)
            self._attached = set(veths)
        except (BpfError, TunnelError) as e:
            log.warning("network policy: %s (tried again on the next pass)", e)
            self._applied = None
            return 1
        self.on_synced(veths)
        if report.written or report.deleted:
            log.info("network policy: %d map entries written, %d removed (%d endpoints enforced)",
                     report.written, report.deleted, len(maps.endpoints))
        self._applied = (maps, veths)
        return 0


class EndpointsPublisher:
    """This node's endpoints record, written when it changed (the writer thread keeps the newest)."""

    def __init__(self, cluster: str, node: str, writer: Writer, identity: NodeIdentity | None) -> None:
        self.cluster, self.node, self.writer, self.identity = cluster, node, writer, identity
        self._written: tuple[EndpointEntry, ...] | None = None

    def publish(self, pods: tuple[LocalEndpoint, ...]) -> None:
        """Called every pass: builds, signs and hands over a record only when the pods changed."""
        entries = tuple(EndpointEntry(p.ip, dict(p.labels)) for p in pods)
        if entries == self._written:
            return
        rec = sign_endpoints(EndpointsRecord(self.node, self.cluster, entries), self.identity)
        self.writer.put(layout.endpoints_key(self.cluster, self.node), rec.to_json())
        self._written = entries


class VerdictCollector:
    """Packets of new flows each rule decided (the datapath counts them per rule id; the last plan
    names them). Rule id 0 is the default deny of an endpoint a policy selects."""

    def __init__(self, counts: Callable[[], Mapping[int, int]], rules: Callable[[], Mapping[int, tuple[str, str]]]) -> None:
        self.counts, self.rules = counts, rules

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily("wiremesh_policy_verdicts", "Packets of new flows decided by network policy, by "
                                  "the deciding rule", labels=["rule", "verdict"])
        try:
            counts = self.counts()
        except (BpfError, OSError):
            counts = {}
        names = self.rules()
        for rid, n in sorted(counts.items()):
            name, verdict = names.get(rid, ("default deny", "deny") if rid == 0 else (f"rule {rid:08x} (gone)", "unknown"))
            fam.add_metric([name, verdict], n)
        yield fam
