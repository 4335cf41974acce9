"""The plan's policy section: policies and endpoints -> what the node's policy maps hold (pure).

Identities. Endpoints with the same cluster and labels share one identity: a number derived
from a hash of that label set (so it is the same on every node and across restarts, and maps do
not churn when another label set appears), probed on a collision in a fixed order. Each CIDR a
rule names gets one too, and so does each pod CIDR (its addresses whose endpoint is not known yet). The ipcache maps every endpoint's /32, every rule CIDR and every
pod CIDR to its identity (the longest prefix wins in the kernel's LPM trie). An address nothing
covers is WORLD; one in a pod CIDR with no endpoint known is that CIDR's "unknown" identity,
which matches no selector and no cluster (denied where a policy selects, until learnt).

Verdicts. For each local endpoint and each direction some policy selects it in, for each
protocol, the plan decides (as clustermesh.decide, the reference, but only over the rules
whose peer can match: agent.policy_index) every identity at every port interval the rules
distinguish, merges equal neighbours, makes the most common answer the
interval list's default and the most common list the entry for ANY_IDENTITY, and writes only
the identities that differ from it. `emulate` reads the result back as the datapath does, which
is what `wiremesh policy check` prints and what the tests hold against the reference.
"""

from __future__ import annotations

import hashlib
import ipaddress
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wiremesh.clustermesh import Decision, FlowEnd, Policy, selecting
from wiremesh.tunnels import Interval, PolicyMaps, RuleEntry, RuleKey, policy_model as pm

from .policy_index import Cand, RuleIndex

DIRS = {"ingress": pm.INGRESS, "egress": pm.EGRESS}
_PORT_MAX = 65535


class PolicyTooFine(Exception):
    """An endpoint's rules for one peer and protocol need more port intervals than the datapath holds."""


@dataclass(frozen=True, slots=True)
class LocalEndpoint:
    ifindex: int  # the host side of its veth
    ip: str
    labels: Mapping[str, str]
    host_ifname: str = ""  # (that veth's name: the CNI plugin waits for it, tunnels.policy_ready)


@dataclass(frozen=True, slots=True)
class PolicyInputs:
    cluster: str
    local: Sequence[LocalEndpoint]
    endpoints: Mapping[str, tuple[str, Mapping[str, str]]]  # every endpoint's IP -> (cluster, labels)
    policies: Sequence[Policy]
    pod_cidrs: Sequence[str] = ()  # every cluster's pod CIDR (addresses there are UNKNOWN until learnt)


@dataclass(frozen=True, slots=True)
class PolicyPlan:
    maps: PolicyMaps
    rule_names: Mapping[int, str] = field(default_factory=dict)  # rule id -> "cluster/policy ingress[i]"
    rule_verdicts: Mapping[int, str] = field(default_factory=dict)  # rule id -> "allow" | "deny"
    skipped: Mapping[str, str] = field(default_factory=dict)  # endpoint ip -> why it is not enforced


def _label_key(cluster: str, labels: Mapping[str, str]) -> str:
    return cluster + "\0" + "\0".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _hash_id(text: str) -> int:
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF
    return max(h, pm.FIRST_IDENTITY)


def allocate(keys: Iterable[str]) -> dict[str, int]:
    """Identity per key: its hash, probed upwards on a collision (keys in sorted order)."""
    out: dict[str, int] = {}
    used: set[int] = set()
    for k in sorted(set(keys)):
        i = _hash_id(k)
        while i in used or i == pm.ANY_IDENTITY:
            i = pm.FIRST_IDENTITY if i >= 0x7FFFFFFF else i + 1
        used.add(i)
        out[k] = i
    return out


