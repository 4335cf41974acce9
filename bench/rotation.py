"""Key rotation at scale: how long `wiremesh keys rotate --all --wait` takes for every node of a
lab of 10 and of 30 nodes (one at a time, and --parallel 5), and how many packets pings between
nodes lose meanwhile at 100 and at 1 000 packets/s per pair.

Real Consul, real agents, real wireguard-go, one namespace per node; the CLI runs inside the
first node as an operator would run it. Each (mode, rate) is one rotation of every node, with
`ping -i 1/rate` running both ways over the overlay on the sampled pairs from a second before
the command to a second after it returned. Pairs: a ring over every node when there are at most
--max-pairs nodes (each node in two pairs), else disjoint neighbours (node1-node2,
node3-node4, ...: every node in one pair). A packet still unanswered when ping is stopped (at
most 100 ms worth) was in flight, not lost; the longest gap is the longest run of lost
packets by their send times (replies held in wireguard-go's queue come late together, so
reply times would hide it); lossy pairs are named with how late their replies came.

Also printed: the time per node; the host's CPU busy share and the CPU the agents, the
wireguard-go devices and Consul used (percent of one core, over the command's run: 30 agents
are heavy for 2 cores); the datagrams the nodes' wireguard-go dropped for a full UDP receive
buffer (given 4 MiB first, as wireguard-go does itself since 2023: the lab's 0.0.20220316
keeps 208 KiB, which a loaded host overflows with or without a rotation).

    .venv/bin/python bench/rotation.py --nodes 10 30
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_seconds, figure, finished, lab_name, pct, stop_on_sigterm, wait_leader
from wiremesh.lab.udpbuf import enlarge_udp_buffers, udp_rcvbuf_errors
from wiremesh.lab import Lab
from wiremesh.agent import AGENT_NICE
from wiremesh.tunnels import set_session_nice


KEEP_PINGS: Path | None = None  # --keep-logs DIR/pings


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f) - idle, sum(f)


def ping_losses(text: str, in_flight_max: int, label: str = "", interval: float = 0.01) -> tuple[int, int, float]:
    """(sent, lost, longest gap in ms) from `ping -n -D` output, replies read per icmp_seq
    (16 bits, unwrapped); the trailing unanswered packets, if at most `in_flight_max`, were in
    flight when ping stopped. A gap: the longest run of lost packets, by their send times."""
    m = re.search(r"(\d+) packets transmitted", text)
    if not m:
        raise SystemExit(f"no ping summary: {text[-300:]!r}")
    sent = int(m.group(1))
    answered: dict[int, float] = {}
    base = last = 0
    rtts = [float(x) for x in re.findall(r" time=([\d.]+) ms", text)]
    max_rtt = max(rtts, default=0.0)
    for ts, s in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from \S+ icmp_seq=(\d+) ", text, re.M):
        v = int(s)
        if v + base < last - 32768:
            base += 65536
        last = v + base
        answered.setdefault(last, float(ts))
    top = max(answered, default=0)
    if sent - top <= in_flight_max:
        sent = top
    missing = [q for q in range(1, sent + 1) if q not in answered]
    # The longest run of lost packets, as time by their send times (seq x interval): the replies
    # around it may come late together (held in wireguard-go's queue), so their print times
    # would show no gap at all.
    gap, run, prev = 0.0, 0, None
    for q in missing:
        run = run + 1 if prev == q - 1 else 1
        prev = q
        gap = max(gap, (run + 1) * interval * 1000)
    head = min(answered, default=sent + 1) - 1  # lost before the first reply
    tail = sent - top  # lost after the last one
    if missing:
        log(f"    {label}: lost {len(missing)}: {head} before the first reply, {tail} after the last, longest gap "
            f"{gap:.0f} ms of sends lost in a row, replies up to {max_rtt:.0f} ms late")
    return sent, len(missing), gap


def cpu_by_kind(lab: Lab) -> dict[str, float]:
    """CPU seconds used so far by the lab's agents, wireguard-go devices and Consul servers."""
    from wiremesh.lab.netns import pids_in_netns

    out = {"agents": 0.0, "wireguard-go": 0.0, "consul": 0.0}
    for node in lab.nodes.values():
        for pid in pids_in_netns(node.netns):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                kind = "agents" if pid == node.pid else ("wireguard-go" if comm == "wireguard-go" else None)
                if kind:
                    out[kind] += cpu_seconds(pid)
            except OSError:
                pass
    for c in lab.clusters:
        try:
            out["consul"] += cpu_seconds(lab.cluster_state(c)["consul_pid"])
        except (OSError, KeyError):
            pass
    return out


def choose_pairs(nodes: list[str], max_pairs: int) -> list[tuple[str, str]]:
    n = len(nodes)
    if n <= max_pairs:
        return [(nodes[i], nodes[(i + 1) % n]) for i in range(n)]
    return [(nodes[i], nodes[i + 1]) for i in range(0, n - 1, 2)]


