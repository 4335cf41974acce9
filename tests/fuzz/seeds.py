"""Valid documents the fuzz targets start from, and a reader that turns fuzz bytes into choices.

The same bytes always make the same input (no random module, no clock), so a crash found by
the coverage-guided fuzzer replays exactly, and the property tests can feed it bytes as well.
"""

from __future__ import annotations

import base64
import copy
import json
import math
from typing import Any

from wiremesh.keys import PrivateKey

# A fixed key pair: the private half must never show in a parser's error message.
SECRET = PrivateKey(bytes(range(1, 33)))
SECRET_B64 = SECRET.secret_base64()
SECRET_HEX = SECRET.secret_hex()
PUB = SECRET.public_key()
PUB2 = PrivateKey(bytes(range(2, 34))).public_key()
PSK_HEX = bytes(range(40, 72)).hex()  # a preshared key: as secret as a private key

CLUSTER_CONFIG: dict[str, Any] = {
    "name": "lab", "id": 1, "pod_cidr": "10.240.0.0/16", "node_prefix_len": 24, "service_cidr": "10.96.0.0/16",
    "routing": "wireguard", "vni": 1, "wg_port": 51820, "mtu": 0, "rotate_every": 86400,
}
NODE_RECORD: dict[str, Any] = {
    "name": "node1", "cluster": "lab", "endpoint": "192.0.2.11:51820", "public_key": PUB.base64,
    "pod_cidr": "10.240.1.0/24", "overlay_ip": "10.240.1.1", "key_epoch": 3, "vtep_mac": "02:00:00:00:00:01",
    "agent_version": "0.1.0", "next_public_key": PUB2.base64, "switch_at": 1_700_000_000_000,
}
SERVICE: dict[str, Any] = {
    "name": "web", "cluster": "lab", "vip": "10.96.0.20", "affinity": "local", "prefer": ["east", "west"],
    "ports": [{"port": 80, "protocol": "tcp", "target_port": 8080}, {"port": 53, "protocol": "udp"}],
}
ROTATION: dict[str, Any] = {
    "node": "node1", "id": "0123456789abcdef", "state": "staged", "requested_at": 1, "updated_at": 2,
    "epoch_from": 3, "epoch_to": 4, "switch_at": 5, "next_fingerprint": "ab12", "confirmed": ["lab/node2"],
    "lagging": [], "error": "",
}
READY: dict[str, Any] = {"next_public_key": PUB2.base64, "switch_at": 1_700_000_000_000}
AGENT_TOML: dict[str, Any] = {
    "node": "node1", "cluster": "lab", "underlay_address": "192.0.2.11", "listen_port": 51820, "interface": "wm0",
    "key_file": "/var/lib/wiremesh/private.key", "backend": "auto", "state_dir": "/var/lib/wiremesh",
    "health_address": "127.0.0.1:9477", "session_ttl": 20, "persistent_keepalive": 25, "resync_interval": 30.0,
    "service_cgroup": "/sys/fs/cgroup/pods", "bpf_pin_dir": "/sys/fs/bpf/wiremesh/x",
    "consul": {"address": "http://127.0.0.1:8500", "token": "s3cr3t-t0ken-0123456789abcdef", "datacenter": "dc1"},
}
TOPOLOGY: dict[str, Any] = {"clusters": [
    {"name": "east", "id": 1, "datacenter": "east", "pod_cidr": "10.240.0.0/16", "routing": "wireguard", "nodes": 2},
    {"name": "west", "id": 2, "pod_cidr": "10.241.0.0/16", "routing": "vxlan", "nodes": 1, "mtu": 1400,
     "node_prefix_len": 24},
]}
ANSWERS: dict[str, Any] = {"clusters": [
    {"consul": "http://127.0.0.1:8500", "name": "east", "id": 1, "pod_cidr": "10.240.0.0/16", "datacenter": "east",
     "token": "east-t0ken-0123456789abcdef", "acl_nodes": ["node1", "node2"]},
    {"consul": "https://10.0.0.2:8501", "name": "west", "id": 2, "pod_cidr": "10.241.0.0/16", "routing": "vxlan",
     "mtu": 1400, "node_prefix_len": 25, "ca_file": None, "token": None},
]}
CNI_CONFIG: dict[str, Any] = {
    "cniVersion": "1.1.0", "name": "wiremesh", "type": "wiremesh-cni", "stateDir": "/var/lib/wiremesh", "mtu": 1400,
    "prevResult": {"cniVersion": "1.1.0", "ips": [{"address": "10.240.1.2/32"}]},
    "cni.dev/valid-attachments": [{"containerID": "c0ffee", "ifname": "eth0"}],
}
KV_ITEMS: list[dict[str, Any]] = [
    {"Key": "wiremesh/v1/clusters/lab/config", "Value": base64.b64encode(b'{"a": 1}').decode(), "ModifyIndex": 7,
     "CreateIndex": 5, "LockIndex": 0, "Flags": 0, "Session": "adf4238a-882b-9ddc-4a9d-5b6758e4159e"},
    {"Key": "wiremesh/v1/clusters/lab/nodes/", "Value": None, "ModifyIndex": 9},
]
HEALTH: list[dict[str, Any]] = [{
    "Node": {"Node": "n1", "Address": "192.0.2.1", "Datacenter": "dc1"},
    "Service": {"ID": "web-1", "Service": "web", "Address": "10.0.0.5", "Port": 8080, "Tags": ["a"],
                "Meta": {"v": "1"}},
    "Checks": [{"CheckID": "serfHealth", "Name": "Serf", "Status": "passing"},
               {"CheckID": "service:web-1", "Status": "warning"}],
}]
CATALOG: dict[str, Any] = {"consul": [], "web": ["a", "b"]}


