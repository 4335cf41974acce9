"""How long the reconcile loop is blocked (one pass, start to end: a key switch due meanwhile waits
that long), in a lab whose Consul is stopped in the middle of a key rotation of every node.

Real Consul, real agents, real wireguard-go. The lab comes up; `wiremesh keys rotate --all`
starts on the first node; once the first node's rotation is staged, Consul is stopped for
--outage seconds, then started again, and the command runs on to its end (or its timeout).
Each agent's `wiremesh_loop_blocked_seconds` histogram (/metrics) is read before the rotation
and at the end; the difference, summed over every agent, gives the percentiles (upper bucket
bounds) and the passes counted. Baseline: the same figures over a quiet period of the same
length before the rotation, in the same run.

    .venv/bin/python bench/loop_blocked.py --nodes 10 --outage 30
    .venv/bin/python bench/loop_blocked.py --smoke
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

from _common import figure, finished, lab_name, stop_on_sigterm, wait_leader
from wiremesh.lab import Lab

Hist = dict[float, float]  # upper bound (le) -> cumulative count, summed over agents


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def histogram(lab: Lab) -> Hist:
    out: Hist = {}
    for n, node in lab.nodes.items():
        if not node.pid:
            continue
        try:
            _, body = lab.http_get(node.health_url + "/metrics", cluster=node.cluster or None)
        except OSError as e:
            log(f"{n}: /metrics unreadable ({e})")
            continue
        for le, v in re.findall(r'^wiremesh_loop_blocked_seconds_bucket\{le="([^"]+)"\} (\S+)$', body.decode(), re.M):
            b = float("inf") if le == "+Inf" else float(le)
            out[b] = out.get(b, 0.0) + float(v)
    return out


def quantile(before: Hist, after: Hist, q: float) -> tuple[float, int]:
    """(upper bound of the bucket holding quantile q, passes counted) of after - before."""
    diff = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in after}
    total = diff.get(float("inf"), 0.0)
    if total <= 0:
        return 0.0, 0
    for b in sorted(diff):
        if diff[b] >= q * total:
            return b, int(total)
    return float("inf"), int(total)


def report(what: str, before: Hist, after: Hist) -> None:
    p50, n = quantile(before, after, 0.50)
    p99, _ = quantile(before, after, 0.99)
    top, _ = quantile(before, after, 1.0)
    log(f"{what}: {n} passes, p50 <= {p50 * 1000:g} ms, p99 <= {p99 * 1000:g} ms, max <= {top * 1000:g} ms")
    figure(f"{what}: passes", n)
    figure(f"{what}: loop blocked p99 (ms, bucket bound)", p99 * 1000)
    figure(f"{what}: loop blocked max (ms, bucket bound)", top * 1000)


def rotation_staged(lab: Lab, node: str) -> bool:
    p = lab.run(node, "wiremesh", "-o", "json", "keys", "status", timeout=20)
    return '"staged"' in p.stdout or '"committed"' in p.stdout or '"switched"' in p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--outage", type=float, default=30.0, help="seconds Consul is stopped (default 30)")
    ap.add_argument("--smoke", action="store_true", help="3 nodes, a 5 s outage: that the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.nodes, args.outage = 3, 5.0
    stop_on_sigterm()
    lab = Lab(lab_name("lb"))
    try:
        log(f"lab {lab.name}: {args.nodes} nodes")
        lab.up(args.nodes, progress=lambda m: None)
        wait_leader(lab)
        lab.wait_converged(timeout=120)
        first = sorted(lab.nodes)[0]
        quiet0 = histogram(lab)
        time.sleep(args.outage)  # the baseline: the same length of time without a rotation or an outage
        quiet1 = histogram(lab)
        report("quiet", quiet0, quiet1)
        before = histogram(lab)
        cli = lab.popen(first, "wiremesh", "-o", "json", "keys", "rotate", "--all", "--wait", stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 60
        while not rotation_staged(lab, first):
            if time.monotonic() > deadline or cli.poll() is not None:
                raise SystemExit("the first rotation never staged")
            time.sleep(0.05)
        log(f"rotation staged; Consul stopped for {args.outage:g} s")
        lab.stop_consul()
        time.sleep(args.outage)
        lab.start_consul()
        wait_leader(lab)
        log("Consul back; waiting for the rotations to end")
        try:
            out, _ = cli.communicate(timeout=60 + 20 * args.nodes)
        except subprocess.TimeoutExpired:
            cli.kill()
            out, _ = cli.communicate()
        log(f"rotate --all: exit {cli.returncode}")
        figure("rotate --all exit code", cli.returncode)
        after = histogram(lab)
        report(f"rotation with a {args.outage:g} s Consul outage, {args.nodes} nodes", before, after)
        finished("loop_blocked")
        return 0
    finally:
        lab.down()
        lab.close()


if __name__ == "__main__":
    sys.exit(main())
