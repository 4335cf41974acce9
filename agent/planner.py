"""Records -> desired dataplane state. A pure function: no I/O, no clock, no randomness.

Two routing modes (ClusterConfig.routing):

- `wireguard`: a remote node's pod CIDR is routed into the WireGuard device, and is in that
  peer's allowed IPs.
- `vxlan`: a remote pod CIDR is routed into the VXLAN device, on-link via the remote node's
  VXLAN gateway address (its pod CIDR's network address), whose MAC comes from a permanent
  neighbour entry and whose VTEP from an FDB entry. Only the remote VTEP (its overlay
  address, /32) is routed into WireGuard, so every VXLAN packet is encrypted.

Allowed IPs are the peer's whole pod CIDR in both modes: switching modes then only moves
routes (each replaced in one step), and a node that switched a moment before its peer is
still accepted by it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from wiremesh.clustermesh import ClusterConfig, ClusterSnapshot, NodeRecord, overlay_address
from wiremesh.keys import PrivateKey
from wiremesh.keys import peer_key
from wiremesh.tunnels import Backend as LBBackend
from wiremesh.tunnels import Frontend, PeerConfig, PolicyMaps, Route, VxlanSpec, vtep_mac

from .federation import FederationView
from .policy_plan import LocalEndpoint, plan_policy, policy_inputs
from .service_plan import BackendsView, certified_places, plan_services

WIREGUARD_OVERHEAD = 80  # outer IPv6 header 40 + UDP 8 + WireGuard data header 16 + auth tag 16
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
MIN_MTU = 1280


@dataclass(frozen=True, slots=True)
class Mtus:
    wireguard: int | None  # the WireGuard device
    pod: int | None  # VXLAN device and every pod veth


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """The WireGuard device's identity: the private key it holds and its listen port.

    The key is this node's current one, or its next one from the switch time of its rotation
    on: a key switch is one change of the desired device like any other."""

    private_key: PrivateKey
    listen_port: int

    @property
    def public_key(self) -> str:
        return self.private_key.public_key().base64


@dataclass(frozen=True, slots=True)
class DesiredState:
    """What the node's dataplane should hold."""

    device: DeviceSpec | None = None  # None: leave the device's key and port as they are
    peers: dict[str, PeerConfig] = field(default_factory=dict)  # by node ("cluster/node"); key is an attribute
    # Rotating nodes' announced next keys, by node: a second, locked peer entry each (no allowed
    # IPs) on which the node's first handshake with its new key proves its switch (agent.staged).
    staged: dict[str, PeerConfig] = field(default_factory=dict)
    routes: frozenset[Route] = frozenset()
    address: str | None = None  # the local overlay address, as CIDR on the WireGuard device
    mtu: int | None = None  # of the WireGuard device
    pod_mtu: int | None = None
    vxlan: VxlanSpec | None = None  # None: no VXLAN device (wireguard mode)
    fdb: Mapping[str, str] = field(default_factory=dict)  # VTEP MAC -> remote overlay address
    neighbours: Mapping[str, str] = field(default_factory=dict)  # remote VXLAN gateway -> MAC
    skipped: tuple[str, ...] = ()  # nodes left out of the VXLAN overlay, with the reason
    # What pruning must leave alone: pod CIDRs of federated clusters not seen yet and, while
    # the mesh membership itself is unknown, everything outside the local cluster's range.
    keep_cidrs: frozenset[str] = frozenset()
    keep_foreign: bool = False
    local_range: str | None = None
    # Global services (agent.service_plan): frontend -> backends, and frontends left as they are.
    services: Mapping[Frontend, tuple[LBBackend, ...]] = field(default_factory=dict)
    keep_services: frozenset[Frontend] = frozenset()
    # Network policy (agent.policy_plan): the maps' content (None: no datapath), the pods' veths.
    policy: PolicyMaps | None = None
    policy_veths: frozenset[int] = frozenset()
    policy_rules: Mapping[int, tuple[str, str]] = field(default_factory=dict)  # rule id -> (name, verdict)

    def kept(self, cidr: str) -> bool:
        """True if a peer or route for `cidr` must survive pruning although it is not desired."""
        net = ipaddress.ip_network(cidr, strict=False)
        for k in self.keep_cidrs:
            kn = ipaddress.ip_network(k)
            if kn.version == net.version and net.subnet_of(kn):  # type: ignore[arg-type]
                return True
        if self.keep_foreign and self.local_range:
            local = ipaddress.ip_network(self.local_range)
            return not (local.version == net.version and net.subnet_of(local))  # type: ignore[arg-type]
        return False


def node_id(cluster: str, node: str) -> str:
    """A peer's identity: its cluster and node name. Its public key is an attribute that may change."""
    return f"{cluster}/{node}"