def uapi_reply() -> str:
    """A `get=1` answer as wireguard-go writes it: the device, then each peer's lines."""
    return "\n".join([
        f"private_key={SECRET_HEX}", "listen_port=51820", "fwmark=0",
        f"public_key={PUB2.hex}", f"preshared_key={PSK_HEX}", "protocol_version=1", "endpoint=192.0.2.2:51820",
        "last_handshake_time_sec=1700000000", "last_handshake_time_nsec=5", "tx_bytes=100", "rx_bytes=200",
        "persistent_keepalive_interval=25", "allowed_ip=10.240.2.0/24", "allowed_ip=fd00::/64", "errno=0",
    ]) + "\n\n"


# Values that break assumptions: wrong types, edges of ranges, odd text. No secret among them:
# a target puts secrets only where they belong (key fields), so that any echo of one is a leak.
ODD: list[Any] = [
    None, True, False, 0, -1, 1, 255, 256, 65535, 65536, 2**31, 2**53, 2**53 + 1, 2**63, 2**64, -(2**63) - 1,
    10**400, 1.0, 1.5, -0.0, math.nan, math.inf, -math.inf, 1e308, "", " ", "0", "1", "-1", "1.0", "2.0", "01",
    "x" * 70, "\x00", "a\x00b", "\udcff", "\u202e", "é", "Lab", "lab ", "-lab", "lab-", "a" * 33, "10.0.0.0/8",
    "10.240.0.0/15", "10.240.1.1/24", "::/0", "fd00::/48", "FD00::/48", "0.0.0.0/0", "255.255.255.255/32",
    "192.0.2.1", "192.0.2.1:0", "192.0.2.1:65536", "[::1]:51820", "[fe80::1%eth0]:1", "0.0.0.0:1", "224.0.0.1:1",
    "1.2.3.4:+1", "١٢٣", "²", "00:00:00:00:00:0G", "/", "/sys/fs/cgroup/../x", "http://[::1", "auto", "kernel",
    "vxlan", "tcp", "udp", "none", "local", "remote", [], {}, [None], [[]], {"": None}, {"a": [1, {"b": None}]},
    ["lab", "lab"], ["x"] * 17, PUB.base64, PUB.hex, PUB2.base64, "=" * 44, "A" * 43 + "=",
]
# Field names an unknown (or leaked) field might carry.
NAMES: list[str] = ["future_field", "schema", "extra", "x", "", " ", "\x00", "Name", "private_key", "privateKey",
                    "wg-private-key", "PRIVKEY", "meta", "a" * 80, "\udcff"]
SCHEMAS: list[Any] = ["1.0", "1.1", "1.9999", "2.0", "0.9", 1, 0, 2, -1, True, "1", "01.0", "1.", ".1", "1.0.0",
                      "10000.0", 10**5, None, 1.0, [], {}]


class Reader:
    """Draws choices from fuzz bytes: each call consumes a few; once they run out, every draw is 0."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def below(self, n: int) -> int:
        if n <= 256:
            return self.byte() % n
        return (self.byte() << 8 | self.byte()) % n

    def pick(self, seq: list[Any] | tuple[Any, ...]) -> Any:
        return seq[self.below(len(seq))]

    def chance(self, one_in: int) -> bool:
        return self.below(one_in) == 0

    def text(self, max_len: int = 24) -> str:
        n = self.below(max_len + 1)
        raw = self.data[self.pos:self.pos + n]
        self.pos += len(raw)
        return raw.decode("utf-8", "surrogateescape")

    def rest(self) -> bytes:
        raw = self.data[self.pos:]
        self.pos = len(self.data)
        return raw

    def value(self, depth: int = 0) -> Any:
        """Any JSON-ish value: an odd one, fresh text or a number, or a small list or object of them."""
        kind = self.below(8 if depth < 3 else 5)
        if kind <= 2:
            return copy.deepcopy(self.pick(ODD))
        if kind == 3:
            return self.text()
        if kind == 4:
            return int.from_bytes(bytes(self.byte() for _ in range(self.below(9))), "big", signed=True)
        if kind == 5:
            return Deep(self.pick([1, 3, 100, 1200]))
        if kind == 6:
            return [self.value(depth + 1) for _ in range(self.below(4))]
        return {self.text(8): self.value(depth + 1) for _ in range(self.below(4))}


class Deep:
    """A null inside `depth` lists: deeper than a recursive parser goes once depth is large.

    A marker, not the lists themselves: copying or dumping 3 000 levels with the standard library
    would itself hit the recursion limit. `dumps_json` writes it out; `materialize` builds it."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __repr__(self) -> str:
        return f"Deep({self.depth})"


