"""Lab topologies: which clusters, with which settings and how many nodes (a YAML file)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wiremesh.clustermesh import ClusterConfig, InvalidRecord

from .errors import LabError

DEFAULT_TOPOLOGY = Path(__file__).with_name("topologies") / "default.yaml"
_FIELDS = {"name": str, "id": int, "datacenter": str, "pod_cidr": str, "routing": str, "nodes": int,
           "node_prefix_len": int, "mtu": int}


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    id: int
    datacenter: str
    pod_cidr: str
    routing: str = "wireguard"
    nodes: int = 2
    node_prefix_len: int = 24
    mtu: int = 0

    def config(self) -> ClusterConfig:
        return ClusterConfig(name=self.name, id=self.id, pod_cidr=self.pod_cidr, node_prefix_len=self.node_prefix_len,
                             routing=self.routing, mtu=self.mtu)


def parse_topology(data: Any, src: str) -> list[ClusterSpec]:
    if not isinstance(data, dict) or not isinstance(data.get("clusters"), list) or not data["clusters"]:
        raise LabError(f"{src}: must hold 'clusters', a non-empty list")
    specs: list[ClusterSpec] = []
    for i, c in enumerate(data["clusters"]):
        where = f"{src}: clusters[{i}]"
        if not isinstance(c, dict):
            raise LabError(f"{where}: must be a mapping")
        for k, v in c.items():
            if k not in _FIELDS:
                raise LabError(f"{where}.{k}: unknown field")
            if not isinstance(v, _FIELDS[k]) or isinstance(v, bool):
                raise LabError(f"{where}.{k}: must be {_FIELDS[k].__name__}")
        for k in ("name", "id", "pod_cidr"):
            if k not in c:
                raise LabError(f"{where}.{k}: is required")
        spec = ClusterSpec(**{"datacenter": c["name"], **c})
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", spec.datacenter):
            raise LabError(f"{where}.datacenter: {spec.datacenter!r} is not a Consul datacenter name")
        try:
            spec.config()
        except InvalidRecord as e:
            raise LabError(f"{where}.{e.field}: {e.reason}") from None
        if not 0 <= spec.nodes <= 50:
            raise LabError(f"{where}.nodes: {spec.nodes} is outside 0-50")
        for other in specs:
            if other.name == spec.name or other.id == spec.id or other.datacenter == spec.datacenter:
                raise LabError(f"{where}: name, id and datacenter must differ from cluster {other.name!r}'s")
            if ipaddress.ip_network(other.pod_cidr).overlaps(ipaddress.ip_network(spec.pod_cidr)):
                raise LabError(f"{where}.pod_cidr: {spec.pod_cidr} overlaps cluster {other.name!r}'s {other.pod_cidr}")
        specs.append(spec)
    if len(specs) > 9:
        raise LabError(f"{src}: at most 9 clusters")
    return specs


def load_topology(path: Path = DEFAULT_TOPOLOGY, clusters: int | None = None, nodes: int | None = None) -> list[ClusterSpec]:
    """Read a topology file; `clusters`/`nodes` (from the command line) trim or extend it."""
    import dataclasses

    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise LabError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LabError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise LabError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise LabError(f"{path}: not YAML (nested too deeply)") from None
    specs = parse_topology(data, str(path))
    if clusters is not None:
        n = len(specs)
        while len(specs) < clusters:
            n += 1
            name = f"cluster{n}"
            if any(name in (s.name, s.datacenter) for s in specs):
                continue
            used = [ipaddress.ip_network(s.pod_cidr) for s in specs]
            cidr = next(str(c) for space in ("10.240.0.0/12", "10.0.0.0/8")
                        for c in ipaddress.ip_network(space).subnets(new_prefix=16)
                        if not any(u.version == 4 and u.overlaps(c) for u in used))
            cid = next(i for i in range(1, 256) if i not in {s.id for s in specs})
            specs.append(ClusterSpec(name=name, id=cid, datacenter=name, pod_cidr=cidr))
        specs = specs[:clusters]
    if nodes is not None:
        if not 0 <= nodes <= 50:
            raise LabError(f"--nodes: {nodes} is outside 0-50 per cluster")
        specs = [dataclasses.replace(s, nodes=nodes) for s in specs]
    # What the command line added or changed is checked like the file itself.
    return parse_topology({"clusters": [dataclasses.asdict(s) for s in specs]}, str(path))
