"""Convergence of the mesh: from a new node's record landing in Consul to every agent having it,
within one cluster and across two federated clusters (record in one, agents of the other).

For each lab size (real Consul, real agents, real wireguard-go, one namespace per node) it
writes a new node's record (with its IPAM lease, as an agent would) TRIALS times and reads,
from every agent's /peers, when that agent programmed the peer. Printed per size:
p50/p99/max of the time until the LAST agent had it, the same for a bare blocking-query
watcher in the same run (the floor Consul itself sets; the ratio is wiremesh's cost on top),
and the agents' RSS.

    .venv/bin/python bench/convergence.py --nodes 10 30 --trials 30
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import threading
import time

from _common import FakeNodes, bare_watcher, cpu_seconds, figure, finished, lab_name, pct, rss_kib, stop_on_sigterm, wait_leader
from wiremesh.clustermesh import layout
from wiremesh.lab import Lab
from wiremesh.lab.topology import load_topology


def measure(n: int, trials: int, cross: bool = False) -> dict[str, object]:
    """`cross`: two clusters of n nodes; records land in the second, latency is the first's."""
    lab = Lab(lab_name("bench"))
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(8)  # lab.peers itself runs in the hub's executor
    try:
        t0 = time.monotonic()
        if cross:
            lab.up(topology=load_topology(clusters=2, nodes=n))
        else:
            lab.up(n)
        up_s = time.monotonic() - t0
        wait_leader(lab)
        target = lab.clusters[-1]
        cluster = lab.cluster_config(target)
        fakes = FakeNodes(lab, cluster)  # signed, as the lab's own (enrolled) nodes are
        nodes = sorted(nd for nd in lab.nodes if lab.node(nd).cluster in ("", lab.clusters[0]))
        seen: dict[str, tuple[int, float]] = {}
        bare_watcher(lab, layout.nodes_prefix(cluster.name), seen, stop, dc=lab.cluster_state(target)["datacenter"]
                     if cross else None)
        time.sleep(0.5)
        agent_lat: list[float] = []
        bare_lat: list[float] = []
        pids = [lab.node(nd).pid for nd in nodes]
        cpu0 = sum(cpu_seconds(p) for p in pids)
        free = [str(s) for s in cluster.pod_network.subnets(new_prefix=cluster.node_prefix_len)][200:]
        for i in range(trials):
            name, cidr = f"bench{i}", free[i]
            rec = fakes.record(name, cidr, f"10.99.0.{250 - i % 5}:51820")
            pub = rec.public_key
            key = layout.node_key(cluster.name, name)
            lab.consul(lambda s: s.put(layout.ipam_key(cluster.name, cidr), fakes.lease(name, cidr), cas=0), target)
            time.sleep(0.3)  # let the agents finish with the lease's own update first
            t_put = time.time()
            lab.consul(lambda s: s.put(key, rec.to_json()), target)
            done: dict[str, float] = {}
            deadline = time.monotonic() + 20
            while len(done) < len(nodes) and time.monotonic() < deadline:
                futs = {nd: pool.submit(lab.peers, nd) for nd in nodes if nd not in done}
                for nd, f in futs.items():
                    for p in f.result():
                        if p["public_key"] == pub and p["state"] == "done":
                            done[nd] = p["programmed_at"]
                time.sleep(0.1)  # agents stamp programmed_at themselves: polling slowly loses no precision
            if len(done) < len(nodes):
                raise SystemExit(f"trial {i}: only {len(done)}/{len(nodes)} agents programmed the new node")
            agent_lat.append(max(done.values()) - t_put)
            if key in seen:
                bare_lat.append(seen[key][1] - t_put)
            lab.consul(lambda s: (s.delete(key), s.delete(layout.ipam_key(cluster.name, cidr))), target)
            time.sleep(0.2)
        cpu_per_trial = (sum(cpu_seconds(p) for p in pids) - cpu0) / trials  # the /peers polls included
        rss = [rss_kib(lab.node(nd).pid) / 1024 for nd in nodes]
        return {
            "nodes": f"2x{n} (cross)" if cross else n, "trials": trials, "lab_up_s": round(up_s, 1),
            "agents_p50_ms": round(pct(agent_lat, 50) * 1000, 1),
            "agents_p99_ms": round(pct(agent_lat, 99) * 1000, 1),
            "agents_max_ms": round(max(agent_lat) * 1000, 1),
            "bare_watch_p50_ms": round(pct(bare_lat, 50) * 1000, 1) if bare_lat else None,
            "bare_watch_p99_ms": round(pct(bare_lat, 99) * 1000, 1) if bare_lat else None,
            "ratio_p50_vs_bare_watch": round(pct(agent_lat, 50) / pct(bare_lat, 50), 2) if bare_lat else None,
            "ratio_p99_vs_bare_watch": round(pct(agent_lat, 99) / pct(bare_lat, 99), 2) if bare_lat else None,
            "agents_cpu_ms_per_trial": round(cpu_per_trial * 1000, 1),
            "rss_mib_mean": round(statistics.mean(rss), 1), "rss_mib_max": round(max(rss), 1),
        }
    finally:
        stop.set()
        pool.shutdown(wait=True)
        lab.down()
        lab.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[10, 30], help="lab sizes to measure")
    ap.add_argument("--trials", type=int, default=30, help="new nodes per size")
    ap.add_argument("--cross-cluster", type=int, nargs="*", default=[5], metavar="N",
                    help="also two clusters of N nodes each: records land in one, latency measured in the other")
    ap.add_argument("--smoke", action="store_true",
                    help="the smallest run that still measures everything (--nodes 2 --trials 3 --cross-cluster 1)")
    ap.add_argument("--output", choices=["table", "json"], default="table")
    args = ap.parse_args()
    if args.smoke:
        args.nodes, args.trials, args.cross_cluster = [2], 3, [1]
    if min(args.nodes + args.cross_cluster, default=1) < 1 or args.trials < 1:
        raise SystemExit("--nodes, --cross-cluster and --trials must be positive")
    stop_on_sigterm()
    results = []
    for n in args.nodes:
        print(f"measuring {n} agents ({args.trials} trials)...", file=sys.stderr)
        results.append(measure(n, args.trials))
    for n in args.cross_cluster:
        print(f"measuring 2 clusters x {n} agents, cross-cluster ({args.trials} trials)...", file=sys.stderr)
        results.append(measure(n, args.trials, cross=True))
    if args.output == "json":
        print(json.dumps(results, indent=2))
    else:
        cols = ["nodes", "agents_p50_ms", "agents_p99_ms", "agents_max_ms", "bare_watch_p50_ms", "bare_watch_p99_ms",
                "ratio_p50_vs_bare_watch", "ratio_p99_vs_bare_watch", "agents_cpu_ms_per_trial", "rss_mib_mean", "rss_mib_max", "lab_up_s"]
        print("  ".join(cols))
        for r in results:
            print("  ".join(str(r[c]).rjust(len(c)) for c in cols))
    for r in results:
        figure(f"convergence at {r['nodes']} agents, p50/p99 vs bare watcher",
               f"{r['agents_p50_ms']}/{r['agents_p99_ms']} ms vs {r['bare_watch_p50_ms']}/{r['bare_watch_p99_ms']} ms, "
               f"ratio x{r['ratio_p50_vs_bare_watch']}/x{r['ratio_p99_vs_bare_watch']} (aim <= x2)")
        figure(f"CPU of all agents per new node at {r['nodes']} agents", f"{r['agents_cpu_ms_per_trial']} ms "
               "(their /peers polls included)")
        figure(f"agent RSS at {r['nodes']} agents", f"mean {r['rss_mib_mean']} MiB, max {r['rss_mib_max']} MiB")
    finished("convergence")


if __name__ == "__main__":
    main()
