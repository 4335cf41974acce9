"""Global services in the lab: backends in pods, their health checked by Consul itself.

`lab service add NAME --port P --pods p1,p2` defines NAME in every cluster of the lab (one VIP
wherever the clusters' service CIDRs allow it), starts lab/backend.py in each pod and registers
each with the Consul client agent of the pod's node, with an HTTP check (every 1 s, timeout 1 s)
that Consul runs against the pod's /health. `lab service fail POD` makes those checks fail (a
flag file the backends look at), `recover POD` makes them pass: Consul notices by itself, the
agents follow Consul.

Client agents: one per node that runs a backend, started by the first `service add` that puts
one there: `consul agent` in the node's network namespace, gossip on its underlay address, HTTP
on 127.0.0.1:8500 of the node only, joined to its cluster's server; data, config and log in
the node's directory.

Every process started here is recorded in the lab's state by pid before anything waits on it,
so `lab down` names and stops it (see teardown).
"""

from __future__ import annotations

import functools
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wiremesh.agent import admitted, backends_of, certified_places
from wiremesh.clustermesh import (
    AFFINITIES,
    ClusterBackends,
    ClusterSnapshot,
    ConsulError,
    ConsulOptions,
    ConsulStore,
    InvalidRecord,
    ServiceDef,
    ServicePort,
    allocate_vip,
    check_service_name,
    check_vip,
    layout,
    load_cluster_config,
    parse_cluster,
    select_backends,
    sign_service,
)
from wiremesh.keys import SigningKey

from . import consul_server, netns, signing, stop
from .errors import LabError

if TYPE_CHECKING:
    from .lab import Lab, Node

CLIENT_ADDRESS = f"http://127.0.0.1:{consul_server.HTTP_PORT}"  # a node's client agent, inside the node
CHECK_INTERVAL_S = 1.0
CHECK_TIMEOUT_S = 1.0
BACKEND = Path(__file__).with_name("backend.py")
STOP_TIMEOUT = 5.0
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def services_dir(lab: "Lab") -> Path:
    d = lab.dir / "services"
    d.mkdir(exist_ok=True)
    return d


def flag_file(lab: "Lab", pod: str) -> Path:
    """While this file exists, every backend in `pod` answers its health check with 503."""
    return services_dir(lab) / f"{pod}.failing"


def _services(lab: "Lab") -> dict[str, Any]:
    return lab.state.setdefault("services", {})  # type: ignore[no-any-return]


def service_state(lab: "Lab", name: str) -> dict[str, Any]:
    svc = lab.state.get("services", {}).get(name)
    if svc is None:
        known = ", ".join(sorted(lab.state.get("services", {}))) or "none"
        raise LabError(f"lab {lab.name}: no service {name!r} (services: {known})")
    return svc  # type: ignore[no-any-return]


def _alive(pid: int, ns: str) -> bool:
    return bool(pid) and netns.pid_alive(pid) and netns.pid_in_netns(pid, ns)


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "no log"


# --- each node's eBPF service lookup: its cgroup and pins --------------------------------------
def cgroup_root(lab: "Lab") -> Path:
    """The lab's cgroup v2 group; one child per node."""
    from wiremesh.tunnels import CGROUP2

    return CGROUP2 / "wiremesh" / lab.name


def prepare_lookup(lab: "Lab", node_name: str, progress: Progress = _quiet) -> dict[str, str]:
    """Mount bpffs and cgroup v2 (in the host's mount namespace, before the node gets its own:
    a bpffs mounted inside it would be an instance nobody else sees) and make the node's cgroup.
    Returns the Node fields `cgroup` and `pin_dir`, or {} where the machine cannot do it (the
    node then runs without global services)."""
    from wiremesh.tunnels import TunnelError, cgroup_for, ensure_cgroup2, mount_bpffs, pin_dir_for

    try:
        mount_bpffs()
        root = ensure_cgroup2()
        group = cgroup_for(Path("wiremesh") / lab.name / node_name, root)
    except (TunnelError, OSError, ValueError) as e:
        progress(f"{node_name}: no eBPF service lookup ({e})")
        return {}
    return {"cgroup": str(group), "pin_dir": str(pin_dir_for(f"{lab.name}-{node_name}"))}


