"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of every parser of input from outside.

One target per parser (tests/fuzz/): records (ClusterConfig, NodeRecord), services, rotation,
snapshot (parse_cluster over KV sets), consul (Consul's answers), uapi (wireguard-go's `get`
reply), cni (wiremesh-cni's stdin and environment, kernel stubbed), config (agent.toml),
topology (lab topology files), answers (`wiremesh setup --answers`). Certificates will be one
more target here once they exist (tests/fuzz/targets.py: TARGETS). A target raises only on a bug:
an exception other than the parser's own error type, an error naming no field, a secret of
the input in a message, a valid record that does not round-trip. libFuzzer stops at the first,
prints the traceback and writes the input as <artifacts>/<target>-crash-<sha1>.

    .venv/bin/python scripts/fuzz.py --target uapi --seconds 60
    .venv/bin/python scripts/fuzz.py --target all --seconds 300 --parallel 2   # 5 min per target
    .venv/bin/python scripts/fuzz.py --target records --seconds 3600 --corpus bench/results/fuzz/corpus
    .venv/bin/python scripts/fuzz.py --replay bench/results/fuzz/records-crash-...  --target records

Longer runs: raise --seconds (per target); keep --corpus DIR across runs so each run starts from
the inputs that reached new code before (the directory is seeded with valid documents when
empty); --parallel N runs N targets at once (one per core). Per-input hangs are crashes too
(--timeout, seconds). The test command runs every target for 2 s (tests/unit/test_fuzz_bounded.py).

Exit status: 0 no crash, 1 a target crashed (the table says which; tracebacks above it), 2 usage,
or atheris is not installed (pip install atheris; the test extras have it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "bench" / "results" / "fuzz"
# Which targets exist, without importing them (the child imports them under instrumentation).
TARGETS = ["records", "services", "rotation", "snapshot", "consul", "uapi", "cni", "config", "topology", "answers",
           "certs"]
SELFTEST = "selftest"  # not in "all": a planted crash, to test this script (WIREMESH_FUZZ_SELFTEST_HANG=1: a hang)
# Records are refused over 16 KiB: their targets need inputs longer than that.
MAX_LEN = {"records": 20000, "services": 20000, "rotation": 20000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="all", help=f"all, or one or more of {','.join(TARGETS)} (comma-separated)")
    ap.add_argument("--seconds", type=float, default=60, help="fuzzing time per target (default 60)")
    ap.add_argument("--runs", type=int, default=-1, help="stop after this many inputs per target (default: no limit)")
    ap.add_argument("--parallel", type=int, default=1, help="targets fuzzed at once (default 1)")
    ap.add_argument("--corpus", type=Path, help="keep the corpus here, one subdirectory per target")
    ap.add_argument("--artifacts", type=Path, default=ARTIFACTS, help=f"crashing inputs (default {ARTIFACTS})")
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it counts as a hang")
    ap.add_argument("--replay", type=Path, help="run the target once on this input (a crash file) and show the result")
    ap.add_argument("-v", "--verbose", action="store_true", help="show libFuzzer's progress lines")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if rest and not args.child:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    names = TARGETS if args.target == "all" else args.target.split(",")
    unknown = [n for n in names if n not in (*TARGETS, SELFTEST)]
    if unknown or args.parallel < 1:
        ap.error(f"unknown target {unknown[0]!r}" if unknown else "--parallel must be at least 1")
    if args.child:
        return child(names[0], rest)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzz: atheris is not installed (pip install atheris; it is in wiremesh's test extras)", file=sys.stderr)
        return 2
    if args.replay:
        return replay(names[0], args.replay)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda n: run_target(n, args), names))
    print(f"\n{'target':<10} {'inputs':>10} {'inputs/s':>9} {'seconds':>8}  result", file=sys.stderr)
    for name, execs, secs, result in results:
        print(f"{name:<10} {execs:>10} {execs / max(secs, 1e-9):>9.0f} {secs:>8.1f}  {result}", file=sys.stderr)
    return 1 if any(r != "ok" for _, _, _, r in results) else 0


def run_target(name: str, args: argparse.Namespace) -> tuple[str, int, float, str]:
    """Fuzz one target in a child process -> (name, inputs run, seconds, "ok" or what went wrong)."""
    with tempfile.TemporaryDirectory(prefix=f"wiremesh-fuzz-{name}-") as tmp:
        corpus = (args.corpus / name) if args.corpus else Path(tmp) / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--target", name, str(corpus),
               f"-max_total_time={max(1, round(args.seconds))}", f"-runs={args.runs}", f"-timeout={args.timeout}",
               f"-max_len={MAX_LEN.get(name, 4096)}", f"-artifact_prefix={args.artifacts}/{name}-",
               "-rss_limit_mb=4096", "-print_final_stats=1"]
        env = {**os.environ, "WIREMESH_FUZZ_SCRATCH": str(Path(tmp) / "scratch"), "PYTHONPATH": str(REPO)}
        for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_CACERT",
                    "WIREMESH_CONSUL_HTTP_ADDR"):
            env.pop(var, None)  # agent.toml's defaults come from these: the fuzzer must not depend on a shell
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        assert proc.stdout is not None
        execs, lines = 0, []
        for line in proc.stdout:
            lines.append(line)
            if m := re.match(r"stat::number_of_executed_units:\s*(\d+)|#(\d+)\s", line):
                execs = int(m.group(1) or m.group(2))
            if args.verbose:
                sys.stderr.write(f"[{name}] {line}")
        rc = proc.wait()
        secs = time.monotonic() - t0
    if rc == 0:
        return name, execs, secs, "ok"
    crash = next((ln.split("Test unit written to ", 1)[1].strip() for ln in lines if "Test unit written to" in ln), "")
    if not args.verbose:  # the child's traceback, where it starts
        start = next((i for i, ln in enumerate(lines) if "Uncaught Python exception" in ln or "ERROR:" in ln), 0)
        sys.stderr.write(f"----- {name} -----\n" + "".join(lines[max(0, start - 2):start + 60]))
    kind = "hang" if any("timeout" in ln.lower() and "ERROR" in ln for ln in lines) else "crash"
    return name, execs, secs, f"{kind} (exit {rc}){': ' + crash if crash else ''}"


