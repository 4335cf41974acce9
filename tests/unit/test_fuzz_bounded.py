"""The coverage-guided fuzzer (scripts/fuzz.py, atheris) on every target for a bounded time.

A crash or a hang on any target fails this test, with the fuzzer's traceback and the file of
the input that caused it (replay it: scripts/fuzz.py --target NAME --replay FILE). Each target
runs ~2 s in a child process, two at a time (~25 s in all); WIREMESH_FUZZ_SECONDS changes the
time per target. Longer runs: see scripts/fuzz.py's docstring.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz.py"
SECONDS = os.environ.get("WIREMESH_FUZZ_SECONDS", "2")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (pip install atheris; it is in the test extras)")


def fuzz(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--artifacts", str(tmp_path)], capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)


def table(stderr: str) -> dict[str, tuple[int, str]]:
    """The summary table the script prints last: target -> (inputs run, result)."""
    rows = re.findall(r"^(\w+)\s+(\d+)\s+\d+\s+[\d.]+\s+(.+)$", stderr.split("\ntarget ", 1)[-1], re.MULTILINE)
    return {name: (int(n), result) for name, n, result in rows}


def test_every_parser_survives_a_bounded_fuzzing_run(tmp_path: Path) -> None:
    # --timeout 30: an input counts as a hang after 30 s (the slowest take ~0.5 s; a busy CI machine is slower).
    r = fuzz(tmp_path, "--target", "all", "--seconds", SECONDS, "--parallel", str(min(2, os.cpu_count() or 1)),
             "--timeout", "30")
    got = table(r.stderr)
    assert r.returncode == 0, f"the fuzzer found a bug:\n{r.stderr[-8000:]}"
    assert set(got) == set(TARGETS), r.stderr[-3000:]
    for name, (inputs, result) in got.items():
        assert result == "ok" and inputs > 50, f"{name}: {inputs} inputs, {result}"
    assert not list(tmp_path.glob("*-crash-*"))


def test_a_planted_crash_fails_the_run(tmp_path: Path) -> None:
    """The harness itself: a target that raises makes the script exit 1, naming the crash and its input."""
    r = fuzz(tmp_path, "--target", "selftest", "--seconds", "1")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "ValueError: planted bug" in r.stderr
    (crash,) = tmp_path.glob("selftest-crash-*")
    assert crash.read_bytes().startswith(b"*")
    assert table(r.stderr)["selftest"][1].startswith("crash")
