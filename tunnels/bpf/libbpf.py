"""A thin ctypes binding over the system libbpf (Debian's libbpf1, 1.1.2 and later).

Only what the service load balancer needs: open an object with a pin root, load it, find its
programs and maps, attach programs to a cgroup through links, pin, open, swap and detach links,
and the low-level map calls (single and batch). Every failure becomes a `BpfError` subclass
that keeps the errno. libbpf's own messages (verifier logs among them) go to the logger
`wiremesh.tunnels.bpf` at debug level, and the last ones are quoted in load errors.

Struct layouts are those of libbpf 1.1.2's headers: `bpf_object_open_opts` (80 bytes, `sz`
first) and `bpf_map_batch_opts` (24 bytes, `sz` first).
"""

from __future__ import annotations

import collections
import ctypes
import errno as _errno
import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from .errors import BpfAttachError, BpfError, BpfLoadError, BpfMapError, BpfMapFull, BpfUnavailable

log = logging.getLogger("wiremesh.tunnels.bpf")

c_void_p, c_char_p, c_int, c_uint32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32


class ObjectOpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts (libbpf 1.1)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", c_char_p),
        ("_attach_prog_fd_stub", c_uint32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_void_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class MapBatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts."""

    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_MAP_FULL = {_errno.E2BIG, _errno.ENOSPC, _errno.ENOMEM}
_UNAVAILABLE = {_errno.EPERM, _errno.ENOSYS, _errno.EOPNOTSUPP, 524}  # 524: the kernel's ENOTSUPP

# name: (restype, argtypes)
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "libbpf_set_print": (c_void_p, [_PRINT_FN]),
    "bpf_object__open_file": (c_void_p, [c_char_p, ctypes.POINTER(ObjectOpenOpts)]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__key_size": (c_uint32, [c_void_p]),
    "bpf_map__value_size": (c_uint32, [c_void_p]),
    "bpf_program__attach_cgroup": (c_void_p, [c_void_p, c_int]),
    "bpf_link__pin": (c_int, [c_void_p, c_char_p]),
    "bpf_link__open": (c_void_p, [c_char_p]),
    "bpf_link__update_program": (c_int, [c_void_p, c_void_p]),
    "bpf_link__unpin": (c_int, [c_void_p]),
    "bpf_link__detach": (c_int, [c_void_p]),
    "bpf_link__destroy": (c_int, [c_void_p]),
    "bpf_link__fd": (c_int, [c_void_p]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(c_uint32)]),
    "bpf_obj_get": (c_int, [c_char_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_batch": (c_int, [c_int, c_void_p, c_void_p, ctypes.POINTER(c_uint32),
                                     ctypes.POINTER(MapBatchOpts)]),
    "bpf_map_lookup_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                     ctypes.POINTER(c_uint32), ctypes.POINTER(MapBatchOpts)]),
}

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()
_messages: collections.deque[str] = collections.deque(maxlen=40)  # libbpf's last messages
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [c_char_p, ctypes.c_size_t, c_char_p, c_void_p]
_libc.vsnprintf.restype = c_int


def _print(level: int, fmt: bytes | None, args: int | None) -> int:
    buf = ctypes.create_string_buffer(2048)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip()
    if text:
        _messages.append(text)
        log.debug("%s", text)
    return 0


_print_cb = _PRINT_FN(_print)  # kept referenced: libbpf holds the pointer


def lib() -> ctypes.CDLL:
    """The loaded libbpf.so.1, with argument types set and its messages routed to logging."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                handle = ctypes.CDLL("libbpf.so.1", use_errno=True)
            except OSError as e:
                raise BpfUnavailable(f"libbpf.so.1 not found ({e}); install libbpf1") from e
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(handle, name)
                fn.restype, fn.argtypes = restype, argtypes
            handle.libbpf_set_print(_print_cb)
            _lib = handle
        return _lib


def last_messages(n: int = 8) -> str:
    """libbpf's last `n` messages, one line each (verifier output, map reuse refusals)."""
    return "\n".join(list(_messages)[-n:])


def error_for(err: int, what: str, kind: type[BpfError] = BpfError) -> BpfError:
    """The BpfError for a positive errno: unavailable (EPERM...), full (E2BIG...), or `kind`."""
    message = f"{what}: {os.strerror(err)} (errno {err})"
    if err in _UNAVAILABLE:
        return BpfUnavailable(message, err)
    if kind is BpfMapError and err in _MAP_FULL:
        return BpfMapFull(message, err)
    return kind(message, err)


def _check(ret: int, what: str, kind: type[BpfError] = BpfError) -> int:
    if ret < 0:
        raise error_for(-ret, what, kind)
    return ret


def _check_ptr(ptr: int | None, what: str, kind: type[BpfError]) -> int:
    if not ptr:
        raise error_for(ctypes.get_errno() or _errno.EINVAL, what, kind)
    return ptr


# ---- objects, programs, links ----

def open_object(path: Path, pin_root: Path) -> int:
    """bpf_object__open_file with maps auto-pinned (LIBBPF_PIN_BY_NAME) under `pin_root`."""
    opts = ObjectOpenOpts(sz=ctypes.sizeof(ObjectOpenOpts), pin_root_path=os.fsencode(pin_root))
    ptr = lib().bpf_object__open_file(os.fsencode(path), ctypes.byref(opts))
    return _check_ptr(ptr, f"open {path}", BpfLoadError)


def load_object(obj: int, what: str) -> None:
    """bpf_object__load: create or reuse the pinned maps, verify and load the programs."""
    _messages.clear()
    ret = lib().bpf_object__load(obj)
    if ret < 0:
        err = error_for(-ret, f"load {what}", BpfLoadError)
        detail = last_messages()
        if detail:
            err.args = (f"{err.args[0]}; libbpf said:\n{detail}",)
        raise err


def close_object(obj: int) -> None:
    lib().bpf_object__close(obj)


def find_program(obj: int, name: str) -> int:
    return _check_ptr(lib().bpf_object__find_program_by_name(obj, name.encode()), f"program {name}", BpfLoadError)


def find_map(obj: int, name: str) -> int:
    return _check_ptr(lib().bpf_object__find_map_by_name(obj, name.encode()), f"map {name}", BpfLoadError)


def attach_cgroup(prog: int, cgroup_fd: int, what: str) -> int:
    """bpf_program__attach_cgroup: a new bpf_link (BPF_LINK_CREATE) from `prog` to the cgroup."""
    return _check_ptr(lib().bpf_program__attach_cgroup(prog, cgroup_fd), what, BpfAttachError)


def link_pin(link: int, path: Path) -> None:
    _check(lib().bpf_link__pin(link, os.fsencode(path)), f"pin link {path}", BpfAttachError)


def link_open(path: Path) -> int | None:
    """bpf_link__open of a pinned link; None when nothing is pinned there."""
    ptr = lib().bpf_link__open(os.fsencode(path))
    if not ptr:
        err = ctypes.get_errno() or _errno.EINVAL
        if err == _errno.ENOENT:
            return None
        raise error_for(err, f"open link {path}", BpfAttachError)
    return int(ptr)


def link_update_program(link: int, prog: int, what: str) -> None:
    """bpf_link__update_program: the link runs `prog` from now on, with no detach gap."""
    _check(lib().bpf_link__update_program(link, prog), what, BpfAttachError)


def link_detach(link: int) -> None:
    """BPF_LINK_DETACH: the program stops running even while the link has other holders."""
    ret = lib().bpf_link__detach(link)
    if ret < 0 and -ret not in (_errno.ENOENT, _errno.ENOLINK):
        raise error_for(-ret, "detach link", BpfAttachError)


def link_unpin(link: int) -> None:
    ret = lib().bpf_link__unpin(link)
    if ret < 0 and -ret != _errno.ENOENT:
        raise error_for(-ret, "unpin link", BpfAttachError)


def link_destroy(link: int) -> None:
    """Free libbpf's handle (and close its fd); a pinned link lives on."""
    lib().bpf_link__destroy(link)


class LinkInfo(NamedTuple):
    link_id: int
    prog_id: int
    cgroup_id: int  # the cgroup directory's inode number on cgroup v2


def link_info(link: int) -> LinkInfo:
    """The ids of a cgroup link (the head of struct bpf_link_info, with its cgroup member)."""
    head = struct.Struct("=IIIxxxxQI")  # type, id, prog_id, (pad), cgroup.cgroup_id, cgroup.attach_type
    buf = ctypes.create_string_buffer(32)
    size = c_uint32(len(buf))
    _check(lib().bpf_obj_get_info_by_fd(lib().bpf_link__fd(link), buf, ctypes.byref(size)), "link info",
           BpfAttachError)
    _type, link_id, prog_id, cgroup_id, _attach = head.unpack_from(buf.raw)
    return LinkInfo(link_id, prog_id, cgroup_id)


def program_fd(prog: int) -> int:
    return _check(lib().bpf_program__fd(prog), "program fd")


# ---- maps ----

class BpfMap:
    """One map by file descriptor, keys and values as bytes of the map's sizes."""

    def __init__(self, name: str, fd: int, key_size: int, value_size: int) -> None:
        self.name, self.fd, self.key_size, self.value_size = name, fd, key_size, value_size
        self._lib = lib()

    @classmethod
    def of(cls, obj: int, name: str) -> BpfMap:
        m = find_map(obj, name)
        fd = _check(lib().bpf_map__fd(m), f"map {name} fd", BpfLoadError)
        return cls(name, fd, lib().bpf_map__key_size(m), lib().bpf_map__value_size(m))

    @classmethod
    def pinned(cls, path: Path, key_size: int, value_size: int) -> BpfMap:
        """A map pinned at `path`, opened without loading any program (to read it)."""
        fd = lib().bpf_obj_get(str(path).encode())
        if fd < 0:
            raise error_for(-fd, f"open pinned map {path}", BpfMapError)
        return cls(path.name, fd, key_size, value_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _fail(self, ret: int, op: str) -> BpfError:
        return error_for(-ret, f"{op} in map {self.name}", BpfMapError)

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_size)
        ret = self._lib.bpf_map_lookup_elem(self.fd, key, value)
        if ret == -_errno.ENOENT:
            return None
        if ret < 0:
            raise self._fail(ret, "lookup")
        return value.raw

    def update(self, key: bytes, value: bytes) -> None:
        ret = self._lib.bpf_map_update_elem(self.fd, key, value, 0)
        if ret < 0:
            raise self._fail(ret, "update")

    def delete(self, key: bytes) -> bool:
        """Delete one key; False when it was already gone."""
        ret = self._lib.bpf_map_delete_elem(self.fd, key)
        if ret == -_errno.ENOENT:
            return False
        if ret < 0:
            raise self._fail(ret, "delete")
        return True

    def update_batch(self, keys: list[bytes], values: list[bytes]) -> None:
        """Write many entries in one bpf() call (BPF_MAP_UPDATE_BATCH, kernel 5.6+)."""
        if not keys:
            return
        count = c_uint32(len(keys))
        opts = MapBatchOpts(sz=ctypes.sizeof(MapBatchOpts))
        ret = self._lib.bpf_map_update_batch(self.fd, b"".join(keys), b"".join(values),
                                             ctypes.byref(count), ctypes.byref(opts))
        if ret < 0:
            raise error_for(-ret, f"batch update in map {self.name} ({count.value} of {len(keys)} "
                            "written)", BpfMapError)

    def keys(self) -> Iterator[bytes]:
        """Every key, by BPF_MAP_GET_NEXT_KEY."""
        key, nxt = None, ctypes.create_string_buffer(self.key_size)
        while True:
            ret = self._lib.bpf_map_get_next_key(self.fd, key, nxt)
            if ret == -_errno.ENOENT:
                return
            if ret < 0:
                raise self._fail(ret, "next key")
            key = nxt.raw
            yield key

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every entry, read in batches (BPF_MAP_LOOKUP_BATCH), or key by key where unsupported."""
        out: list[tuple[bytes, bytes]] = []
        chunk = 4096
        keys = ctypes.create_string_buffer(self.key_size * chunk)
        values = ctypes.create_string_buffer(self.value_size * chunk)
        token_in, token_out = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)
        opts = MapBatchOpts(sz=ctypes.sizeof(MapBatchOpts))
        first = True
        while True:
            count = c_uint32(chunk)
            ret = self._lib.bpf_map_lookup_batch(self.fd, None if first else token_in, token_out, keys,
                                                 values, ctypes.byref(count), ctypes.byref(opts))
            if ret < 0 and -ret in (_errno.EINVAL, _errno.EOPNOTSUPP, 524) and first:
                return self._items_by_key()
            if ret < 0 and -ret != _errno.ENOENT:
                raise self._fail(ret, "batch lookup")
            kraw, vraw = keys.raw, values.raw
            ks, vs = self.key_size, self.value_size
            out.extend((kraw[i * ks:(i + 1) * ks], vraw[i * vs:(i + 1) * vs]) for i in range(count.value))
            if ret < 0:  # ENOENT: that was the last batch
                return out
            ctypes.memmove(token_in, token_out, 8)
            first = False

    def _items_by_key(self) -> list[tuple[bytes, bytes]]:
        out = []
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out