def rule_id(name: str) -> int:
    """A rule's id in counters and events (0 is the default deny)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") or 1


def _cidrs(policies: Iterable[Policy]) -> set[ipaddress.IPv4Network]:
    out: set[ipaddress.IPv4Network] = set()
    for p in policies:
        for r in (*p.ingress, *p.egress):
            if r.peer is not None:
                out.update(r.peer.cidrs)
    return out


class _Nets:
    """The rule CIDRs and pod CIDRs, sorted by first address: those inside a net by bisection."""

    def __init__(self, nets: Iterable[ipaddress.IPv4Network]) -> None:
        self.nets = sorted(set(nets), key=lambda n: (int(n.network_address), n.prefixlen))
        self.starts = [int(n.network_address) for n in self.nets]

    def inside(self, net: ipaddress.IPv4Network) -> str | None:
        """An address of `net` in none of the nets strictly inside it (those have their own
        identity in the LPM trie): the one the reference is asked about for `net`'s identity.
        None when they cover all of it (its identity then never shows)."""
        lo, hi = int(net.network_address), int(net.broadcast_address)
        inner = [n for n in self.nets[bisect_left(self.starts, lo):bisect_right(self.starts, hi)]
                 if n.prefixlen > net.prefixlen]
        free = lo  # the first address not covered so far (inner is sorted by first address)
        for n in inner:
            start, end = int(n.network_address), int(n.broadcast_address)
            if start > free:
                break
            free = max(free, end + 1)
        return str(ipaddress.IPv4Address(free)) if free <= hi else None


def _cuts(policies: Sequence[Policy], direction: str, proto: str) -> list[int]:
    cuts = {1, _PORT_MAX + 1}
    for p in policies:
        for r in p.rules(direction):
            for pr in r.ports:
                if pr.port and pr.protocol in (proto, "any"):
                    cuts.update((pr.port, pr.end_port + 1))
    return sorted(cuts)


def _entry(decisions: list[tuple[int, int, Decision]], ids: _RuleIds, direction: str) -> RuleEntry:
    """Port segments (lo, hi, decision) -> intervals + the most common answer as the default."""
    merged: list[tuple[int, int, tuple[int, int]]] = []
    for lo, hi, d in decisions:
        word = (pm.ALLOW if d.allowed else pm.DENY, ids.of(d, direction))
        if merged and merged[-1][2] == word and merged[-1][1] + 1 == lo:
            merged[-1] = (merged[-1][0], hi, word)
        else:
            merged.append((lo, hi, word))
    weight: Counter[tuple[int, int]] = Counter()
    for lo, hi, w in merged:
        weight[w] += hi - lo + 1
    default = max(weight, key=lambda w: (weight[w], w))
    ivs = tuple(Interval(lo, hi, w[0], w[1]) for lo, hi, w in merged if w != default)
    if len(ivs) > pm.MAX_INTERVALS:
        raise PolicyTooFine(f"{len(ivs)} port intervals (the datapath holds {pm.MAX_INTERVALS})")
    return RuleEntry(ivs, default[0], default[1])


class _RuleIds:
    """Each deciding rule's id (counters, events) with its name and verdict, as the plan meets them.
    Ids are a hash of the name: the same on every node and across restarts."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.verdicts: dict[int, str] = {}

    def of(self, d: Decision, direction: str) -> int:
        if d.rule < 0:
            return 0  # the default deny
        name = f"{d.policy} {direction}[{d.rule}]"
        rid = rule_id(name)
        self.names[rid] = name
        self.verdicts[rid] = "allow" if d.allowed else "deny"
        return rid


