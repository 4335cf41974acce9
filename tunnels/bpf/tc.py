"""tc programs on an interface through libbpf's netlink calls (no `tc` process per pod).

A clsact qdisc holds them (`bpf_tc_hook_create`); each program is a direct-action cls_bpf filter
at one handle and priority (`bpf_tc_attach`). Filters are kernel objects of the interface: they
outlive the process that attached them, and attaching again at the same handle and priority with
BPF_TC_F_REPLACE swaps the program atomically (a restarted agent never leaves a gap). They
vanish with the interface (a pod's veth deleted). Call these inside the interface's netns.

Struct layouts are libbpf 1.1's `bpf_tc_hook` (24 bytes) and `bpf_tc_opts` (32 bytes).
"""

from __future__ import annotations

import ctypes
import errno as _errno

from . import libbpf
from .errors import BpfAttachError

INGRESS, EGRESS = 1, 2  # enum bpf_tc_attach_point
F_REPLACE = 1
HANDLE, PRIORITY = 0x7757, 1  # ours on every hook ("wW")


class TcHook(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int), ("attach_point", ctypes.c_int),
                ("parent", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class TcOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32), ("priority", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


_typed = False


def _lib() -> ctypes.CDLL:
    global _typed
    lib = libbpf.lib()
    if not _typed:
        for name in ("bpf_tc_hook_create", "bpf_tc_hook_destroy"):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.POINTER(TcHook)]
        for name in ("bpf_tc_attach", "bpf_tc_detach", "bpf_tc_query"):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]
        _typed = True
    return lib


def _hook(ifindex: int, point: int) -> TcHook:
    return TcHook(sz=ctypes.sizeof(TcHook), ifindex=ifindex, attach_point=point)


def _opts(prog_fd: int = 0, flags: int = 0) -> TcOpts:
    return TcOpts(sz=ctypes.sizeof(TcOpts), prog_fd=prog_fd, flags=flags, handle=HANDLE, priority=PRIORITY)


def attach(ifindex: int, point: int, prog_fd: int, what: str) -> None:
    """Our filter at `point` (INGRESS or EGRESS) of `ifindex` runs `prog_fd` (replacing what was there)."""
    lib = _lib()
    hook = _hook(ifindex, point)
    ret = lib.bpf_tc_hook_create(ctypes.byref(hook))
    if ret < 0 and -ret != _errno.EEXIST:
        raise libbpf.error_for(-ret, f"clsact qdisc on ifindex {ifindex} ({what})", BpfAttachError)
    opts = _opts(prog_fd, F_REPLACE)
    ret = lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
    if ret < 0:
        raise libbpf.error_for(-ret, f"attach {what} to ifindex {ifindex}", BpfAttachError)


def attached(ifindex: int, point: int) -> int:
    """The id of the program our filter at `point` runs; 0 when there is none."""
    hook = _hook(ifindex, point)
    opts = _opts()
    ret = _lib().bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts))
    if ret < 0:
        if -ret in (_errno.ENOENT, _errno.EINVAL, _errno.ENODEV):
            return 0
        raise libbpf.error_for(-ret, f"query tc filter on ifindex {ifindex}", BpfAttachError)
    return int(opts.prog_id)


def detach(ifindex: int, point: int) -> bool:
    """Remove our filter at `point`; False when it (or the interface) was already gone."""
    hook = _hook(ifindex, point)
    opts = _opts()
    ret = _lib().bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
    if ret < 0:
        if -ret in (_errno.ENOENT, _errno.EINVAL, _errno.ENODEV):
            return False
        raise libbpf.error_for(-ret, f"detach tc filter from ifindex {ifindex}", BpfAttachError)
    return True