def gateway_address(pod_cidr: str) -> str:
    """A node's VXLAN gateway: the network address of its pod CIDR (as flannel does)."""
    return str(ipaddress.ip_network(pod_cidr).network_address)


def mtus(config: ClusterConfig, underlay_mtu: int | None) -> Mtus:
    """WireGuard device and pod MTUs for the cluster's routing mode.

    The cluster's `mtu`, when set, is what pods get; otherwise it is derived from the underlay:
    WireGuard takes 80 bytes, VXLAN inside it 50 more.
    """
    extra = VXLAN_OVERHEAD if config.routing == "vxlan" else 0
    if config.mtu:
        return Mtus(config.mtu + extra, config.mtu)
    if not underlay_mtu:
        return Mtus(None, None)
    wg = max(MIN_MTU + extra, underlay_mtu - WIREGUARD_OVERHEAD)
    return Mtus(wg, wg - extra)


@dataclass(frozen=True, slots=True)
class LocalNode:
    """This node as the pass sees it: its settings, its key, what it leased."""

    name: str
    cluster: str
    config: ClusterConfig
    device: DeviceSpec
    pod_cidr: str | None
    underlay_mtu: int | None = None
    persistent_keepalive: int = 0
    wg_device: str = "wm0"
    vxlan_device: str = "wm-vxlan"


@dataclass(frozen=True, slots=True)
class PassInputs:
    """Everything one pass plans from, gathered by each input's owner into one frozen value.

    `backends` is None on a node without the eBPF service lookup (no services planned)."""

    local: LocalNode
    snapshot: ClusterSnapshot
    federation: FederationView
    backends: BackendsView | None = None
    now_ms: int = 0
    proven_keys: frozenset[str] = frozenset()  # next keys their nodes are seen to use (agent.staged)
    # Nodes whose records vanished from Consul a moment ago, planned from their last record for
    # a short hold (agent.departures): a node whose session lapsed while its agent restarted
    # slowly registers again within it, and its tunnels never drop.
    departed: Mapping[str, NodeRecord] = field(default_factory=dict)
    # This node's pods (host veth ifindex, IP, labels) where the policy datapath is loaded; None: not.
    pods: tuple[LocalEndpoint, ...] | None = None
    # Policy waits for every member cluster's endpoints after a start, but not for ever: a member
    # never read (its pods then unknown, denied where selected) must not stop local policy.
    policy_waits: bool = True


def plan(inputs: PassInputs, memo: dict[str, Any] | None = None) -> DesiredState:
    """The whole desired dataplane of one pass: device, peers, routes, VXLAN, MTUs, services.

    Pure: a function of `inputs` (`memo` is a cache of per-node parts between passes; it never
    changes the result)."""
    me, fed = inputs.local, inputs.federation
    nodes = with_departed(inputs.snapshot.nodes, inputs.departed)
    desired = plan_mesh(me.name, me.device.public_key, me.config, nodes,
                        local_pod_cidr=me.pod_cidr, underlay_mtu=me.underlay_mtu,
                        persistent_keepalive=me.persistent_keepalive, wg_device=me.wg_device,
                        vxlan_device=me.vxlan_device,
                        remotes={c: with_departed(ns, fed.departed.get(c, {})) for c, ns in fed.nodes.items()},
                        keep_cidrs=fed.frozen_cidrs,
                        keep_foreign=not fed.mesh_synced, memo=memo, now_ms=inputs.now_ms,
                        proven_keys=inputs.proven_keys)
    desired = replace(desired, device=me.device)
    if inputs.pods is not None:
        try:
            desired = _with_policy(desired, inputs, memo)
        except Exception as e:  # noqa: BLE001 - a policy the compiler cannot take must not stop peers and routes
            desired = replace(desired, skipped=desired.skipped + (f"policy: not planned, the maps stay as they are "
                                                                  f"({type(e).__name__}: {e})",))
    if inputs.backends is None:
        return desired
    ids = {n: m.id for n, m in fed.members.items()} | {me.cluster: me.config.id}
    signed = fed.signed | ({me.cluster} if me.config.require_signed else set())
    places = certified_places(signed, {**fed.nodes, me.cluster: inputs.snapshot.nodes}) if inputs.snapshot.services else {}
    st = plan_services(me.cluster, inputs.snapshot.services, inputs.backends, ids, places)
    return replace(desired, services=st.frontends, keep_services=st.unsettled,
                   skipped=desired.skipped + tuple(f"service {s}" for s in st.skipped))


