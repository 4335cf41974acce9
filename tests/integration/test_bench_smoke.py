"""Every benchmark runs at its smoke size, so none can rot unnoticed (issue 16, item 5).

One test per `bench/*.py` (files starting with `_` are shared code, not benchmarks; a new
benchmark is picked up by itself): it runs `python bench/NAME.py --smoke` as the user would,
with the venv's python, and checks that it exits 0, printed its figures (`figure: ...` lines)
and its last line `bench: NAME ok` (bench/_common.py: `figure`, `finished`), and that it left
nothing behind: no network namespace, no wireguard-go or Consul process, no BPF pin, no lab
directory. A benchmark is never a test: no time is asserted, the figures are only shown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wiremesh.lab import LAB_ROOT

from .conftest import RUN_MARKER, _our_daemons

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
BENCHES = sorted(p.stem for p in BENCH.glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 600  # generous: a busy 2-core machine; the smoke sizes take seconds when it is idle
FIGURE = re.compile(r"^figure: \S.*: \S", re.M)
BPF_ROOT = Path("/sys/fs/bpf/wiremesh")


def leftovers() -> dict[str, set[str]]:
    """What a benchmark could leave behind, by kind."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {
        "network namespaces": {line.split()[0] for line in netns.splitlines() if line.strip()},
        "wireguard-go/consul pids": {str(p) for p in _our_daemons(os.environ.get(RUN_MARKER, ""))},
        "BPF pins": {p.name for p in BPF_ROOT.iterdir()} if BPF_ROOT.is_dir() else set(),
        "lab directories": {p.name for p in LAB_ROOT.iterdir()} if LAB_ROOT.is_dir() else set(),
    }


def test_benchmarks_found() -> None:
    assert {"convergence", "rotation", "scale", "service_lookup", "throughput"} <= set(BENCHES), BENCHES


@pytest.mark.parametrize("name", BENCHES)
def test_bench_smoke(name: str) -> None:
    script = BENCH / f"{name}.py"
    assert "--smoke" in script.read_text(), f"bench/{name}.py has no --smoke flag: every benchmark needs one"
    before = leftovers()
    python = ROOT / ".venv" / "bin" / "python"
    proc = subprocess.Popen([str(python if python.exists() else sys.executable), str(script), "--smoke"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_COLOR": "1"})
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmark unwinds into its clean-up (bench/_common.py)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"bench/{name}.py --smoke still running after {TIMEOUT_S}s; stderr:\n{err[-3000:]}")
    took = time.monotonic() - t0
    print(f"bench/{name}.py --smoke ({took:.1f} s):\n{out}")
    assert proc.returncode == 0, f"bench/{name}.py --smoke exited {proc.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
    assert FIGURE.search(out), f"bench/{name}.py --smoke printed no `figure: WHAT: VALUE` line:\n{out[-2000:]}"
    last = out.strip().splitlines()[-1] if out.strip() else ""
    assert last == f"bench: {name} ok", f"bench/{name}.py --smoke: last line {last!r}, not 'bench: {name} ok'"

    deadline = time.monotonic() + 10  # processes just signalled may take a moment to be reaped
    while True:
        after = leftovers()
        left = {kind: sorted(after[kind] - before[kind]) for kind in after if after[kind] - before[kind]}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"bench/{name}.py --smoke left behind: {left}"
