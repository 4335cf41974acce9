"""Pod-to-pod TCP throughput across nodes, per routing mode, against bare WireGuard.

One lab (real agents, real wireguard-go, one namespace per node and per pod), one run:
iperf3 from a pod on node1 to a pod on node2 in `wireguard` and in `vxlan` mode, and between
the two nodes' own overlay addresses over the same WireGuard device with no pods, no VXLAN
and no pod routes ("bare"). Rounds alternate the three so machine noise hits all alike; the
median of each is reported, with its ratio to bare.

    .venv/bin/python bench/throughput.py --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _common import figure, finished, lab_name, stop_on_sigterm, wait_leader
from wiremesh.lab import Lab


def iperf(lab: Lab, client: str, server_ip: str, seconds: int) -> float:
    p = lab.run(client, "iperf3", "-c", server_ip, "-t", str(seconds), "-J", "-O", "1", timeout=seconds + 30)
    if p.returncode != 0:
        raise SystemExit(f"iperf3 {client} -> {server_ip} failed: {p.stdout[-400:]}{p.stderr[-400:]}")
    return float(json.loads(p.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def wait_mode(lab: Lab, mode: str) -> None:
    lab.set_routing(mode)
    want = mode == "vxlan"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all((lab.run(n, "ip", "link", "show", "wm-vxlan").returncode == 0) == want for n in lab.nodes):
            time.sleep(0.5)
            return
        time.sleep(0.1)
    raise SystemExit(f"lab did not switch to {mode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true",
                    help="the smallest run that still measures everything (--seconds 1 --rounds 1)")
    ap.add_argument("--output", choices=["table", "json"], default="table")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.rounds = 1, 1
    if args.seconds < 1 or args.rounds < 1:
        raise SystemExit("--seconds and --rounds must be positive")
    stop_on_sigterm()
    lab = Lab(lab_name("tput"))
    servers: list[subprocess.Popen[bytes]] = []
    try:
        lab.up(2)
        wait_leader(lab)
        lab.add_pod("client", "node1")
        server = lab.add_pod("server", "node2")
        for where in ("server", "node2"):
            servers.append(lab.popen(where, "iperf3", "-s", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        node2_ip = lab.overlay_ip("node2")
        results: dict[str, list[float]] = {"bare": [], "wireguard": [], "vxlan": []}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            results["bare"].append(iperf(lab, "node1", node2_ip, args.seconds))
            for mode in ("wireguard", "vxlan"):
                wait_mode(lab, mode)
                results[mode].append(iperf(lab, "client", server.ip, args.seconds))
            wait_mode(lab, "wireguard")
        med = {k: statistics.median(v) for k, v in results.items()}
        out = {
            "seconds": args.seconds, "rounds": args.rounds,
            "gbit_s": {k: round(v, 3) for k, v in med.items()},
            "all_gbit_s": {k: [round(x, 3) for x in v] for k, v in results.items()},
            "ratio_vs_bare": {m: round(med[m] / med["bare"], 3) for m in ("wireguard", "vxlan")},
        }
        if args.output == "json":
            print(json.dumps(out, indent=2))
        else:
            print("path                  Gbit/s (median)  ratio vs bare  runs")
            for k in ("bare", "wireguard", "vxlan"):
                ratio = "1.000" if k == "bare" else f"{out['ratio_vs_bare'][k]:.3f}"
                label = {"bare": "bare wireguard-go", "wireguard": "pods, wireguard", "vxlan": "pods, vxlan"}[k]
                print(f"{label:<22}{med[k]:>15.3f}{ratio:>15}  {out['all_gbit_s'][k]}")
        for k in ("bare", "wireguard", "vxlan"):
            figure(f"throughput {k}", f"{med[k]:.3f} Gbit/s" + ("" if k == "bare" else f", x{out['ratio_vs_bare'][k]:.3f} of bare"))
    finally:
        for s in servers:
            s.kill()
            s.wait()
        lab.down()
        lab.close()
    finished("throughput")


if __name__ == "__main__":
    main()
