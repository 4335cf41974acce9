"""Integration fixtures: real Consul, real wireguard-go, real namespaces. Root only."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from wiremesh.lab import Lab

# (what, value, unit): each figure says what it counts.
FIGURES: list[tuple[str, float, str]] = []


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "integration tests need root (network namespaces, WireGuard devices)"
    else:
        missing = [b for b in ("consul", "wireguard-go", "wg", "tcpdump", "nsenter", "unshare") if not shutil.which(b)]
        if missing:
            reason = f"missing {', '.join(missing)}: run scripts/setup.sh"
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("measured (not asserted)")
        for name, value, unit in FIGURES:
            terminalreporter.write_line(f"{name}: {value:.0f} {unit}")


@pytest.fixture
def timing() -> Callable[[str, float], None]:
    """Record a measured duration in seconds; printed (in ms) at the end of the run, never asserted."""
    return lambda name, seconds: FIGURES.append((name, seconds * 1000, "ms"))


@pytest.fixture
def counted() -> Callable[[str, float, str], None]:
    """Record a measured count with its unit ("packets", ...); printed at the end, never asserted."""
    return lambda name, value, unit: FIGURES.append((name, value, unit))


def new_lab_name() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def lab3() -> Iterator[Lab]:
    """A 3-node lab shared by a module's tests; removed even when they fail."""
    lab = Lab(new_lab_name())
    try:
        lab.up(3)
        yield lab
    finally:
        lab.down()


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    lab = Lab(new_lab_name())
    try:
        yield lab
    finally:
        lab.down()


# Every process this run starts inherits this marker (os.environ: nsenter, `env VAR=...`, the
# agents and the wireguard-go they start all pass their environment on), so a concurrent run's
# daemons on the same machine are told apart from ours by /proc/PID/environ.
RUN_MARKER = "WIREMESH_TEST_RUN"


def _marker_of(pid: int) -> str | None:
    """The value of RUN_MARKER in a process's initial environment (None: not set, or gone)."""
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    prefix = RUN_MARKER.encode() + b"="
    for kv in env:
        if kv.startswith(prefix):
            return kv[len(prefix):].decode(errors="replace")
    return None


def _our_daemons(run: str) -> set[int]:
    """The live wireguard-go and Consul processes started by this run (marker `run`)."""
    import subprocess

    from wiremesh.lab.netns import pid_alive

    pids = set()
    for name in ("wireguard-go", "consul"):  # one pgrep each: a pattern over 15 characters matches nothing
        out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
        pids |= {int(p) for p in out.split() if _marker_of(int(p)) == run and pid_alive(int(p))}
    return pids


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every wireguard-go and Consul this run started is gone when the tests are; another run's,
    on the same machine at the same time, are not ours to count."""
    run = secrets.token_hex(8)
    os.environ[RUN_MARKER] = run
    yield
    if os.geteuid() != 0:
        return
    import time

    deadline = time.monotonic() + 5
    while (left := _our_daemons(run)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left running by the tests: {sorted(left)}"