def _selftest(data: bytes) -> None:
    """A target with a planted bug (any input starting with "*"): proves that a crash fails the run."""
    if data[:1] == b"*":
        raise ValueError("planted bug")
    if data[:1] == b"~" and os.environ.get("WIREMESH_FUZZ_SELFTEST_HANG"):
        while True:  # a planted hang, for --timeout
            pass


def _load(name: str) -> Callable[[bytes], None]:
    if name == SELFTEST:
        return _selftest
    sys.path.insert(0, str(REPO))
    from tests.fuzz.targets import TARGETS as FUNCS

    return FUNCS[name]


def child(name: str, libfuzzer_args: list[str]) -> int:
    """The fuzzing process: the target's modules instrumented for coverage, libFuzzer driving it.

    `libfuzzer_args`: the corpus directory and libFuzzer's own -flag=value options."""
    import atheris

    target: Callable[[bytes], None]
    if name == SELFTEST:
        target, seeds = _selftest, [b"ok", b"~" if os.environ.get("WIREMESH_FUZZ_SELFTEST_HANG") else b"*"]
    else:
        # Coverage of wiremesh and the targets only: the YAML and TOML parsers' own branches are not
        # what is under test, and instrumented they run several times slower.
        with atheris.instrument_imports(include=["wiremesh", "tests.fuzz"]):
            target = _load(name)
        from tests.fuzz.targets import seed_inputs

        seeds = seed_inputs(name)
    corpus = Path(next(a for a in libfuzzer_args if not a.startswith("-")))
    if not any(corpus.iterdir()):
        for i, data in enumerate(seeds):
            (corpus / f"seed-{i}").write_bytes(data)
    atheris.Setup([sys.argv[0], *libfuzzer_args], target)
    atheris.Fuzz()
    return 0


def replay(name: str, path: Path) -> int:
    target = _load(name)
    scratch = tempfile.mkdtemp(prefix="wiremesh-fuzz-replay-")
    os.environ["WIREMESH_FUZZ_SCRATCH"] = scratch
    try:
        target(path.read_bytes())
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"fuzz: {name} accepts {path} (no crash)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
