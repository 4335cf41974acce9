"""Pods in the lab: a network namespace per pod, wired up by the real CNI plugin, called exactly
as a container runtime calls it (CNI_* environment, network config on stdin, JSON result)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LabError
from .netns import enter_cmd, netns_add, netns_del, netns_path

if TYPE_CHECKING:
    from .lab import Lab

_POD_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?")


@dataclass
class Pod:
    name: str
    node: str
    netns: str
    container_id: str
    address: str
    ifname: str = "eth0"
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


def cni_binary() -> str:
    import sys

    exe = Path(sys.executable).with_name("wiremesh-cni")
    if not exe.exists():
        raise LabError(f"{exe} is missing: run scripts/setup.sh")
    return str(exe)


def cni_config(lab: "Lab", node: str) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "wiremesh", "type": "wiremesh-cni", "stateDir": lab.node(node).dir}


def run_cni(lab: "Lab", node: str, command: str, container_id: str, netns: str | None,
            conf: dict[str, Any] | None = None, ifname: str = "eth0") -> tuple[int, dict[str, Any] | None]:
    """Invoke the plugin inside NODE's network namespace; returns (exit code, parsed stdout)."""
    binary = cni_binary()
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname, "CNI_PATH": str(Path(binary).parent),
           "CNI_ARGS": f"K8S_POD_NAME={container_id}"}
    if netns:
        env["CNI_NETNS"] = netns
    p = subprocess.run(enter_cmd(lab.node(node).netns, None) + [binary], input=json.dumps(conf or cni_config(lab, node)),
                       capture_output=True, text=True, env=env, timeout=60)
    out = json.loads(p.stdout) if p.stdout.strip() else None
    return p.returncode, out


def pods(lab: "Lab") -> dict[str, Pod]:
    return {n: Pod(**d) for n, d in lab.state.get("pods", {}).items()}


def add_pod(lab: "Lab", name: str, node: str, labels: dict[str, str] | None = None) -> Pod:
    if not _POD_NAME.fullmatch(name):
        raise LabError(f"pod name: {name!r} must be 1-24 lowercase letters, digits or dashes")
    if name in pods(lab) or name in lab.nodes or name == "hub":
        raise LabError(f"lab {lab.name}: {name!r} is already taken")
    lab.node(node)
    ns = f"{lab.prefix}pod-{name}"
    cid = f"{lab.name}-{name}"
    lab.state.setdefault("pods", {})[name] = {"name": name, "node": node, "netns": ns, "container_id": cid,
                                              "address": "", "labels": dict(labels or {})}
    lab.save()
    netns_add(ns)
    conf = cni_config(lab, node)
    if labels:
        conf["args"] = {"labels": dict(labels)}  # (as a runtime passes a pod's labels: cni.labels)
    code, out = run_cni(lab, node, "ADD", cid, str(netns_path(ns)), conf)
    if code != 0 or not out:
        netns_del(ns)
        del lab.state["pods"][name]
        lab.save()
        raise LabError(f"CNI ADD for pod {name} on {node} failed: {(out or {}).get('msg', 'no output')}")
    lab.state["pods"][name]["address"] = out["ips"][0]["address"]
    lab.save()
    return pods(lab)[name]


def del_pod(lab: "Lab", name: str) -> None:
    pod = pods(lab).get(name)
    if pod is None:
        raise LabError(f"lab {lab.name}: no pod {name!r}")
    code, out = run_cni(lab, pod.node, "DEL", pod.container_id, str(netns_path(pod.netns)))
    if code != 0:
        raise LabError(f"CNI DEL for pod {name} failed: {(out or {}).get('msg')}")
    netns_del(pod.netns)
    del lab.state["pods"][name]
    lab.save()
