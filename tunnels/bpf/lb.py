"""The socket load balancer of one node: its programs on a cgroup, its maps, its pins.

Everything lives under one pin directory (one per agent, e.g. /sys/fs/bpf/wiremesh/<node>/):

    wm_lb4_services  wm_lb4_backends  wm_lb4_reverse_sk     maps, pinned by libbpf (by name)
    links/wm_connect4  links/wm_sendmsg4  links/wm_recvmsg4  links/wm_getpeername4

Programs, maps and links outlive the agent. A restarted agent opens the object with the same pin
root, so libbpf reuses the pinned maps (their contents stay), and swaps its freshly loaded
programs into the pinned links (BPF_LINK_UPDATE): connections never see a moment without a
program, nor empty maps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from . import libbpf
from .build import OBJECT, build_object, needs_build
from .errors import BpfAttachError, BpfError, BpfUnavailable
from .model import BACKEND_KEY, BACKEND_VALUE, SERVICE_KEY, SERVICE_VALUE, Backend, Frontend, ServiceEntry
from .system import BPFFS, PIN_ROOT, is_cgroup2, mount_bpffs
from .table import ServiceTable

log = logging.getLogger("wiremesh.tunnels.bpf")

PROGRAMS = ("wm_connect4", "wm_sendmsg4", "wm_recvmsg4", "wm_getpeername4")
MAPS = ("wm_lb4_services", "wm_lb4_backends", "wm_lb4_reverse_sk")
_GONE = {2, 67}  # ENOENT, ENOLINK: a link whose cgroup was removed is defunct


def pin_dir_for(name: str) -> Path:
    """The pin directory of the agent (or lab node) called `name`."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"pin directory name {name!r}")
    return PIN_ROOT / name


def read_pinned(pin_dir: str | Path) -> dict[Frontend, ServiceEntry]:
    """What a node's maps hold, read through their pins (no program is loaded or touched)."""
    pin = Path(pin_dir)
    svcs = libbpf.BpfMap.pinned(pin / "wm_lb4_services", SERVICE_KEY.size, SERVICE_VALUE.size)
    try:
        backends = libbpf.BpfMap.pinned(pin / "wm_lb4_backends", BACKEND_KEY.size, BACKEND_VALUE.size)
        try:
            return ServiceTable(svcs, backends).snapshot()
        finally:
            backends.close()
    finally:
        svcs.close()