def _with_policy(desired: DesiredState, inputs: PassInputs, memo: dict[str, Any] | None) -> DesiredState:
    """The policy section (agent.policy_plan): the maps, and the veths the programs go on. The
    last compile is reused while its inputs are equal (10 000 rules take seconds to compile)."""
    me, fed, snap = inputs.local, inputs.federation, inputs.snapshot
    assert inputs.pods is not None
    if not fed.mesh_synced or (fed.frozen_cidrs and inputs.policy_waits):
        # A remote cluster not read yet (an agent just started): its endpoints would count as
        # unknown and allowed flows from them be dropped. The maps keep enforcing as they are.
        return desired
    cidrs = [me.config.pod_cidr, *(m.pod_cidr for n, m in sorted(fed.members.items()) if n != me.cluster)]
    pi = policy_inputs(me.cluster, me.name, inputs.pods, snap.policies.values(),
                       {**fed.endpoints, me.cluster: snap.endpoints}, cidrs)
    last = memo.get("policy") if memo is not None else None
    if last is not None and last[0] == pi:
        pp = last[1]
    else:
        pp = plan_policy(pi)
        if memo is not None:
            memo["policy"] = (pi, pp)
    return replace(desired, policy=pp.maps, policy_veths=frozenset(p.ifindex for p in inputs.pods),
                   policy_rules={i: (n, pp.rule_verdicts[i]) for i, n in pp.rule_names.items()},
                   skipped=desired.skipped + tuple(f"policy for {ip}: {why}" for ip, why in sorted(pp.skipped.items())))


def with_departed(nodes: Mapping[str, NodeRecord], departed: Mapping[str, NodeRecord]) -> Mapping[str, NodeRecord]:
    """`nodes` and, after them, each departed node whose key and pod CIDR no present node holds:
    a present record always wins (a CIDR leased again, a key now another node's)."""
    if not departed:
        return nodes
    keys = {k for r in nodes.values() for k in (r.public_key, r.next_public_key) if k}
    cidrs = [ipaddress.ip_network(r.pod_cidr) for r in nodes.values()]
    out = dict(nodes)
    for name, rec in departed.items():
        net = ipaddress.ip_network(rec.pod_cidr)
        if name in nodes or rec.public_key in keys or (rec.next_public_key and rec.next_public_key in keys) or \
                any(net.version == c.version and net.overlaps(c) for c in cidrs):
            continue
        out[name] = rec
        keys.update(k for k in (rec.public_key, rec.next_public_key) if k)
        cidrs.append(net)
    return out


