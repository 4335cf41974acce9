"""What the CNI plugin keeps on the node: address leases and attachments, under the agent's state dir.

Here in tunnels, below both of its users: the CNI plugin writes it, the agent reads the
attachments (every pod veth gets the pod MTU).

    <state_dir>/state.json                      written by the agent: pod CIDR, pod MTU
    <state_dir>/cni/lock                        flock held by every ADD, DEL, CHECK and GC
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wiremesh.errors import WiremeshError


class NoFreeAddress(WiremeshError):
    """Every address of the node's pod CIDR is leased."""


class NodeStateUnavailable(WiremeshError):
    """The agent's state.json is missing or unusable; the message names the file and says why."""


@dataclass(frozen=True, slots=True)
class Attachment:
    container_id: str
    ifname: str
    netns: str
    address: str  # a.b.c.d/32
    gateway: str
    host_ifname: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)  # the pod's (cni.labels); network policy selects by them


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

    @property
    def node_state_file(self) -> Path:
        return self.state_dir / "state.json"

    def read_node_info(self) -> NodeInfo:
        """The agent's view of this node; NodeStateUnavailable says why there is none."""
        path = self.node_state_file
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise NodeStateUnavailable(f"{path} does not exist") from None
        except OSError as e:
            raise NodeStateUnavailable(f"{path} cannot be read: {e.strerror or e}") from None
        except ValueError as e:
            raise NodeStateUnavailable(f"{path} is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise NodeStateUnavailable(f"{path} is not a JSON object")
        cidr = d.get("pod_cidr")
        if not isinstance(cidr, str):
            raise NodeStateUnavailable(f"{path} has no pod_cidr")
        try:
            net = ipaddress.ip_network(cidr)
        except ValueError:
            raise NodeStateUnavailable(f"{path}: pod_cidr {cidr[:64]!r} is not a network CIDR") from None
        mtu = d.get("pod_mtu")
        if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or mtu <= 0):
            raise NodeStateUnavailable(f"{path}: pod_mtu {str(mtu)[:64]!r} is not a positive integer")
        return NodeInfo(str(net), str(net.network_address + 1), mtu)

    def node_info(self) -> NodeInfo | None:
        """The agent's view of this node, or None if the agent has not leased a CIDR yet."""
        try:
            return self.read_node_info()
        except NodeStateUnavailable:
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

    def leases(self) -> dict[str, str]:
        """Every leased address and its owner, "<container>/<ifname>"."""
        out = {}
        if self.ipam.is_dir():
            for f in self.ipam.iterdir():
                if f.name != "last":
                    try:
                        out[f.name] = f.read_text()
                    except FileNotFoundError:
                        continue  # released meanwhile (STATUS reads without the lock)
        return out

    def allocate(self, pod_cidr: str, container_id: str, ifname: str) -> str:
        """Lease a free address of `pod_cidr` (skipping the network, overlay and broadcast addresses)."""
        net = ipaddress.ip_network(pod_cidr)
        owner = f"{container_id}/{ifname}"
        first, last = _pool(net)
        count = max(0, last - first + 1)
        self.ipam.mkdir(parents=True, exist_ok=True, mode=0o700)
        for ip, held_by in self.leases().items():
            if held_by == owner:
                if ipaddress.ip_address(ip) in net:
                    return ip  # already leased to this attachment
                (self.ipam / ip).unlink(missing_ok=True)  # a lease from a pod CIDR the node no longer has
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

    def free_addresses(self, pod_cidr: str) -> int:
        """How many more pods `pod_cidr` has room for."""
        first, last = _pool(ipaddress.ip_network(pod_cidr))
        used = 0
        for ip in self.leases():
            try:
                used += first <= int(ipaddress.ip_address(ip)) <= last
            except ValueError:
                continue  # not a lease file
        return max(0, last - first + 1 - used)

    def release(self, container_id: str, ifname: str) -> list[str]:
        owner = f"{container_id}/{ifname}"
        freed = []
        for ip, held_by in self.leases().items():
            if held_by == owner:
                (self.ipam / ip).unlink(missing_ok=True)
                freed.append(ip)
        return freed

    def held(self) -> set[tuple[str, str]]:
        """Every (container, ifname) the node holds something for: an attachment record or a lease."""
        out = {(a.container_id, a.ifname) for a in self.attachments()}
        for owner in self.leases().values():
            container_id, sep, ifname = owner.partition("/")
            if sep and container_id and ifname:
                out.add((container_id, ifname))
        return out

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


def _pool(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    """The first and last address pods get: the CIDR without its network, node (.1) and broadcast addresses."""
    return int(net.network_address) + 2, int(net.broadcast_address) - 1