def plan_policy(inp: PolicyInputs) -> PolicyPlan:
    groups = {ip: _label_key(c, labels) for ip, (c, labels) in inp.endpoints.items()}
    for ep in inp.local:
        groups[ep.ip] = _label_key(inp.cluster, ep.labels)
    cidrs = _cidrs(inp.policies)
    pods = sorted({ipaddress.IPv4Network(c) for c in inp.pod_cidrs}, key=str)
    ids = allocate([*groups.values(), *(f"cidr:{c}" for c in cidrs), *(f"unknown:{c}" for c in pods)])
    ipcache: dict[ipaddress.IPv4Network, int] = {}
    for c in cidrs:
        ipcache[c] = ids[f"cidr:{c}"]
    for c in pods:  # (a rule naming a pod CIDR itself matches none of it: its addresses are pods)
        ipcache[c] = ids[f"unknown:{c}"]
    for ip, key in groups.items():
        ipcache[ipaddress.IPv4Network(f"{ip}/32")] = ids[key]
    # One peer per identity, as the reference sees it.
    peers: dict[int, FlowEnd] = {}
    for ip, (cl, labels) in inp.endpoints.items():
        peers.setdefault(ids[groups[ip]], FlowEnd(ip, cl, labels))
    for ep in inp.local:
        peers.setdefault(ids[groups[ep.ip]], FlowEnd(ep.ip, inp.cluster, ep.labels))
    nets = _Nets([*cidrs, *pods])
    for c in cidrs:
        rep = nets.inside(c)
        if rep is not None:
            peers[ids[f"cidr:{c}"]] = FlowEnd(rep, "", None)
    for c in pods:
        rep = nets.inside(c)
        if rep is not None:
            peers[ids[f"unknown:{c}"]] = FlowEnd(rep, "", None)
    world = nets.inside(ipaddress.IPv4Network("0.0.0.0/0"))
    if world is not None:
        peers[pm.WORLD_IDENTITY] = FlowEnd(world, "", None)

    rule_ids = _RuleIds()
    endpoints: dict[int, tuple[int, int]] = {}
    rules: dict[RuleKey, RuleEntry] = {}
    skipped: dict[str, str] = {}
    unknown = frozenset(ids[f"unknown:{c}"] for c in pods)
    for ep in inp.local:
        me = FlowEnd(ep.ip, inp.cluster, ep.labels)
        selected = [(dname, dnum, chosen) for dname, dnum in DIRS.items()
                    if (chosen := selecting(inp.policies, me, dname))]
        if not selected:
            continue
        flags = 0
        for _dname, dnum, _chosen in selected:
            flags |= pm.ENFORCE_INGRESS if dnum == pm.INGRESS else pm.ENFORCE_EGRESS
        mine: dict[RuleKey, RuleEntry] = {}
        try:
            for dname, dnum, chosen in selected:
                idx = RuleIndex(chosen, dname)
                cands = {ident: idx.candidates(peer) for ident, peer in peers.items()}
                for proto, pnum in pm.PROTOCOLS.items():
                    mine.update(_proto_entries(ep.ifindex, idx, cands, dnum, proto, pnum, rule_ids, unknown))
        except PolicyTooFine as e:
            # Closed, never open: the endpoint's selected directions deny everything until its
            # policies are simpler (left out of the maps, its veth would pass all).
            skipped[ep.ip] = f"{e}: everything denied to it in its selected directions until its policies are simpler"
            mine = {RuleKey(ep.ifindex, pm.ANY_IDENTITY, pnum, dnum): RuleEntry((), pm.DENY, 0)
                    for _dname, dnum, _chosen in selected for pnum in pm.PROTOCOLS.values()}
        endpoints[ep.ifindex] = (ep.ifindex, flags)
        rules.update(mine)
    return PolicyPlan(PolicyMaps(ipcache, endpoints, rules), rule_ids.names, rule_ids.verdicts, skipped)