def _swap(doc: Any, f: Any) -> Any:
    if isinstance(doc, Deep):
        return f(doc)
    if isinstance(doc, dict):
        return {k: _swap(v, f) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_swap(v, f) for v in doc]
    return doc


def materialize(doc: Any) -> Any:
    """`doc` with each Deep marker replaced by its nested lists."""
    def build(d: Deep) -> Any:
        inner: Any = None
        for _ in range(d.depth):
            inner = [inner]
        return inner
    return _swap(doc, build)


def dumps_json(doc: Any) -> str:
    """`doc` as JSON text (NaN and Infinity included, as Python's json writes and reads them)."""
    marks: dict[str, str] = {}

    def mark(d: Deep) -> str:
        m = f"\x00deep{len(marks)}\x00"
        marks[json.dumps(m)] = "[" * d.depth + "null" + "]" * d.depth
        return m

    text = json.dumps(_swap(doc, mark))
    for m, deep in marks.items():
        text = text.replace(m, deep)
    return text


def tweak_text(r: Reader, s: str) -> str:
    """A near miss of a valid string: cut, doubled, upper-cased, padded, one character changed."""
    op = r.below(7)
    if op == 0:
        return s[: r.below(len(s) + 1)]
    if op == 1:
        return s + s
    if op == 2:
        return s.upper()
    if op == 3:
        return f" {s}"
    if op == 4 and s:
        i = r.below(len(s))
        return s[:i] + chr(r.byte()) + s[i + 1:]
    if op == 5:
        return s + r.text(8)
    return s.replace(".", ":").replace("/", "_")


def mutate(doc: Any, r: Reader, key_fields: tuple[str, ...] = (), rounds: int | None = None) -> Any:
    """A deep copy of `doc` with a few changes drawn from `r`, anywhere in its tree.

    Key fields (`key_fields`) are the only places the secret private key is ever put."""
    doc = copy.deepcopy(doc)
    for _ in range(1 + r.below(3) if rounds is None else rounds):
        parent, name = _site(doc, r)
        if parent is None:
            continue
        op = r.below(9)
        here = parent.get(name) if isinstance(parent, dict) else parent[name] if name < len(parent) else None
        if op == 0 and isinstance(parent, dict):
            parent.pop(name, None)
        elif op == 1 and isinstance(parent, dict):
            parent[r.pick(NAMES) if r.chance(2) else r.text(12)] = r.value()
        elif op == 2 and isinstance(parent, dict):
            parent["schema"] = r.pick(SCHEMAS)
        elif op == 3 and isinstance(here, str):
            _set(parent, name, tweak_text(r, here))
        elif op == 4 and isinstance(here, int) and not isinstance(here, bool):
            _set(parent, name, here + r.pick([-1, 1, -here, 2**31, -(2**31), 2**53, 10**20]))
        elif op == 5 and isinstance(parent, dict) and (name in key_fields or r.chance(4)):
            # the secret, where an operator might paste it by mistake, or under a leaking name
            target = name if name in key_fields else r.pick(["private_key", "PrivateKey", "wg_privkey"])
            parent[target] = r.pick([SECRET_B64, SECRET_HEX, " " + SECRET_B64])
        elif op == 6 and isinstance(parent, list):
            parent.append(copy.deepcopy(r.pick(parent)) if parent and r.chance(2) else r.value())
        else:
            _set(parent, name, r.value())
    return doc


def _site(doc: Any, r: Reader) -> tuple[Any, Any]:
    """A container in `doc` and one of its keys or indexes, walking down a few levels at random."""
    parent: Any = None
    name: Any = None
    node = doc
    for _ in range(4):
        if isinstance(node, dict) and node:
            parent, name = node, r.pick(sorted(node, key=str))
        elif isinstance(node, list) and node:
            parent, name = node, r.below(len(node))
        else:
            break
        node = parent[name]
        if r.chance(2):
            break
    if parent is None and isinstance(doc, (dict, list)):
        return doc, (r.text(8) if isinstance(doc, dict) else 0)
    return parent, name


def _set(parent: Any, name: Any, value: Any) -> None:
    if isinstance(parent, dict):
        parent[name] = value
    elif name < len(parent):
        parent[name] = value
    else:
        parent.append(value)
