"""One WireGuard device API, two backends: the kernel module (netlink) and wireguard-go (UAPI)."""

from __future__ import annotations

import abc
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from wiremesh.keys import PrivateKey

from . import links
from .errors import DeviceNotFound, KernelUnsupported, TunnelError
from .sched import set_session_nice
from .model import DeviceState, PeerChange
from .uapi import UAPIClient, format_set, socket_path

log = logging.getLogger(__name__)

BACKENDS = ("auto", "kernel", "userspace")
# wireguard-go's TUN queues what the kernel routes into the tunnel until wireguard-go reads it:
# 500 packets by default, 0.15 s of traffic at 3 000 packets/s. On a busy 2-core host
# wireguard-go went without CPU for longer and the queue dropped whole bursts (wm0 tx_dropped:
# 2 555 packets in 30 s of pings, no rotation); 10 000 rides out stalls of seconds.
TUN_TXQUEUELEN = 10_000


class WireGuardDevice(abc.ABC):
    """A WireGuard interface in the current network namespace."""

    backend: str

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    def exists(self) -> bool:
        """True if the interface is there and answers."""

    @abc.abstractmethod
    def create(self) -> None:
        """Create the interface; one that already exists is kept as it is."""

    @abc.abstractmethod
    def show(self) -> DeviceState:
        """Read the device's real state."""

    @abc.abstractmethod
    def _set(self, private_key: PrivateKey | None, listen_port: int | None, changes: list[PeerChange]) -> None:
        """Send one configuration update."""

    def destroy(self) -> None:
        """Remove the interface; one already gone is fine."""
        links.delete_link(self.name)

    def configure(self, private_key: PrivateKey, listen_port: int) -> bool:
        """Set identity and port, only if they differ from the device's. True if anything changed."""
        state = self.show()
        key = private_key if state.public_key != private_key.public_key().base64 else None
        port = listen_port if state.listen_port != listen_port else None
        if key is None and port is None:
            return False
        self._set(key, port, [])
        return True

    def apply(self, changes: list[PeerChange]) -> None:
        """Apply peer changes (already the smallest diff) in one update."""
        if changes:
            self._set(None, None, changes)


class UserspaceDevice(WireGuardDevice):
    """wireguard-go, started detached so the dataplane outlives the agent; driven by UAPI."""

    backend = "userspace"

    def __init__(self, name: str, state_dir: Path | None = None, binary: str = "wireguard-go") -> None:
        super().__init__(name)
        self.uapi = UAPIClient(name)
        self.state_dir = Path(state_dir) if state_dir else None
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid_file(self) -> Path | None:
        return self.state_dir / f"wireguard-go-{self.name}.pid" if self.state_dir else None

    def exists(self) -> bool:
        """The interface is there and a wireguard-go listens on its socket. One too busy to
        answer in time counts: taken for dead, it was started over and every tunnel of the node
        cut for 9 s (a full pass under a CPU hog); the next UAPI call fails the pass instead,
        which is retried."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None  # ours exited (and is reaped now)
        return links.link_exists(self.name) and self.uapi.listening()

    def create(self) -> None:
        if self.exists():
            return
        if links.link_exists(self.name):
            # An interface with nothing listening on its socket: a wireguard-go that died. Start over.
            links.delete_link(self.name)
        binary = shutil.which(self.binary)
        if binary is None:
            raise KernelUnsupported(f"{self.name}: {self.binary} not found on PATH (run scripts/setup.sh)")
        socket_path(self.name).parent.mkdir(parents=True, exist_ok=True)
        logf = (self.state_dir / f"wireguard-go-{self.name}.log") if self.state_dir else Path(os.devnull)
        # WIREMESH_WG_LOG_LEVEL=verbose: its handshakes in the log (debugging a rotation)
        env = dict(os.environ, LOG_LEVEL=os.environ.get("WIREMESH_WG_LOG_LEVEL", "error"),
                   WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
        with open(logf, "ab") as out:
            # -f keeps it in the foreground so its pid is the real one; a new session detaches it
            # from the agent: killing the agent (even with SIGKILL) leaves the tunnel running.
            proc = subprocess.Popen(
                [binary, "-f", self.name],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, close_fds=True, env=env,
                preexec_fn=set_session_nice,  # its new session at this process's nice (tunnels.sched)
            )
        if self.pid_file:
            self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TunnelError(f"{self.name}: wireguard-go exited with {proc.returncode} (see {logf})")
            if self.exists():
                log.info("started wireguard-go for %s (pid %d)", self.name, proc.pid)
                try:
                    links.set_txqueuelen(self.name, TUN_TXQUEUELEN)
                except TunnelError as e:
                    log.warning("%s: transmit queue left at its default (%s)", self.name, e)
                self._proc = proc  # kept so that its exit is reaped, never a zombie of the agent
                return
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise TunnelError(f"{self.name}: wireguard-go did not open {socket_path(self.name)} within 5 s")

    def show(self) -> DeviceState:
        return self.uapi.get()

    def _set(self, private_key: PrivateKey | None, listen_port: int | None, changes: list[PeerChange]) -> None:
        self.uapi.set(format_set(private_key=private_key, listen_port=listen_port, changes=changes))

    def destroy(self) -> None:
        # Deleting the TUN link makes wireguard-go exit; the socket goes with it.
        links.delete_link(self.name)
        if self.pid_file and self.pid_file.exists():
            self.pid_file.unlink(missing_ok=True)


def kernel_module_available() -> bool:
    """True where the running kernel has WireGuard (built in or loaded)."""
    return Path("/sys/module/wireguard").exists()


def open_device(name: str, backend: str = "auto", state_dir: Path | None = None) -> WireGuardDevice:
    """The device `name` with the chosen backend; `auto` takes the kernel's where it exists."""
    if backend not in BACKENDS:
        raise TunnelError(f"backend: must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        backend = "kernel" if kernel_module_available() else "userspace"
    if backend == "kernel":
        if not kernel_module_available():
            raise KernelUnsupported(
                f"{name}: the kernel has no WireGuard module (/sys/module/wireguard); use backend = \"userspace\""
            )
        from .kernel import KernelDevice

        return KernelDevice(name)
    return UserspaceDevice(name, state_dir=state_dir)


__all__ = ["BACKENDS", "DeviceNotFound", "UserspaceDevice", "WireGuardDevice", "kernel_module_available", "open_device"]
