"""What the CNI plugin keeps on the node: address leases and attachments, under the agent's state dir.

    <state_dir>/state.json                      written by the agent: pod CIDR, pod MTU
    <state_dir>/cni/lock                        flock held by every ADD, DEL and CHECK
    <state_dir>/cni/ipam/<ip>                   one file per leased address: "<container>/<ifname>"
    <state_dir>/cni/ipam/last                   the last address given (allocation goes round)
    <state_dir>/cni/attachments/<id>.json       one per (container, ifname): netns, address, ...

Host-local style: a lease is a file created with O_EXCL, so an address is never given twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path


class NoFreeAddress(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Attachment:
    container_id: str
    ifname: str
    netns: str
    address: str  # a.b.c.d/32
    gateway: str
    host_ifname: str


@dataclass(frozen=True, slots=True)
class NodeInfo:
    pod_cidr: str
    overlay_ip: str
    pod_mtu: int | None


class CniState:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "cni"
        self.ipam = self.dir / "ipam"
        self.attachments_dir = self.dir / "attachments"

    def node_info(self) -> NodeInfo | None:
        """The agent's view of this node, or None if the agent has not leased a CIDR yet."""
        try:
            d = json.loads((self.state_dir / "state.json").read_text())
            cidr = str(ipaddress.ip_network(d["pod_cidr"]))
            net = ipaddress.ip_network(cidr)
            mtu = d.get("pod_mtu")
            return NodeInfo(cidr, str(net.network_address + 1), int(mtu) if mtu else None)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.ipam.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.attachments_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def attachment_id(container_id: str, ifname: str) -> str:
        return hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:32]

    def allocate(self, pod_cidr: str, container_id: str, ifname: str) -> str:
        """Lease a free address of `pod_cidr` (skipping the network, overlay and broadcast addresses)."""
        net = ipaddress.ip_network(pod_cidr)
        owner = f"{container_id}/{ifname}"
        first, last = int(net.network_address) + 2, int(net.broadcast_address) - 1  # skip .0, .1 (node), broadcast
        count = max(0, last - first + 1)
        self.ipam.mkdir(parents=True, exist_ok=True, mode=0o700)
        for f in self.ipam.iterdir():
            if f.name != "last" and f.read_text() == owner:
                if ipaddress.ip_address(f.name) in net:
                    return f.name  # already leased to this attachment
                f.unlink(missing_ok=True)  # a lease from a pod CIDR the node no longer has
        try:
            prev = int(ipaddress.ip_address((self.ipam / "last").read_text().strip()))
            start = prev + 1 - first if first <= prev <= last else 0
        except (OSError, ValueError):
            start = 0
        for i in range(count):
            ip = str(ipaddress.ip_address(first + (start + i) % count))
            try:
                fd = os.open(self.ipam / ip, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as lease:
                lease.write(owner)
            (self.ipam / "last").write_text(ip)
            return ip
        raise NoFreeAddress(f"no free address in {pod_cidr} ({count} in use)")

    def release(self, container_id: str, ifname: str) -> list[str]:
        owner = f"{container_id}/{ifname}"
        freed = []
        if self.ipam.is_dir():
            for f in self.ipam.iterdir():
                if f.name != "last" and f.read_text() == owner:
                    f.unlink(missing_ok=True)
                    freed.append(f.name)
        return freed

    def save(self, a: Attachment) -> None:
        self.attachments_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.attachments_dir / f"{self.attachment_id(a.container_id, a.ifname)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(a)))
        os.replace(tmp, path)

    def load(self, container_id: str, ifname: str) -> Attachment | None:
        path = self.attachments_dir / f"{self.attachment_id(container_id, ifname)}.json"
        try:
            return Attachment(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def forget(self, container_id: str, ifname: str) -> None:
        (self.attachments_dir / f"{self.attachment_id(container_id, ifname)}.json").unlink(missing_ok=True)

    def attachments(self) -> list[Attachment]:
        out = []
        if self.attachments_dir.is_dir():
            for p in sorted(self.attachments_dir.glob("*.json")):
                try:
                    out.append(Attachment(**json.loads(p.read_text())))
                except (OSError, ValueError, TypeError):
                    continue
        return out
