"""Running code inside another network namespace, one thread at a time.

setns(CLONE_NEWNET) changes only the calling thread, so a call made in a thread that has
entered a namespace opens its sockets (netlink, HTTP) there while the process stays put.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import TunnelError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str | Path) -> None:
    """Move the calling thread into the network namespace at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise TunnelError(f"network namespace {path}: {e.strerror}", e.errno) from e
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise TunnelError(f"network namespace {path}: setns: {os.strerror(err)}", err)
    finally:
        os.close(fd)


def run_in_netns(path: str | Path, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run `fn` in a short-lived thread inside the namespace at `path`; return or raise its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            setns(path)
            box["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="netns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


class NetnsExecutor:
    """A pool of threads living in one network namespace, for many calls in a row."""

    def __init__(self, path: str | Path, workers: int = 4) -> None:
        if not Path(path).exists():
            raise TunnelError(f"network namespace {path} does not exist")
        self.path = str(path)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="netns", initializer=setns, initargs=(self.path,))

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return self._pool.submit(fn, *args, **kw).result()

    def submit(self, fn: Callable[..., T], *args: Any, **kw: Any) -> "concurrent.futures.Future[T]":
        return self._pool.submit(fn, *args, **kw)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