def _proto_entries(ifindex: int, idx: RuleIndex, cands: Mapping[int, tuple[Cand, ...]], dnum: int, proto: str,
                   pnum: int, names: _RuleIds, unknown: frozenset[int] = frozenset()) -> dict[RuleKey, RuleEntry]:
    """One endpoint's entries for one direction and protocol. An address in a pod CIDR whose
    endpoint is not known yet (`unknown`) is denied outright: it may be a pod a deny rule names."""
    cuts = _cuts(idx.chosen, idx.direction, proto) if proto in ("tcp", "udp") else [0, 1]
    memo: dict[tuple[Cand, ...], RuleEntry] = {}  # identities whose peer matches the same rules decide alike
    per_identity: dict[int, RuleEntry] = {}
    for ident, cs in cands.items():
        if ident in unknown:
            per_identity[ident] = RuleEntry((), pm.DENY, 0)
            continue
        e = memo.get(cs)
        if e is None:
            segs = [(lo, nxt - 1, idx.decide(cs, proto, lo)) for lo, nxt in zip(cuts, cuts[1:])]
            e = memo[cs] = _entry(segs, names, idx.direction)
        per_identity[ident] = e
    common = Counter(e for i, e in per_identity.items() if i not in unknown).most_common(1)
    out = {}
    if common:
        any_entry = common[0][0]
        out[RuleKey(ifindex, pm.ANY_IDENTITY, pnum, dnum)] = any_entry
        closed = not any(iv.action == pm.ALLOW for iv in any_entry.intervals) and any_entry.default_action == pm.DENY
        out.update((RuleKey(ifindex, i, pnum, dnum), e) for i, e in per_identity.items()
                   if e != any_entry and not (i in unknown and closed))
    else:  # no peer known at all: deny (selected)
        out[RuleKey(ifindex, pm.ANY_IDENTITY, pnum, dnum)] = RuleEntry((), pm.DENY, 0)
    return out


def emulate(maps: PolicyMaps, ifindex: int, peer_ip: str, protocol: str, port: int, direction: str) -> tuple[bool, int]:
    """What the datapath decides for a new flow (policy.bpf.c's lookup, in Python): (pass, rule id)."""
    ep = maps.endpoints.get(ifindex)
    dnum = DIRS[direction]
    if ep is None or not ep[1] & (pm.ENFORCE_INGRESS if dnum == pm.INGRESS else pm.ENFORCE_EGRESS):
        return True, 0
    addr = ipaddress.ip_address(peer_ip)
    best = max((n for n in maps.ipcache if addr in n), key=lambda n: n.prefixlen, default=None)
    ident = maps.ipcache[best] if best is not None else pm.WORLD_IDENTITY
    pnum = pm.PROTOCOLS.get(protocol, 0)
    e = maps.rules.get(RuleKey(ep[0], ident, pnum, dnum)) or maps.rules.get(RuleKey(ep[0], pm.ANY_IDENTITY, pnum, dnum))
    if e is None:
        return False, 0
    for iv in e.intervals:
        if iv.lo <= port <= iv.hi:
            return iv.action == pm.ALLOW, iv.rule
    return e.default_action == pm.ALLOW, e.default_rule


def policy_inputs(cluster: str, node: str, pods: Sequence[LocalEndpoint], policies: Iterable[Policy],
                  endpoints: Mapping[str, Mapping[str, Any]], pod_cidrs: Sequence[str]) -> PolicyInputs:
    """The plan's view of network policy: this node's pods and every endpoint of the mesh
    (`endpoints`: cluster -> node -> its EndpointsRecord), each with the built-in labels
    `cluster` and `node`."""
    everyone: dict[str, tuple[str, Mapping[str, str]]] = {}
    for c, by_node in sorted(endpoints.items()):
        for n, rec in sorted(by_node.items()):
            for e in rec.endpoints:
                everyone[e.ip] = (c, {**e.labels, "cluster": c, "node": n})
    local = [LocalEndpoint(p.ifindex, p.ip, {**p.labels, "cluster": cluster, "node": node}) for p in pods]
    for p in local:
        everyone[p.ip] = (cluster, p.labels)
    return PolicyInputs(cluster, local, everyone, list(policies), tuple(pod_cidrs))


def identities_of(sets: Sequence[tuple[str, Mapping[str, str]]]) -> list[int]:
    """The identity of each (cluster, labels) as the plan numbers it (`wiremesh endpoint list`)."""
    keys = [_label_key(c, labels) for c, labels in sets]
    ids = allocate(keys)
    return [ids[k] for k in keys]