def join_cgroup(node: "Node | None") -> list[str]:
    """The prefix that puts a command into the node's cgroup before it runs (it keeps its pid:
    `sh` writes its own pid, then execs)."""
    if node is None or not node.cgroup:
        return []
    procs = shlex.quote(str(Path(node.cgroup) / "cgroup.procs"))
    return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"]


def unload_lookups(lab: "Lab", progress: Progress = _quiet) -> list[str]:
    """Detach and unpin every node's eBPF lookup and remove the lab's cgroups (processes must be
    gone). Also what the state does not name: every pin directory and cgroup of the lab's name."""
    from wiremesh.tunnels import PIN_ROOT, ServiceLB, remove_cgroup, remove_policy_pins

    removed = []
    root = cgroup_root(lab)
    pins = {Path(n["pin_dir"]): Path(n.get("cgroup") or root / name)
            for name, n in lab.state.get("nodes", {}).items() if n.get("pin_dir")}
    if PIN_ROOT.is_dir():
        for d in PIN_ROOT.glob(f"{lab.name}-*"):
            pins.setdefault(d, root / d.name[len(lab.name) + 1:])
    for pin, group in sorted(pins.items()):
        if pin.exists():
            remove_policy_pins(pin)  # (network policy's maps, beside the lookup's)
            ServiceLB(pin, group).unload()
            removed.append(f"eBPF lookup {pin}")
    if root.exists():
        remove_cgroup(root)
        removed.append(f"cgroup {root}")
        try:
            root.parent.rmdir()  # /sys/fs/cgroup/unified/wiremesh, unless another lab is in it
        except OSError:
            pass
    return removed


# --- Consul client agents ------------------------------------------------------------------
def ensure_client(lab: "Lab", node_name: str, progress: Progress = _quiet, timeout: float = 30.0) -> int:
    """Start the node's Consul client agent unless it runs; return once it has joined its server."""
    if lab.state.get("acl"):
        raise LabError("lab services need Consul client agents, which a lab with --acl does not give tokens yet")
    node = lab.node(node_name)
    clients = lab.state.setdefault("consul_clients", {})
    pid: int = clients.get(node_name, 0)
    if not _alive(pid, node.netns):
        c = lab.cluster_state(node.cluster or None)
        cfg = Path(node.dir) / "consul-client.json"
        consul_server.write_client_config(cfg, datacenter=c["datacenter"], node_name=node_name,
                                          data_dir=Path(node.dir) / "consul-client-data", bind=node.underlay,
                                          join=[c["hub_ip"]])
        pid = consul_server.start(node.netns, cfg, Path(node.dir) / "consul-client.log")
        clients[node_name] = pid
        lab.save()
        progress(f"{node_name}: Consul client agent (pid {pid}), joining {c['hub_ip']}")
    store = ConsulStore(ConsulOptions(address=CLIENT_ADDRESS, timeout=2.0), retries=False)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not netns.pid_alive(pid):
            raise LabError(f"{node_name}: the Consul client agent (pid {pid}) exited: "
                           f"{_log_tail(Path(node.dir) / 'consul-client.log')}")
        try:
            if lab.executor(node.netns).call(store.leader):  # answered through the server: joined
                return pid
            last = "no leader known yet"
        except ConsulError as e:
            last = str(e)
        time.sleep(0.1)
    raise LabError(f"{node_name}: the Consul client agent did not join its server within {timeout:.0f}s ({last})")


def _client(lab: "Lab", node_name: str) -> Callable[[Callable[[ConsulStore], Any]], Any]:
    """Run `fn(store)` against a node's client agent, from inside the node."""
    store = ConsulStore(ConsulOptions(address=CLIENT_ADDRESS, timeout=3.0))
    ex = lab.executor(lab.node(node_name).netns)
    return lambda fn: ex.call(fn, store)


