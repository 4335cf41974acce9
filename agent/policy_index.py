"""Which rules can match a peer, found by index rather than by trying every rule (pure).

clustermesh.decide tries each rule of each policy for one peer: asked for every identity of the
mesh it costs identities x rules (1 000 CIDR rules took a minute to compile). Here the rules of
an endpoint's policies in one direction are indexed once by what their peer names: any peer,
selectors (tried only for endpoints, which have labels), CIDRs (looked up by prefix for
addresses that are not endpoints), clusters alone. A peer's candidates are the few rules whose
peer matches it; `decide` then applies the reference's order (policies by order, the first
matching rule of a policy, deny over allow at equal order) to those alone, with the same
result (tests/unit/test_policy_plan.py holds the compiled maps to the reference).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Sequence
from itertools import groupby

from wiremesh.clustermesh import Decision, FlowEnd, Policy, Rule, peer_matches, policy_word, resolve

Cand = tuple[int, int]  # (policy index in `chosen`, rule index in its direction)


class RuleIndex:
    def __init__(self, chosen: Sequence[Policy], direction: str) -> None:
        self.chosen, self.direction = list(chosen), direction
        self.rules: dict[Cand, Rule] = {}
        self._any: list[Cand] = []
        self._selector: list[Cand] = []
        self._clusters: dict[str, list[Cand]] = defaultdict(list)
        self._cidrs: dict[int, dict[int, list[Cand]]] = defaultdict(lambda: defaultdict(list))  # prefixlen -> net -> rules
        for pi, p in enumerate(self.chosen):
            for ri, r in enumerate(p.rules(direction)):
                c = (pi, ri)
                self.rules[c] = r
                m = r.peer
                if m is None:
                    self._any.append(c)
                elif m.selector is not None:
                    self._selector.append(c)
                elif m.cidrs:
                    for net in m.cidrs:
                        self._cidrs[net.prefixlen][int(net.network_address)].append(c)
                else:
                    for cl in m.clusters:
                        self._clusters[cl].append(c)
        self._masks = {plen: (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF for plen in self._cidrs}

    def candidates(self, peer: FlowEnd) -> tuple[Cand, ...]:
        """The rules whose peer matches `peer` (any port), in evaluation order."""
        out = list(self._any) + self._clusters.get(peer.cluster, [])
        if peer.labels is not None:
            out += [c for c in self._selector if peer_matches(self.rules[c].peer, peer)]
        else:
            ip = int(ipaddress.IPv4Address(peer.ip))
            for plen, nets in self._cidrs.items():
                for c in nets.get(ip & self._masks[plen], ()):
                    if peer_matches(self.rules[c].peer, peer):
                        out.append(c)
        return tuple(sorted(set(out)))

    def decide(self, cands: tuple[Cand, ...], protocol: str, port: int) -> Decision:
        """clustermesh.decide for a peer whose matching rules are `cands` (from `candidates`)."""
        return resolve([policy_word(self.chosen[pi], ((ri, self.rules[(pi, ri)]) for ri in ris), protocol, port)
                        for pi, ris in group]
                       for _order, group in groupby(_by_policy(cands), key=lambda pc: self.chosen[pc[0]].order))


def _by_policy(cands: tuple[Cand, ...]) -> list[tuple[int, list[int]]]:
    """(policy index, its rule indexes) in `chosen` order (chosen is sorted by order, then name)."""
    out: list[tuple[int, list[int]]] = []
    for pi, ri in cands:
        if out and out[-1][0] == pi:
            out[-1][1].append(ri)
        else:
            out.append((pi, [ri]))
    return out
