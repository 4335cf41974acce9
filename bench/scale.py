"""Cost of one record change for one agent, as its peer count grows (10, 100, 1 000 by default).

One lab with a single real node (its real agent, its real wireguard-go device wm0, a real
Consul). The benchmark writes N fake nodes into the cluster's Consul KV itself, each with its
IPAM lease as a real node would (distinct /24s of the cluster's pod range, next to the real
node's own lease), a valid X25519 public key, and an endpoint on the lab's underlay that nobody
answers (no keepalives are configured, so nothing is even sent; it would stay in the lab's
namespaces anyway). Sizes are measured in ascending order in the same lab: the records of the
next size are added to those already there.

At each size, after the agent has programmed all N peers, TRIALS times one peer's record is
changed in Consul and timed until the agent has programmed it on the device:
  - endpoint: a new endpoint (an update of that peer in place);
  - key: a new public key (the old key is replaced by the new one in one device transaction).
"Programmed" is the `programmed_at` wall-clock stamp the agent puts on that peer in /peers
right after the device accepted the change; the benchmark waits for the change by polling the
agent's /metrics (wiremesh_peer_changes_total, a few hundred bytes whatever N) and reads /peers
(O(N)) only between rounds, outside the CPU window, so that the measurement does not itself
cost the agent O(N) per trial. A bare blocking-query watcher on the same prefix as the agent
(no validation, no planning) gives, in the same run, the delay Consul itself adds.

Printed per size and change kind: p50/p99 of record change -> programmed, the bare watcher's
p50, CPU per change of the agent and of wireguard-go (utime+stime over the trials, divided by
their number; for the agent less the CPU of the benchmark's own /metrics polls, measured apart
at each size; /proc ticks are 10 ms, so small figures are +-10 ms / TRIALS), their ratios to
the smallest size (the baseline, same run), the RSS of both processes after the trials, and
how many periodic full passes (drift repair, O(N) by design) fell inside the trials.

    .venv/bin/python bench/scale.py --sizes 10 100 1000 --trials 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (FakeNodes, bare_watcher, cpu_seconds, figure, finished, lab_name, pct, rss_kib, stop_on_sigterm,
                     wait_leader)
from wiremesh.clustermesh import KVOp, NodeRecord, layout
from wiremesh.keys import PrivateKey
from wiremesh.lab import Lab

POD_CIDR = "10.240.0.0/12"  # 4 096 /24s: room for the largest size
POLL_S = 0.02  # /metrics polling while a change is awaited (its timing comes from /peers)
SETTLE_S = 0.1  # quiet time between two trials, so each change is measured alone
LINGER_WAIT_S = 5.0  # replaced keys linger 1 s on the device (agent/reconciler.py LINGER_S), then go
TXN_PEERS = 32  # a lease and a record each: Consul 1.8 takes at most 64 operations per transaction


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Trial:
    node_id: str
    public_key: str
    t_put: float


class ScaleBench:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.node = lab.node(next(iter(lab.nodes)))
        self.cluster = lab.cluster_config()
        self.fakes = FakeNodes(lab, self.cluster)  # signed records and leases, as enrolled nodes write
        self.records: list[NodeRecord] = []
        leased = set(lab.consul(lambda s: s.list(layout.ipam_prefix(self.cluster.name)))[1])
        self.free = [str(n) for n in self.cluster.pod_network.subnets(new_prefix=self.cluster.node_prefix_len)
                     if layout.ipam_key(self.cluster.name, str(n)) not in leased]
        self.seen: dict[str, tuple[int, float]] = {}
        self.stop = threading.Event()
        bare_watcher(lab, layout.cluster_prefix(self.cluster.name), self.seen, self.stop)
        self.wg_pid = int(Path(self.node.dir, "wireguard-go-wm0.pid").read_text())
        self.changes = 0  # endpoint and key changes written so far (each one new)

    # --- the agent's endpoints (HTTP from the hub, as a monitoring system would) --------------
    def get(self, path: str) -> bytes:
        code, body = self.lab.http_get(self.node.health_url + path, timeout=5.0)
        if code not in (200, 503):
            raise SystemExit(f"{path}: HTTP {code}")
        return bytes(body)

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/healthz"))  # type: ignore[no-any-return]

    def peer_changes(self) -> float:
        """wiremesh_peer_changes_total of ops add and update: grows by one per peer programmed.
        Not remove: a replaced key lingers 1 s on the device and its removal then is no trial's."""
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.get("/metrics").decode().splitlines()
                   if line.startswith(('wiremesh_peer_changes_total{op="add"}', 'wiremesh_peer_changes_total{op="update"}')))

    # --- records --------------------------------------------------------------------------
    def grow(self, n: int) -> None:
        """Write fake nodes (lease + record) until there are `n`."""
        if n > len(self.free):
            raise SystemExit(f"--sizes: at most {len(self.free)} peers fit in {POD_CIDR}")
        new = []
        for i in range(len(self.records), n):
            cidr = self.free[i]
            new.append(self.fakes.record(f"peer{i}", cidr, f"10.99.0.{100 + i % 150}:{20000 + i}"))
        for k in range(0, len(new), TXN_PEERS):
            ops = []
            for rec in new[k:k + TXN_PEERS]:
                ops += [KVOp.set(layout.ipam_key(self.cluster.name, rec.pod_cidr), self.fakes.lease(rec.name, rec.pod_cidr)),
                        KVOp.set(layout.node_key(self.cluster.name, rec.name), rec.to_json())]
            self.lab.consul(lambda s: s.txn(ops))
        self.records += new

    def wait_programmed(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        h: dict[str, Any] = {}
        while time.monotonic() < deadline:
            h = self.health()
            if h.get("peers_desired") == n and h.get("peers_programmed") == n:
                return
            time.sleep(0.2)
        raise SystemExit(f"the agent did not program {n} peers within {timeout:.0f}s: {h}; see {self.node.dir}/agent.log")

    def poll_cost(self, polls: int = 300) -> float:
        """The agent's CPU seconds per /metrics request (taken out of the trials' figure)."""
        c0 = cpu_seconds(self.node.pid)
        for _ in range(polls):
            self.peer_changes()
        return (cpu_seconds(self.node.pid) - c0) / polls

    # --- trials ---------------------------------------------------------------------------
    def change(self, i: int, kind: str) -> NodeRecord:
        rec = self.records[i]
        self.changes += 1
        if kind == "endpoint":
            new = self.fakes.change(rec, endpoint=f"10.99.0.{100 + self.changes % 150}:{40000 + self.changes % 20000}")
        else:
            # A node's key changes with its epoch (a rotation's end): a new key at the same epoch is refused
            new = self.fakes.change(rec, public_key=PrivateKey.generate().public_key().base64, key_epoch=rec.key_epoch + 1)
        self.records[i] = new
        return new

    def trials(self, kind: str, trials: int, first: int, poll_cpu: float) -> dict[str, Any]:
        n = len(self.records)
        agent_pid = self.node.pid
        lat: list[float] = []
        bare: list[float] = []
        pending: list[Trial] = []
        changed: set[int] = set()
        cpu_agent = cpu_wg = 0.0
        passes0 = self.health()
        counter = self.peer_changes()
        a0, w0 = cpu_seconds(agent_pid), cpu_seconds(self.wg_pid)
        polls = 0

        def close_round() -> None:
            """Stop the CPU clock, read the stamps of this round's peers from /peers (O(N))."""
            nonlocal cpu_agent, cpu_wg
            cpu_agent += cpu_seconds(agent_pid) - a0
            cpu_wg += cpu_seconds(self.wg_pid) - w0
            stamps = {p["node"]: p for p in self.lab.peers(self.node.name)}
            for t in pending:
                p = stamps.get(t.node_id)
                if p is None or p["public_key"] != t.public_key or p["state"] != "done" or \
                        not p["programmed_at"] or p["programmed_at"] < t.t_put:
                    raise SystemExit(f"{kind} trial on {t.node_id}: /peers shows {p} (written at {t.t_put:.3f})")
                lat.append(p["programmed_at"] - t.t_put)
            pending.clear()
            changed.clear()

        for k in range(trials):
            i = (first + k) % n
            if i in changed:  # the next change would overwrite a stamp not read yet
                close_round()
                time.sleep(SETTLE_S)
                counter = self.peer_changes()
                a0, w0 = cpu_seconds(agent_pid), cpu_seconds(self.wg_pid)
            changed.add(i)
            rec = self.change(i, kind)
            key = layout.node_key(self.cluster.name, rec.name)
            old_index = self.seen.get(key, (0, 0.0))[0]
            t_put = time.time()
            self.lab.consul(lambda s: s.put(key, rec.to_json()))
            deadline = time.monotonic() + 30
            while True:
                time.sleep(POLL_S)
                polls += 1
                now = self.peer_changes()
                if now > counter:
                    counter = now
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{kind} trial {k}: {rec.name} not programmed within 30 s")
            pending.append(Trial(f"{self.cluster.name}/{rec.name}", rec.public_key, t_put))
            deadline = time.monotonic() + 5
            while self.seen.get(key, (old_index, 0.0))[0] == old_index and time.monotonic() < deadline:
                time.sleep(0.005)
            if self.seen.get(key, (old_index, 0.0))[0] != old_index:
                bare.append(self.seen[key][1] - t_put)
            time.sleep(SETTLE_S)
        close_round()
        passes1 = self.health()
        on_device = self.verify_device(kind)
        return {
            "programmed": on_device,
            "p50_ms": round(pct(lat, 50) * 1000, 1), "p99_ms": round(pct(lat, 99) * 1000, 1),
            "bare_watch_p50_ms": round(pct(bare, 50) * 1000, 1) if bare else None,
            "agent_cpu_ms": round((cpu_agent - polls * poll_cpu) / trials * 1000, 2),
            "agent_cpu_raw_ms": round(cpu_agent / trials * 1000, 2), "wg_cpu_ms": round(cpu_wg / trials * 1000, 2),
            "polls_per_change": round(polls / trials, 1), "poll_cpu_ms": round(poll_cpu * 1000, 2),
            "passes": passes1["passes"] - passes0["passes"],
            "full_passes": passes1["full_passes"] - passes0["full_passes"],
        }

    def verify_device(self, kind: str) -> int:
        """The device itself holds every record as it now is: each peer once, with its endpoint.

        A peer whose key was replaced stays on the device, without allowed IPs, for a second
        (the agent's linger, agent/reconciler.py LINGER_S) before it is removed: wait that out."""
        want = {r.public_key: r.endpoint for r in self.records}
        deadline = time.monotonic() + LINGER_WAIT_S
        while True:
            p = self.lab.run(self.node.name, "wg", "show", "wm0", "endpoints", timeout=60, check=True)
            device = dict(line.split("\t") for line in p.stdout.splitlines())
            if device == want or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if device != want:
            wrong = [k[:8] for k in set(device) ^ set(want) | {k for k in want if device.get(k) != want[k]}]
            raise SystemExit(f"after the {kind} trials the device differs from the records "
                             f"({len(device)} peers on the device, {len(want)} records; e.g. {wrong[:5]})")
        return len(device)


class Profiler:
    """py-spy sampling the agent during one size's trials (--profile DIR): collapsed stacks in
    DIR/agent-N-peers-KIND.txt (flamegraph.pl or speedscope read them). It slows the agent a
    little: figures of a profiled run are not to be compared with an unprofiled one."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if out is not None and not Path(self.exe).exists():
            raise SystemExit("--profile needs py-spy (pip install py-spy into the venv)")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, pid: int, name: str) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([self.exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                                      "--threads", "--output", str(self.out / f"{name}.txt")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def measure(sizes: list[int], trials: int, profile: Path | None = None) -> list[dict[str, Any]]:
    profiler = Profiler(profile)
    lab = Lab(lab_name("scale"))
    rows: list[dict[str, Any]] = []
    try:
        say(f"lab {lab.name}: one node, pod CIDR {POD_CIDR}")
        lab.up(1, pod_cidr=POD_CIDR)
        wait_leader(lab)
        bench = ScaleBench(lab)
        try:
            for n in sizes:
                say(f"{n} peers: writing {n - len(bench.records)} records and leases into Consul")
                t0 = time.monotonic()
                c0 = cpu_seconds(bench.node.pid)
                bench.grow(n)
                bench.wait_programmed(n)
                load_s = time.monotonic() - t0
                load_cpu = cpu_seconds(bench.node.pid) - c0
                say(f"{n} peers: all programmed in {load_s:.1f}s; {trials} endpoint and {trials} key changes")
                time.sleep(1.0)  # let the load's last passes and watch deliveries finish
                poll_cpu = bench.poll_cost()
                for kind, first in (("endpoint", 0), ("key", n // 2)):
                    profiler.start(bench.node.pid, f"agent-{n}-peers-{kind}")
                    try:
                        r = bench.trials(kind, trials, first, poll_cpu)
                    finally:
                        profiler.stop()
                    rows.append({"peers": n, "change": kind, **r,
                                 "agent_rss_mib": round(rss_kib(bench.node.pid) / 1024, 1),
                                 "wg_rss_mib": round(rss_kib(bench.wg_pid) / 1024, 1),
                                 "load_s": round(load_s, 1), "load_cpu_s": round(load_cpu, 2)})
                    say(f"{n} peers, {kind}: p50 {r['p50_ms']} ms, agent CPU {r['agent_cpu_ms']} ms/change")
        finally:
            bench.stop.set()
    finally:
        say(f"lab {lab.name}: down")
        lab.down()
        lab.close()
    for kind in ("endpoint", "key"):
        mine = [r for r in rows if r["change"] == kind]
        base = mine[0]
        for r in mine:
            r["p50_vs_base"] = round(r["p50_ms"] / base["p50_ms"], 2) if base["p50_ms"] else None
            r["cpu_vs_base"] = round(r["agent_cpu_ms"] / base["agent_cpu_ms"], 2) if base["agent_cpu_ms"] else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000],
                    help="peer counts, measured in ascending order in one lab; the smallest is the baseline")
    ap.add_argument("--trials", type=int, default=30, help="changes timed per size and kind")
    ap.add_argument("--smoke", action="store_true",
                    help="the smallest run that still measures everything (--sizes 3 10 --trials 3), in seconds")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="sample the agent with py-spy during each size's trials (collapsed stacks in DIR)")
    ap.add_argument("--output", choices=["table", "json"], default="table")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.trials = [3, 10], 3
    sizes = sorted(set(args.sizes))
    if sizes[0] < 1 or args.trials < 1:
        raise SystemExit("--sizes and --trials must be positive")
    stop_on_sigterm()
    rows = measure(sizes, args.trials, args.profile)
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    else:
        table(rows, sizes)
    for kind in ("endpoint", "key"):
        mine = [r for r in rows if r["change"] == kind]
        figure(f"{kind} change p50/p99 at {mine[-1]['peers']} vs {mine[0]['peers']} peers",
               f"{mine[-1]['p50_ms']}/{mine[-1]['p99_ms']} ms vs {mine[0]['p50_ms']}/{mine[0]['p99_ms']} ms, "
               f"p50 x{mine[-1]['p50_vs_base']}, agent CPU x{mine[-1]['cpu_vs_base']}")
    figure(f"agent RSS at {rows[-1]['peers']} peers", f"{rows[-1]['agent_rss_mib']} MiB")
    figure(f"peers programmed at {rows[-1]['peers']} peers", f"{rows[-1]['programmed']} of {rows[-1]['peers']}")
    finished("scale")


def table(rows: list[dict[str, Any]], sizes: list[int]) -> None:
    cols = ["peers", "programmed", "change", "p50_ms", "p99_ms", "bare_watch_p50_ms", "agent_cpu_ms", "wg_cpu_ms",
            "p50_vs_base", "cpu_vs_base", "agent_rss_mib", "wg_rss_mib", "full_passes", "load_s"]
    print("  ".join(cols))
    for r in rows:
        print("  ".join(str(r[c]).rjust(len(c)) for c in cols))
    if len(sizes) > 1:
        for kind in ("endpoint", "key"):
            top = [r for r in rows if r["change"] == kind][-1]
            ok = max(top["p50_vs_base"] or 0, top["cpu_vs_base"] or 0) <= 2
            print(f"{kind} change, {sizes[-1]} vs {sizes[0]} peers: p50 x{top['p50_vs_base']}, "
                  f"agent CPU x{top['cpu_vs_base']} (aim <= x2: {'met' if ok else 'missed'})")
    print("agent CPU of one /metrics poll (subtracted above): "
          + ", ".join(f"{r['poll_cpu_ms']} ms at {r['peers']} peers" for r in rows if r["change"] == "endpoint")
          + f"; {max(r['polls_per_change'] for r in rows)} polls per change at most")
    top = rows[-1]
    print(f"agent RSS at {top['peers']} peers: {top['agent_rss_mib']} MiB "
          f"(aim < 60 MiB: {'met' if top['agent_rss_mib'] < 60 else 'missed'})")


if __name__ == "__main__":
    main()