# --- definitions ---------------------------------------------------------------------------
def define(store: ConsulStore, cluster: str, name: str, ports: Sequence[ServicePort], affinity: str,
           prefer: Sequence[str], vip: str | None = None, signer: SigningKey | None = None) -> tuple[ServiceDef, str]:
    """What `wiremesh service create --force` does: define NAME in `cluster`, at `vip` if that is
    in the cluster's service CIDR and free there, else at the VIP it has, else at a free one;
    signed by `signer` (the cluster's signing key) if given. Returns the definition and
    "created", "updated" or "unchanged"."""
    config = load_cluster_config(store, cluster)
    _, items = store.list(layout.services_prefix(cluster))
    key = layout.service_key(cluster, name)
    current = items.get(key)
    taken: dict[str, str] = {}
    for k, item in sorted(items.items()):  # a VIP claimed twice is the first name's (as agents decide)
        try:
            if k != key:
                taken.setdefault(ServiceDef.from_json(item.value, k).vip, k.rsplit("/", 1)[1])
        except InvalidRecord:
            continue
    old = None
    if current is not None:
        try:
            old = ServiceDef.from_json(current.value, key)
        except InvalidRecord:
            old = None
    candidates = [v for v in (vip, old.vip if old else None) if v]
    chosen = None
    for v in candidates:
        try:
            check_vip(v, config.service_cidr)
        except (InvalidRecord, ValueError):
            continue
        if v not in taken:
            chosen = v
            break
    try:
        chosen = chosen or allocate_vip(config.service_cidr, list(taken))
        svc = ServiceDef(name, cluster, chosen, tuple(ports), affinity, tuple(prefer))
    except InvalidRecord as e:
        raise LabError(f"service {name} in cluster {cluster}: {e}") from None
    if signer is not None:
        svc = sign_service(svc, signer)
    if old == svc and old.signature == svc.signature:
        return svc, "unchanged"
    if not store.put(key, svc.to_json(), cas=current.modify_index if current else 0):
        raise LabError(f"service {name} in cluster {cluster}: written by someone else meanwhile; run again")
    return svc, "updated" if current else "created"


def _define(store: ConsulStore, *, cluster: str, name: str, ports: Sequence[ServicePort], affinity: str,
            prefer: Sequence[str], vip: str | None, signer: SigningKey | None = None) -> tuple[ServiceDef, str]:
    return define(store, cluster, name, ports, affinity, prefer, vip, signer)


def _definition(lab: "Lab", name: str, cluster: str) -> ServiceDef | None:
    item = lab.consul(lambda s: s.get(layout.service_key(cluster, name)), cluster)
    if item is None:
        return None
    return ServiceDef.from_json(item.value, item.key)


