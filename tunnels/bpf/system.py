"""The file systems the load balancer needs: bpffs for pins, cgroup v2 for attaching programs.

Both are mounted only where absent, and every call is idempotent. Call them in the host's
mount namespace before starting anything in a private one (lab nodes): a bpffs mounted inside
a private mount namespace is a new, empty instance that nobody else sees.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from .errors import BpfError

BPFFS = Path("/sys/fs/bpf")
CGROUP2 = Path("/sys/fs/cgroup/unified")  # hybrid layout: v1 controllers beside it
PIN_ROOT = BPFFS / "wiremesh"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def mounts() -> list[tuple[Path, str]]:
    """(mount point, file system type) of every mount this process sees, in mount order."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")  # \040 and friends
            out.append((Path(point), fields[sep + 1]))
    return out


def _mount(fstype: str, target: Path, data: str | None = None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if _libc.mount(fstype.encode(), os.fsencode(target), fstype.encode(), 0,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise BpfError(f"mount -t {fstype} {target}: {os.strerror(err)}", err)


def mount_bpffs(path: Path = BPFFS) -> Path:
    """Mount bpffs at `path` unless one is there; return `path`."""
    if (path, "bpf") not in mounts():
        _mount("bpf", path, "mode=0700")
    return path


def ensure_cgroup2(path: Path = CGROUP2) -> Path:
    """The cgroup v2 mount point: `path` if mounted there, else any existing one, else mount at `path`."""
    found = [p for p, fs in mounts() if fs == "cgroup2"]
    if path in found:
        return path
    if found:
        return found[0]
    _mount("cgroup2", path)
    return path


def cgroup_for(relpath: str | Path, root: Path | None = None) -> Path:
    """Create (if needed) the cgroup v2 group `relpath` under the v2 root; return its directory."""
    base = root if root is not None else ensure_cgroup2()
    if Path(relpath).is_absolute() or ".." in Path(relpath).parts:
        raise ValueError(f"cgroup {relpath}: must be a relative path inside {base}")
    group = base / relpath
    try:
        group.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BpfError(f"create cgroup {group}: {e.strerror}", e.errno) from e
    return group


def remove_cgroup(group: Path) -> None:
    """Remove an empty cgroup (and its empty children); gone already is fine."""
    if not group.exists():
        return
    for child in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir(child)
    _rmdir(group)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        why = "processes are still in it" if e.errno == errno.EBUSY else e.strerror
        raise BpfError(f"remove cgroup {path}: {why}", e.errno) from e


def is_cgroup2(path: Path) -> bool:
    """Whether `path` lies on a cgroup v2 mount (the longest mount point above it)."""
    real = Path(os.path.realpath(path))
    best: tuple[int, str] = (-1, "")
    for point, fs in mounts():
        if real == point or point in real.parents:
            if len(point.parts) >= best[0]:
                best = (len(point.parts), fs)
    return best[1] == "cgroup2"
