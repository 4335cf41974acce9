"""What policy says about one flow, and which rule says it (pure).

This is the reference the datapath's compiled maps are built from and checked against
(`wiremesh policy check` prints it): for a flow from endpoint A to endpoint B on a protocol and
port, A's egress and B's ingress are each decided alone, and the flow passes when both allow.

One direction of one endpoint:
  1. The policies that select the endpoint and apply in that direction (a cluster's policies
     select only that cluster's endpoints; mesh-wide ones every cluster's). None: allow
     ("no policy selects it").
  2. By `order`, then name. Within a policy the first rule whose peer and port match decides
     that policy's word. Among the policies of one order, a `deny` wins over an `allow`; the
     first order with a word decides.
  3. No rule matched at all: deny ("default deny": selected endpoints allow only what a rule
     allows).

An endpoint's peer is described by its labels (None: an address no endpoint holds), its IP and
its cluster. A rule's `cidrs` match only such addresses, never an endpoint (as Cilium's
fromCIDR/toCIDR): endpoints are named by labels, so a policy does not change meaning when a pod
moves to another node's CIDR.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby

from .policy import PeerMatch, Policy, Rule

NO_POLICY = "no policy selects it"
DEFAULT_DENY = "default deny: selected, and no rule allows it"


@dataclass(frozen=True, slots=True)
class FlowEnd:
    """One end of a flow as policy sees it."""

    ip: str
    cluster: str
    labels: Mapping[str, str] | None  # None: not an endpoint (its labels unknown)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str = ""  # "cluster/name" or "mesh/name" of the deciding policy ("" for none)
    rule: int = -1  # index of the deciding rule in its direction (-1: none)
    reason: str = ""

    def describe(self, direction: str) -> str:
        word = "allow" if self.allowed else "deny"
        if self.rule >= 0:
            return f"{word} by {self.policy} {direction}[{self.rule}]"
        return f"{word} ({self.reason})"


@dataclass(frozen=True, slots=True)
class FlowVerdict:
    egress: Decision
    ingress: Decision

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed


def policy_id(p: Policy) -> str:
    return f"{p.cluster or 'mesh'}/{p.name}"


def selecting(policies: Iterable[Policy], ep: FlowEnd, direction: str) -> list[Policy]:
    """The policies that apply to `ep` in `direction`, in evaluation order."""
    labels = ep.labels or {}
    out = [p for p in policies if (not p.cluster or p.cluster == ep.cluster) and p.applies(direction)
           and ep.labels is not None and p.selector.matches(labels)]
    return sorted(out, key=lambda p: (p.order, p.name, p.cluster))


def peer_matches(m: PeerMatch | None, peer: FlowEnd) -> bool:
    if m is None:
        return True
    if m.selector is not None and (peer.labels is None or not m.selector.matches(peer.labels)):
        return False
    if m.cidrs:  # addresses outside the mesh's endpoints only (Cilium's fromCIDR/toCIDR)
        if peer.labels is not None:
            return False
        ip = ipaddress.ip_address(peer.ip)
        if not any(ip in c for c in m.cidrs):
            return False
    return not m.clusters or peer.cluster in m.clusters


def decide(policies: Iterable[Policy], ep: FlowEnd, peer: FlowEnd, direction: str,
           protocol: str, port: int) -> Decision:
    """One direction of one endpoint (see the module's docstring)."""
    chosen = selecting(policies, ep, direction)
    if not chosen:
        return Decision(True, reason=NO_POLICY)
    return resolve([policy_word(p, ((i, r) for i, r in enumerate(p.rules(direction)) if peer_matches(r.peer, peer)),
                                protocol, port) for p in group]
                   for _order, group in groupby(chosen, key=lambda p: p.order))


def policy_word(p: Policy, rules: Iterable[tuple[int, Rule]], protocol: str, port: int) -> Decision | None:
    """A policy's word on a flow: the first of `rules` (index, rule; their peer matches) whose
    ports match it; None when none does."""
    for i, r in rules:
        if not r.ports or any(pr.matches(protocol, port) for pr in r.ports):
            return Decision(r.action == "allow", policy_id(p), i)
    return None


def resolve(orders: Iterable[Iterable[Decision | None]]) -> Decision:
    """The verdict from the selecting policies' words, one group per order, lowest first: in the
    first group with a word a deny wins, else an allow; no word at all is the default deny."""
    for words in orders:
        said = [w for w in words if w is not None]
        denied = [w for w in said if not w.allowed]
        if denied:
            return denied[0]
        if said:
            return said[0]
    return Decision(False, reason=DEFAULT_DENY)


def flow(policies: Iterable[Policy], src: FlowEnd, dst: FlowEnd, protocol: str, port: int) -> FlowVerdict:
    """A new flow from `src` to `dst`: the source's egress and the destination's ingress."""
    ps = list(policies)
    return FlowVerdict(decide(ps, src, dst, "egress", protocol, port), decide(ps, dst, src, "ingress", protocol, port))
