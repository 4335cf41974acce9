"""Compiling the eBPF sources (lb.bpf.c, policy.bpf.c) into the objects the loaders open (never
committed: built on each machine)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from .errors import BpfBuildError, BpfUnavailable

SOURCE = Path(__file__).resolve().with_name("lb.bpf.c")
BUILD_DIR = SOURCE.with_name("build")  # gitignored
OBJECT = BUILD_DIR / "lb.bpf.o"
HELPERS = Path("/usr/include/bpf/bpf_helpers.h")  # from libbpf-dev


def compile_command(source: Path, output: Path) -> list[str]:
    """clang's command line; the arch include dir holds asm/types.h for linux/bpf.h."""
    return ["clang", "-O2", "-g", "-Wall", "-target", "bpf",
            f"-I/usr/include/{platform.machine()}-linux-gnu", "-c", str(source), "-o", str(output)]


POLICY_SOURCE = SOURCE.with_name("policy.bpf.c")
POLICY_OBJECT = BUILD_DIR / "policy.bpf.o"
SOURCES = {OBJECT: SOURCE, POLICY_OBJECT: POLICY_SOURCE}


def needs_build(obj: Path = OBJECT) -> bool:
    return not obj.exists() or obj.stat().st_mtime < SOURCES[obj].stat().st_mtime


def build_object(force: bool = False, obj: Path = OBJECT) -> Path:
    """The compiled object (`OBJECT`: the service LB; `POLICY_OBJECT`: network policy), rebuilt
    when missing, older than its source, or `force`d."""
    source = SOURCES[obj]
    if not force and not needs_build(obj):
        return obj
    if shutil.which("clang") is None:
        raise BpfUnavailable(f"clang not found: it compiles {source.name}; install clang, llvm and "
                             "libbpf-dev (scripts/setup.sh)")
    if not HELPERS.exists():
        raise BpfUnavailable(f"{HELPERS} not found: install libbpf-dev (scripts/setup.sh)")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = BUILD_DIR / f".{obj.name}.{os.getpid()}.tmp"  # several agents may build at once
    try:
        proc = subprocess.run(compile_command(source, tmp), capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise BpfBuildError(f"clang failed on {source} (exit {proc.returncode}):\n{tail}")
        os.replace(tmp, obj)
    finally:
        tmp.unlink(missing_ok=True)
    return obj