def plan_mesh(
    local_node: str,
    local_public_key: str,
    config: ClusterConfig,
    nodes: Mapping[str, NodeRecord],
    *,
    local_pod_cidr: str | None,
    underlay_mtu: int | None = None,
    persistent_keepalive: int = 0,
    wg_device: str = "wm0",
    vxlan_device: str = "wm-vxlan",
    remotes: Mapping[str, Mapping[str, NodeRecord]] | None = None,
    keep_cidrs: frozenset[str] = frozenset(),
    keep_foreign: bool = False,
    memo: dict[str, Any] | None = None,
    now_ms: int = 0,
    proven_keys: frozenset[str] = frozenset(),
) -> DesiredState:
    """Every other node of the cluster, and every node of every accepted federated cluster,
    becomes a peer whose allowed IPs are its pod CIDR.

    Traffic to other clusters is always routed into WireGuard, whatever the routing mode:
    VXLAN stays inside a cluster, whose nodes share its VNI. A record that carries a public
    key already taken (the local node's, or a node's seen first) is ignored: it would hijack
    that identity on the device.

    `memo` (a dict the caller keeps between calls) lets a record that is the same object as in
    the last call (the snapshot parser reuses unchanged records) reuse what it gave then.
    """
    # Without a pod CIDR of its own the node has no VTEP: it stays on plain WireGuard routes.
    vxlan_mode = config.routing == "vxlan" and local_pod_cidr is not None
    peers: dict[str, PeerConfig] = {}
    taken = {local_public_key}
    to_stage: list[tuple[str, NodeRecord, str]] = []
    routes: set[Route] = set()
    fdb: dict[str, str] = {}
    neigh: dict[str, str] = {}
    skipped: list[str] = []
    for name in sorted(nodes):
        rec = nodes[name]
        if name == local_node or rec.public_key == local_public_key:
            continue
        # A node rotating its key: the next one, from a moment after its announced switch time.
        key = peer_key(rec.public_key, rec.next_public_key, proven_keys)
        if key in taken:
            skipped.append(f"{config.name}/{name}: its public key is already in use")
            continue
        taken.add(key)
        nid = node_id(config.name, name)
        to_stage.append((nid, rec, key))
        settings = (vxlan_mode, persistent_keepalive, wg_device, vxlan_device, key)
        hit = memo.get(nid) if memo is not None else None
        if hit is not None and hit[0] is rec and hit[1] == settings:
            part = hit[2]  # the same record object (unchanged in Consul): the same objects as last time
        else:
            part = _node_part(name, rec, key, vxlan_mode, persistent_keepalive, wg_device, vxlan_device)
            if memo is not None:
                memo[nid] = (rec, settings, part)
        peer, node_routes, entries = part
        peers[nid] = peer
        routes.update(node_routes)
        if entries is not None:
            fdb[entries[0]] = entries[1]
            neigh[entries[2]] = entries[0]
        elif vxlan_mode:
            skipped.append(f"{name}: its record has no vtep_mac; routed over WireGuard instead")
    if memo is not None and len(memo) > len(peers):
        for gone in [k for k in memo if k not in peers and "/" in k]:  # (node ids; "policy" is the policy section's)
            del memo[gone]
    local_range = config.pod_network
    claimed = [ipaddress.ip_network(p.pod_cidr) for p in nodes.values()] if remotes else []
    for cluster in sorted(remotes or {}):
        for name, rec in sorted((remotes or {})[cluster].items()):
            key = peer_key(rec.public_key, rec.next_public_key, proven_keys)
            if key in taken:
                skipped.append(f"{cluster}/{name}: its public key is already in use")
                continue
            net = ipaddress.ip_network(rec.pod_cidr)
            if any(net.version == c.version and net.overlaps(c) for c in [local_range, *claimed]):
                skipped.append(f"{cluster}/{name}: pod CIDR {rec.pod_cidr} overlaps one already routed here")
                continue
            claimed.append(net)
            taken.add(key)
            to_stage.append((node_id(cluster, name), rec, key))
            peers[node_id(cluster, name)] = PeerConfig(
                public_key=key, endpoint=rec.endpoint, allowed_ips=frozenset({rec.pod_cidr}),
                persistent_keepalive=persistent_keepalive,
            )
            routes.add(Route(rec.pod_cidr, wg_device))
    staged: dict[str, PeerConfig] = {}
    for nid, rec, key in to_stage:  # after every node's own key is taken: a next key never evicts one
        _stage(nid, rec, key, taken, staged)
    m = mtus(config, underlay_mtu)
    address = vxlan = None
    if local_pod_cidr:
        overlay = overlay_address(local_pod_cidr)
        ip = ipaddress.ip_address(overlay)
        address = f"{ip}/{ip.max_prefixlen}"
        if vxlan_mode:
            vxlan = VxlanSpec(name=vxlan_device, vni=config.vni, local=overlay, mac=vtep_mac(overlay), mtu=m.pod,
                              address=f"{gateway_address(local_pod_cidr)}/32")
    return DesiredState(
        peers=peers, staged=staged, routes=frozenset(routes), address=address, mtu=m.wireguard,
        pod_mtu=m.pod, vxlan=vxlan, fdb=fdb, neighbours=neigh, skipped=tuple(skipped),
        keep_cidrs=keep_cidrs, keep_foreign=keep_foreign, local_range=config.pod_cidr,
    )


def _stage(nid: str, rec: NodeRecord, key: str, taken: set[str], staged: dict[str, PeerConfig]) -> None:
    """A next key the node announces and this peer has not taken yet: a locked peer entry."""
    nxt = rec.next_public_key
    if nxt and nxt != key and nxt not in taken:
        taken.add(nxt)
        staged[nid] = PeerConfig(public_key=nxt, endpoint=rec.endpoint, staged=True)


_Part = tuple[PeerConfig, tuple[Route, ...], tuple[str, str, str] | None]  # peer, routes, (mac, vtep, gateway)


def _node_part(name: str, rec: NodeRecord, key: str, vxlan_mode: bool, keepalive: int, wg_device: str,
               vxlan_device: str) -> _Part:
    """What one node of the local cluster adds to the desired state."""
    peer = PeerConfig(public_key=key, endpoint=rec.endpoint, allowed_ips=frozenset({rec.pod_cidr}),
                      persistent_keepalive=keepalive)
    if vxlan_mode and rec.vtep_mac:
        gw = gateway_address(rec.pod_cidr)
        return peer, (Route(f"{rec.overlay_ip}/32", wg_device), Route(rec.pod_cidr, vxlan_device, gw)), \
            (rec.vtep_mac, rec.overlay_ip, gw)
    return peer, (Route(rec.pod_cidr, wg_device),), None


def tunnel_mtu(config: ClusterConfig, underlay_mtu: int | None) -> int | None:
    """The WireGuard device's MTU (kept for callers that need only that)."""
    return mtus(config, underlay_mtu).wireguard