def within_budget(pairs: list[tuple[str, str]], rate: int, budget: int) -> list[tuple[str, str]]:
    """At most `budget` pings per second in all (a pair pings both ways: 2 x rate), the pairs
    spread evenly over the list: 15 pairs at 1 000/s each are 30 000 packets/s through
    wireguard-go, which leaves a 2-core host no CPU for the agents and Consul (30 nodes measured:
    sessions expired, records vanished, peers dropped: losses that are not the rotation's)."""
    k = max(1, min(len(pairs), budget // (2 * rate)))
    return [pairs[i * len(pairs) // k] for i in range(k)]


def _instrument_priority() -> None:
    set_session_nice(AGENT_NICE)


def one_run(lab: Lab, nodes: list[str], pairs: list[tuple[str, str]], parallel: int, rate: int, timeout: float,
            tmp: Path) -> dict[str, Any]:
    interval = 1.0 / rate
    files, pingers = [], []
    for a, b in pairs:
        f = open(tmp / f"ping-{parallel}-{rate}-{a}-{b}.txt", "w")
        files.append(f)
        # The pingers are the instrument, not a workload: at the agents' priority (in a session
        # of their own: tunnels.sched), else 30 agents left them a tenth of their rate.
        pingers.append(lab.popen(a, "ping", "-n", "-D", "-i", f"{interval:g}", "-W", "1", lab.overlay_ip(b),
                                 stdout=f, stderr=f, start_new_session=True, preexec_fn=_instrument_priority))
    try:
        time.sleep(1)
        drops0 = sum(udp_rcvbuf_errors(lab).values())
        cpu0 = cpu_by_kind(lab)
        busy0, total0 = cpu_times()
        t0 = time.monotonic()
        # The operator's command at the pingers' priority too: left at nice 0 below them, it
        # noticed the rotations' end tens of seconds late (the time measured is the command's).
        p = subprocess.run(lab.exec_argv(nodes[0], ["wiremesh", "-o", "json", "keys", "rotate", "--all", "--wait",
                                                    "--parallel", str(parallel), "--timeout", str(timeout)]),
                           capture_output=True, text=True, timeout=timeout + 60, start_new_session=True,
                           preexec_fn=_instrument_priority)
        took = time.monotonic() - t0
        busy1, total1 = cpu_times()
        cpu1 = cpu_by_kind(lab)
        time.sleep(1)
        drops = sum(udp_rcvbuf_errors(lab).values()) - drops0
    finally:
        for pr in pingers:
            pr.send_signal(2)
        for pr in pingers:
            pr.wait(timeout=10)
        for f in files:
            f.close()
    try:
        rotations = json.loads(p.stdout)["rotations"]
    except (ValueError, KeyError):
        raise SystemExit(f"rotate: exit {p.returncode}: {p.stderr[-1000:]}") from None
    per_pair = [ping_losses(Path(f.name).read_text(errors="replace"), max(1, rate // 10), f"{a}->{b}", interval)
                for (a, b), f in zip(pairs, files)]
    if KEEP_PINGS is not None:  # the raw ping output of each pair that lost packets
        for f, x in zip(files, per_pair):
            if x[1]:
                KEEP_PINGS.mkdir(parents=True, exist_ok=True)
                shutil.copy(f.name, KEEP_PINGS / Path(f.name).name)
    lost = [x[1] for x in per_pair]
    secs = [r["seconds"] for r in rotations]
    return {
        "nodes": len(nodes), "mode": "one at a time" if parallel == 1 else f"--parallel {parallel}",
        "rate_pps": rate, "rotate_all_s": round(took, 1),
        "done": sum(r["state"] == "done" and not r["error"] for r in rotations), "rotations": len(rotations),
        "per_node_p50_s": pct(secs, 50), "per_node_max_s": max(secs),
        "pairs": len(pairs), "sent": sum(x[0] for x in per_pair), "lost": sum(lost), "lost_max_pair": max(lost),
        "longest_gap_ms": round(max(x[2] for x in per_pair)),
        "pairs_with_loss": sum(1 for x in lost if x), "udp_rcvbuf_drops": drops,
        **{f"cpu_{k}_pct": round(100 * (cpu1[k] - cpu0[k]) / took) for k in cpu0}, "cpu_busy_pct": round(100 * (busy1 - busy0) / max(1, total1 - total0)),
        "not_done": [f"{r['node']}: {r['state']} {r['error']}".strip() for r in rotations
                     if r["state"] != "done" or r["error"]],
    }


def measure(n: int, modes: list[int], rates: list[int], max_pairs: int, timeout: float,
            keep_logs: Path | None = None, budget: int = 6000) -> list[dict[str, Any]]:
    lab = Lab(lab_name("rot"))
    out = []
    try:
        log(f"{n} nodes: lab up...")
        t0 = time.monotonic()
        lab.up(n, progress=lambda m: None)
        wait_leader(lab)
        log(f"{n} nodes: lab up in {time.monotonic() - t0:.0f} s; wireguard-go UDP buffers to 4 MiB on "
            f"{enlarge_udp_buffers(lab)} sockets")
        nodes = sorted(lab.nodes, key=lambda x: int(x.removeprefix("node")))
        pairs = choose_pairs(nodes, max_pairs)
        log(f"{n} nodes: ping pairs: {', '.join(f'{a}<->{b}' for a, b in pairs)}")
        with tempfile.TemporaryDirectory(prefix="bench-rotation-") as d:
            for parallel in modes:
                for rate in rates:
                    used = within_budget(pairs, rate, budget)
                    log(f"{n} nodes: rotate --all --parallel {parallel}, pings at {rate}/s on {len(used)} pairs: "
                        f"{', '.join(f'{a}<->{b}' for a, b in used)}...")
                    r = one_run(lab, nodes, used, parallel, rate, timeout, Path(d))
                    r["pair_choice"] = ("ring over all nodes" if n <= max_pairs else "disjoint neighbours") + (
                        "" if len(used) == len(pairs) else f", {len(used)} of {len(pairs)} (--pps-budget {budget})")
                    log(f"  {r['rotate_all_s']} s, {r['done']}/{r['rotations']} done, lost {r['lost']} of "
                        f"{r['sent']} packets, host CPU {r['cpu_busy_pct']}% busy"
                        + (f"; not done: {'; '.join(r['not_done'])}" if r["not_done"] else ""))
                    out.append(r)
                    time.sleep(2)
    finally:
        if keep_logs is not None:
            dest = keep_logs / f"{n}-nodes"
            dest.mkdir(parents=True, exist_ok=True)
            for name in lab.nodes:
                src = Path(lab.node(name).dir) / "agent.log"
                if src.exists():
                    shutil.copy(src, dest / f"{name}.log")
                for wg in Path(lab.node(name).dir).glob("wireguard-go-*.log"):  # (WIREMESH_WG_LOG_LEVEL)
                    if wg.stat().st_size:
                        shutil.copy(wg, dest / f"{name}.{wg.name}")
            log(f"{n} nodes: agent logs in {dest}")
        log(f"{n} nodes: lab down")
        lab.down()
        lab.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[10, 30], help="lab sizes")
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 5], help="--parallel values to run")
    ap.add_argument("--rates", type=int, nargs="+", default=[100, 1000], help="ping rates per pair (packets/s)")
    ap.add_argument("--max-pairs", type=int, default=15, help="up to this many nodes: a ring of pairs over all")
    ap.add_argument("--timeout", type=float, default=600, help="the rotate command's --timeout")
    ap.add_argument("--pps-budget", type=int, default=6000,
                    help="pings per second in all, both ways (fewer pairs at higher rates)")
    ap.add_argument("--keep-logs", type=Path, default=None, metavar="DIR", help="copy the agents' logs here")
    ap.add_argument("--smoke", action="store_true",
                    help="the smallest run that still measures everything (--nodes 3 --parallel 1 --rates 100)")
    ap.add_argument("--output", choices=["table", "json"], default="table")
    args = ap.parse_args()
    if args.smoke:
        args.nodes, args.parallel, args.rates, args.timeout = [3], [1], [100], 120
    if min(args.nodes + args.parallel + args.rates) < 1:
        raise SystemExit("--nodes, --parallel and --rates must be positive")
    stop_on_sigterm()
    global KEEP_PINGS
    KEEP_PINGS = args.keep_logs / "pings" if args.keep_logs else None
    results = []
    for n in args.nodes:
        results += measure(n, args.parallel, args.rates, args.max_pairs, args.timeout, args.keep_logs,
                           args.pps_budget)
    if args.output == "json":
        print(json.dumps(results, indent=2))
    else:
        table(results)
    for r in results:
        figure(f"rotate --all at {r['nodes']} nodes, {r['mode']}, pings at {r['rate_pps']}/s",
               f"{r['rotate_all_s']} s, {r['done']}/{r['rotations']} done, lost {r['lost']} of {r['sent']} packets, "
               f"longest gap {r['longest_gap_ms']} ms")
    finished("rotation")


def table(results: list[dict[str, Any]]) -> None:
    cols = ["nodes", "mode", "rate_pps", "rotate_all_s", "done", "per_node_p50_s", "per_node_max_s", "pairs", "sent",
            "lost", "lost_max_pair", "longest_gap_ms", "udp_rcvbuf_drops", "cpu_busy_pct", "cpu_agents_pct",
            "cpu_wireguard-go_pct", "cpu_consul_pct"]
    rows = [[str(r[c]) if c != "done" else f"{r['done']}/{r['rotations']}" for c in cols] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    for r in results:
        print(f"pairs at {r['nodes']} nodes, {r['rate_pps']}/s: {r['pairs']} ({r['pair_choice']}), "
              "ping both ways over the overlay")


if __name__ == "__main__":
    main()