class ServiceLB:
    """The programs, maps and pinned links of one node's service load balancer."""

    def __init__(self, pin_dir: str | Path, cgroup_path: str | Path) -> None:
        self.pin_dir = Path(pin_dir)
        self.cgroup_path = Path(cgroup_path)
        self._obj: int | None = None
        self._table: ServiceTable | None = None

    @property
    def links_dir(self) -> Path:
        return self.pin_dir / "links"

    def link_path(self, program: str) -> Path:
        return self.links_dir / program

    # ---- loading ----

    def load_or_adopt(self) -> ServiceLB:
        """Load the programs (reusing pinned maps) and attach them, adopting pinned links.

        Returns self. Builds the object first if it is missing or older than its source.
        """
        if os.geteuid() != 0:
            raise BpfUnavailable("the service load balancer needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")
        self.close()
        if self.pin_dir.is_relative_to(BPFFS):
            mount_bpffs(BPFFS)
        if not is_cgroup2(self.cgroup_path) or not self.cgroup_path.is_dir():
            raise BpfAttachError(f"{self.cgroup_path} is not a cgroup v2 directory (see ensure_cgroup2, cgroup_for)")
        obj_path = build_object() if needs_build() else OBJECT
        self.links_dir.mkdir(parents=True, exist_ok=True)
        obj = libbpf.open_object(obj_path, self.pin_dir)
        try:
            libbpf.load_object(obj, f"{obj_path} (maps pinned in {self.pin_dir})")
            maps = {name: libbpf.BpfMap.of(obj, name) for name in MAPS}
            self._attach_all(obj)
        except BaseException:
            libbpf.close_object(obj)
            raise
        self._obj = obj
        self._table = ServiceTable(maps["wm_lb4_services"], maps["wm_lb4_backends"])
        return self

    def _attach_all(self, obj: int) -> None:
        fd = os.open(self.cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in PROGRAMS:
                self._attach(obj, name, fd)
        finally:
            os.close(fd)

    def _attach(self, obj: int, name: str, cgroup_fd: int) -> None:
        prog = libbpf.find_program(obj, name)
        path = self.link_path(name)
        link = libbpf.link_open(path)
        if link is not None:
            try:
                if libbpf.link_info(link).cgroup_id != os.fstat(cgroup_fd).st_ino:
                    log.info("pinned link %s is on another cgroup: moving it to %s", path, self.cgroup_path)
                    libbpf.link_detach(link)
                    libbpf.link_unpin(link)
                else:
                    libbpf.link_update_program(link, prog, f"swap {name} into {path}")
                    log.debug("adopted %s: program swapped", path)
                    return
            except BpfError as e:
                if e.errno not in _GONE:
                    raise
                log.info("pinned link %s is defunct (its cgroup went away): attaching anew", path)
                libbpf.link_unpin(link)
            finally:
                libbpf.link_destroy(link)
        link = libbpf.attach_cgroup(prog, cgroup_fd, f"attach {name} to {self.cgroup_path}")
        try:
            libbpf.link_pin(link, path)
        except BaseException:
            libbpf.link_detach(link)
            raise
        finally:
            libbpf.link_destroy(link)  # the pin keeps the link (and so the program) alive

    @property
    def table(self) -> ServiceTable:
        if self._table is None:
            raise BpfError(f"service load balancer {self.pin_dir} is not loaded (call load_or_adopt)")
        return self._table

    # ---- the maps ----

    def read(self) -> dict[Frontend, ServiceEntry]:
        """What the maps hold: per frontend (VIP, port, protocol), its id and backends in slot order."""
        return self.table.read()

    def update(self, frontend: Frontend, backends: Sequence[Backend]) -> None:
        """Make `frontend` reach exactly `backends`, never passing through zero of them."""
        self.table.update(frontend, backends)

    def update_many(self, services: Mapping[Frontend, Sequence[Backend]]) -> None:
        """update() for many frontends, in batches (the first full sync)."""
        self.table.update_many(services)

    def delete(self, frontend: Frontend) -> bool:
        """Remove `frontend`; False if the maps did not hold it."""
        return self.table.delete(frontend)

    def prune(self, keep: Iterable[Frontend]) -> list[Frontend]:
        """Remove every frontend not in `keep` (only after a full sync) and unused backends."""
        return self.table.prune(keep)

    # ---- lifetime ----

    def close(self) -> None:
        """Let go of our descriptors; programs, maps and links stay (pinned)."""
        if self._obj is not None:
            libbpf.close_object(self._obj)
            self._obj, self._table = None, None

    def unload(self) -> None:
        """Detach the programs and remove every pin: nothing of this load balancer is left.

        Works without load_or_adopt() (e.g. `lab down` from another process).
        """
        self.close()
        for name in PROGRAMS:
            path = self.link_path(name)
            link = libbpf.link_open(path) if path.exists() else None
            if link is None:
                continue
            try:
                libbpf.link_detach(link)
                libbpf.link_unpin(link)
            finally:
                libbpf.link_destroy(link)
        for p in [*(self.link_path(n) for n in PROGRAMS), *(self.pin_dir / m for m in MAPS)]:
            p.unlink(missing_ok=True)
        for d in (self.links_dir, self.pin_dir):
            _rmdir(d)
        if self.pin_dir.parent == PIN_ROOT:
            _rmdir(PIN_ROOT, missing_or_busy_ok=True)

    def __enter__(self) -> ServiceLB:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _rmdir(path: Path, missing_or_busy_ok: bool = False) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        if not missing_or_busy_ok:
            raise BpfError(f"remove {path}: {e.strerror} (unknown pins left there?)", e.errno) from e