# --- backends ------------------------------------------------------------------------------
def _start_backend(lab: "Lab", name: str, pod: str, port: int, udp: bool, timeout: float = 10.0) -> dict[str, Any]:
    """Start lab/backend.py in `pod`; return {pid, health_port} once it listens."""
    p = lab.pods[pod]
    d = services_dir(lab)
    ready, log = d / f"{name}-{pod}.ready", d / f"{name}-{pod}.log"
    ready.unlink(missing_ok=True)
    argv = [sys.executable, str(BACKEND), "--pod", pod, "--cluster", lab.node(p.node).cluster or lab.clusters[0],
            "--port", str(port), "--flag", str(flag_file(lab, pod)), "--ready", str(ready)] + (["--udp"] if udp else [])
    with open(log, "ab") as out:
        proc = lab.popen(pod, *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    entry = {"pid": proc.pid, "health_port": 0}
    service_state(lab, name)["backends"][pod] = entry
    lab.save()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            entry["health_port"] = json.loads(ready.read_text())["health_port"]
            lab.save()
            return entry
        code = proc.poll()
        if code is not None:
            del service_state(lab, name)["backends"][pod]
            lab.save()
            raise LabError(f"service {name}: the backend in pod {pod} exited ({_log_tail(log, 1)})")
        time.sleep(0.02)
    raise LabError(f"service {name}: the backend in pod {pod} is not listening after {timeout:.0f}s ({_log_tail(log)})")


def _stop_backend(lab: "Lab", name: str, pod: str) -> None:
    """Deregister a backend from its node's client agent and stop it; gone already is fine."""
    svc = service_state(lab, name)
    entry = svc["backends"].get(pod)
    if entry is None:
        return
    node = entry.get("node") or lab.pods[pod].node
    if _alive(lab.state.get("consul_clients", {}).get(node, 0), lab.node(node).netns):
        try:
            _client(lab, node)(lambda s: s.agent_service_deregister(entry.get("service_id") or f"{name}-{pod}"))
        except ConsulError:
            pass  # the client is on its way out: it takes its services with it
    ns = lab.state.get("pods", {}).get(pod, {}).get("netns", "")
    proc = stop.find(entry.get("pid", 0), f"backend of {name} in pod {pod}",
                     belongs=lambda pid: netns.pid_in_netns(pid, ns))
    if proc:
        stop.stop([proc], timeout=STOP_TIMEOUT, kill_timeout=STOP_TIMEOUT)
    del svc["backends"][pod]
    lab.save()


def _check_port_free(lab: "Lab", name: str, pod: str, port: int, proto: str) -> None:
    for other, svc in lab.state.get("services", {}).items():
        if other != name and pod in svc.get("backends", {}) and svc["port"] == port and svc["protocol"] == proto:
            raise LabError(f"port {port}/{proto} in pod {pod} is already used by service {other!r}")


def add(lab: "Lab", name: str, port: int, pods: Sequence[str], *, affinity: str = "none",
        prefer: Sequence[str] = (), udp: bool = False, wait: bool = True, progress: Progress = _quiet) -> dict[str, Any]:
    """Define service NAME in every cluster with a backend in each of `pods`; idempotent (the
    service's backends become exactly `pods`). With `wait`, returns once Consul has every backend
    passing and every node's eBPF maps hold what its affinity chooses."""
    try:
        check_service_name(name, "NAME")
    except InvalidRecord as e:
        raise LabError(f"service name: {e.reason}") from None
    if not 1 <= port <= 65535:
        raise LabError(f"--port: {port} is not in 1-65535")
    if affinity not in AFFINITIES:
        raise LabError(f"--affinity: {affinity!r} is not one of {', '.join(AFFINITIES)}")
    if not pods or len(set(pods)) != len(pods):
        raise LabError("--pods: give one or more pods, each once")
    known = lab.pods
    for p in pods:
        if p not in known:
            raise LabError(f"--pods: no pod {p!r} in lab {lab.name} (pods: {', '.join(sorted(known)) or 'none'}); "
                           "add one with 'wiremesh lab pod add'")
    for c in prefer:
        if c not in lab.clusters:
            raise LabError(f"--prefer: no cluster {c!r} in lab {lab.name} (clusters: {', '.join(lab.clusters)})")
    proto = "udp" if udp else "tcp"
    for p in pods:
        _check_port_free(lab, name, p, port, proto)

    vips: dict[str, str] = {}
    results = []
    sport = ServicePort(port, proto)
    for c in lab.clusters:
        want = next(iter(vips.values()), None)
        svc, result = lab.consul(functools.partial(_define, cluster=c, name=name, ports=[sport], affinity=affinity,
                                                   prefer=prefer, vip=want, signer=signing.operator_key(lab, c)), c)
        vips[c] = svc.vip
        results.append(result)
    state: dict[str, Any] = _services(lab).setdefault(name, {"backends": {}})
    changed = state.get("port") != port or state.get("protocol") != proto
    state.update(port=port, protocol=proto, affinity=affinity, prefer=list(prefer), vips=vips)
    lab.save()
    for p in [p for p in state["backends"] if changed or p not in pods]:
        _stop_backend(lab, name, p)
    for p in pods:
        pod = known[p]
        entry = state["backends"].get(p)
        if entry is None or not _alive(entry["pid"], pod.netns):
            ensure_client(lab, pod.node, progress)
            entry = _start_backend(lab, name, p, port, udp)
        health_url = f"http://{pod.ip}:{entry['health_port'] or port}/health"
        entry.update(node=pod.node, service_id=f"{name}-{p}", health_url=health_url)
        _client(lab, pod.node)(functools.partial(
            ConsulStore.agent_service_register_http, name=name, url=health_url, service_id=f"{name}-{p}",
            address=pod.ip, port=port, interval_s=CHECK_INTERVAL_S, timeout_s=CHECK_TIMEOUT_S, meta={"pod": p}))
        lab.save()
    vip_text = ", ".join(f"{v} ({c})" for c, v in vips.items()) if len(set(vips.values())) > 1 else \
        next(iter(vips.values()))
    progress(f"service {name}: VIP {vip_text}, port {port}/{proto}, {policy(state)}, backends "
             f"{', '.join(pods)} ({', '.join(sorted(set(results)))})")
    if wait:
        wait_health(lab, name, {p: "passing" for p in pods})
        wait_programmed(lab, name)
    return state


def delete(lab: "Lab", name: str) -> None:
    """Stop NAME's backends, deregister them, and remove its definition from every cluster."""
    svc = service_state(lab, name)
    for p in list(svc["backends"]):
        _stop_backend(lab, name, p)
    for c in lab.clusters:
        lab.consul(functools.partial(ConsulStore.delete, key=layout.service_key(c, name)), c)
    del lab.state["services"][name]
    lab.save()


def policy(svc: dict[str, Any]) -> str:
    return f"prefer {','.join(svc['prefer'])}" if svc.get("prefer") else f"affinity {svc['affinity']}"


# --- failing and recovering ------------------------------------------------------------------
def _backends_in(lab: "Lab", pod: str) -> list[str]:
    if pod not in lab.pods:
        raise LabError(f"lab {lab.name}: no pod {pod!r} (pods: {', '.join(sorted(lab.pods)) or 'none'})")
    names = [n for n, s in lab.state.get("services", {}).items() if pod in s.get("backends", {})]
    if not names:
        raise LabError(f"pod {pod} runs no service backend; start one with 'wiremesh lab service add NAME --port P "
                       f"--pods {pod}'")
    return names


def set_failing(lab: "Lab", pod: str, failing: bool, wait: bool = True) -> list[str]:
    """Make the health checks of every backend in `pod` fail (or pass again); with `wait`, return
    once Consul has marked them so and every node's maps follow. Returns the services concerned."""
    names = _backends_in(lab, pod)
    flag = flag_file(lab, pod)
    if failing:
        flag.touch()
    else:
        flag.unlink(missing_ok=True)
    if wait:
        for n in names:
            wait_health(lab, n, {pod: "critical" if failing else "passing"})
        for n in names:
            wait_programmed(lab, n)
    return names


# --- what Consul and the maps hold -----------------------------------------------------------
def health(lab: "Lab", name: str) -> dict[str, dict[str, Any]]:
    """pod -> {cluster, node, status, output} of NAME's backends, as their cluster's Consul has them."""
    svc = service_state(lab, name)
    out: dict[str, dict[str, Any]] = {}
    for c in lab.clusters:
        try:
            h = lab.consul(lambda s: s.health_service(name, passing=False), c)
        except ConsulError as e:
            raise LabError(f"health of {name} in cluster {c}: {e}") from None
        for i in h.instances:
            pod = i.meta.get("pod") or i.service_id.removeprefix(f"{name}-")
            if pod in svc["backends"]:
                out[pod] = {"cluster": c, "node": i.node, "address": str(i.address), "port": i.port,
                            "status": i.status, "failing": [ch.name for ch in i.checks if ch.status != "passing"]}
    return out


def wait_health(lab: "Lab", name: str, want: dict[str, str], timeout: float = 20.0) -> float:
    """Wait until Consul reports each pod's backend of NAME in the wanted status; returns the seconds."""
    t0 = time.monotonic()
    have: dict[str, dict[str, Any]] = {}
    while time.monotonic() - t0 < timeout:
        have = health(lab, name)
        if all(have.get(p, {}).get("status") == s for p, s in want.items()):
            return time.monotonic() - t0
        time.sleep(0.05)
    bad = {p: have.get(p, {}).get("status", "not registered") for p, s in want.items()
           if have.get(p, {}).get("status") != s}
    detail = "; ".join(f"{p}: {st}" + (f" ({', '.join(have[p]['failing'])})" if have.get(p, {}).get("failing") else "")
                       for p, st in bad.items())
    raise LabError(f"service {name}: Consul does not show {', '.join(f'{p} {want[p]}' for p in bad)} after "
                   f"{timeout:.0f}s ({detail})")


def _snapshot(store: ConsulStore, *, cluster: str) -> ClusterSnapshot:
    return parse_cluster(cluster, 0, store.list(layout.cluster_prefix(cluster))[1])


def expected_backends(lab: "Lab", name: str) -> dict[str, set[tuple[str, int]]]:
    """cluster -> the backends (address, port) NAME's frontends use on that cluster's nodes, from
    each cluster's passing instances and the cluster's own definition (select_backends)."""
    passing = {}
    for c in lab.clusters:
        h = lab.consul(lambda s: s.health_service(name, passing=True), c)
        passing[c] = ClusterBackends(backends_of(c, h))
    # A signed cluster's backends count only where its certified nodes are (agent.service_plan).
    snaps = {c: lab.consul(functools.partial(_snapshot, cluster=c), c) for c in lab.clusters}
    places = certified_places({c for c, sn in snaps.items() if sn.config and sn.config.require_signed},
                              {c: sn.nodes for c, sn in snaps.items()})
    passing = admitted(name, passing, places, [])
    out = {}
    for c in lab.clusters:
        svc = _definition(lab, name, c)
        chosen = select_backends(svc, c, passing) if svc else ()
        out[c] = {(b.address, svc.ports[0].target_port or b.port) for b in chosen} if svc else set()
    return out


def programmed(lab: "Lab", node_name: str, name: str) -> dict[str, Any] | None:
    """What NODE's eBPF maps hold for service NAME: {frontend, service_id, backends}, None if nothing."""
    from wiremesh.tunnels import Frontend, read_pinned

    node = lab.node(node_name)
    svc = service_state(lab, name)
    if not node.pin_dir:
        return None
    fe = Frontend(svc["vips"][node.cluster or lab.clusters[0]], svc["port"], svc["protocol"])
    try:
        held = read_pinned(node.pin_dir)
    except Exception as e:  # noqa: BLE001 - any failure to read the pins means "not programmed here"
        raise LabError(f"{node_name}: its service lookup cannot be read ({e}); see {node.dir}/agent.log") from None
    entry = held.get(fe)
    if entry is None:
        return None
    return {"frontend": str(fe), "service_id": entry.service_id,
            "backends": [(str(b.address), b.port) for b in entry.backends]}


def wait_programmed(lab: "Lab", name: str, timeout: float = 20.0) -> float:
    """Wait until every node with a running agent has NAME's frontend with the backends its
    affinity chooses from Consul's current health; returns the seconds it took."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        want = expected_backends(lab, name)
        late = []
        for n, node in sorted(lab.nodes.items()):
            if not node.pid or not node.pin_dir:
                continue
            held = programmed(lab, n, name)
            have = set(held["backends"]) if held else None
            if have != want[node.cluster or lab.clusters[0]]:
                late.append(f"{n} holds {sorted(have) if have is not None else 'nothing'}")
        if not late:
            return time.monotonic() - t0
        last = "; ".join(late)
        time.sleep(0.05)
    raise LabError(f"service {name}: nodes' maps do not follow Consul after {timeout:.0f}s: {last}")


def listing(lab: "Lab") -> list[dict[str, Any]]:
    """Every service of the lab with its VIP(s) and each backend's health in Consul."""
    out = []
    for name, svc in sorted(lab.state.get("services", {}).items()):
        h = health(lab, name)
        out.append({"service": name, "vips": svc["vips"], "port": svc["port"], "protocol": svc["protocol"],
                    "policy": policy(svc),
                    "backends": [{"pod": p, "cluster": h.get(p, {}).get("cluster", "?"),
                                  "node": svc["backends"][p].get("node", ""),
                                  "status": h.get(p, {}).get("status", "not registered")}
                                 for p in sorted(svc["backends"])]})
    return out
