"""`wiremesh-cni`: a CNI 1.0 plugin giving pods addresses from the node's pod CIDR.

Runtimes call it as any CNI plugin: CNI_COMMAND (ADD, DEL, CHECK, VERSION), CNI_CONTAINERID,
CNI_NETNS, CNI_IFNAME, CNI_ARGS and CNI_PATH in the environment, the network config as JSON
on stdin. The result, or an error with the spec's code, goes to stdout as JSON.

Network config::

    {"cniVersion": "1.0.0", "name": "wiremesh", "type": "wiremesh-cni",
     "stateDir": "/var/lib/wiremesh"}          # the agent's state_dir (default shown)

The agent writes the node's pod CIDR and MTU to <stateDir>/state.json; the plugin leases
addresses from that CIDR (see agent.cni.state) and never talks to Consul.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]
DEFAULT_STATE_DIR = "/var/lib/wiremesh"
# The spec's error codes.
INCOMPATIBLE_VERSION, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER, INVALID_ENV, IO_FAILURE, DECODE_FAILURE, \
    INVALID_CONFIG, TRY_AGAIN_LATER, INTERNAL = 1, 2, 3, 4, 5, 6, 7, 11, 999
KNOWN_FIELDS = {"cniVersion", "name", "type", "args", "capabilities", "runtimeConfig", "prevResult", "dns",
                "stateDir", "mtu", "cniVersions", "disableCheck"}
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def parse_config(raw: str) -> dict[str, Any]:
    try:
        conf = json.loads(raw)
    except ValueError as e:
        raise CniError(DECODE_FAILURE, "network config is not JSON", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(DECODE_FAILURE, "network config must be a JSON object")
    for field in ("cniVersion", "name", "type"):
        if not isinstance(conf.get(field), str) or not conf[field]:
            raise CniError(INVALID_CONFIG, f"network config: {field} is required (a string)")
    if conf["cniVersion"] not in SUPPORTED:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {conf['cniVersion']!r} is not supported",
                       f"supported: {', '.join(SUPPORTED)}")
    if not _NAME.fullmatch(conf["name"]):
        raise CniError(INVALID_CONFIG, f"network config: name {conf['name']!r} is not a valid network name")
    unknown = sorted(set(conf) - KNOWN_FIELDS)
    if unknown:
        raise CniError(UNSUPPORTED_FIELD, f"network config: unsupported field {unknown[0]!r}",
                       "wiremesh-cni allocates addresses itself; 'ipam' and other plugin fields are not used")
    if "stateDir" in conf and (not isinstance(conf["stateDir"], str) or not conf["stateDir"].startswith("/")):
        raise CniError(INVALID_CONFIG, "network config: stateDir must be an absolute path")
    if "mtu" in conf and (isinstance(conf["mtu"], bool) or not isinstance(conf["mtu"], int)
                          or not 576 <= conf["mtu"] <= 9000):
        raise CniError(INVALID_CONFIG, "network config: mtu must be an integer 576-9000")
    return conf


def parse_env(env: dict[str, str], command: str) -> dict[str, str]:
    out = {}
    need = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
            "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
            "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH")}[command]
    for name in need:
        if not env.get(name):
            raise CniError(INVALID_ENV, f"{name} is required for {command}")
        out[name] = env[name]
    if not _CONTAINER_ID.fullmatch(out["CNI_CONTAINERID"]):
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID {out['CNI_CONTAINERID']!r} is not a valid container id")
    ifname = out["CNI_IFNAME"]
    if len(ifname) > 15 or ifname in (".", "..") or re.search(r"[/:\s]", ifname):
        raise CniError(INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name")
    if env.get("CNI_NETNS"):
        out["CNI_NETNS"] = env["CNI_NETNS"]
    return out


def _result(version: str, a: Any, iface: Any) -> dict[str, Any]:
    ip: dict[str, Any] = {"address": a.address, "gateway": a.gateway, "interface": 1}
    if _version_tuple(version) < (1, 0, 0):
        ip["version"] = "4"
    return {
        "cniVersion": version,
        "interfaces": [{"name": iface.host_ifname, "mac": iface.host_mac},
                       {"name": a.ifname, "mac": iface.mac, "sandbox": a.netns}],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": a.gateway}],
        "dns": {},
    }


def cmd_add(conf: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    from wiremesh.tunnels import TunnelError
    from wiremesh.tunnels.pods import PodInterface, add_pod_interface, check_pod_interface, del_pod_interface

    from .state import Attachment, CniState, NoFreeAddress

    state = CniState(Path(conf.get("stateDir", DEFAULT_STATE_DIR)))
    node = state.node_info()
    if node is None:
        raise CniError(TRY_AGAIN_LATER, f"the wiremesh agent has not leased this node's pod CIDR yet "
                                        f"(no {state.state_dir}/state.json)")
    cid, ifname, netns = env["CNI_CONTAINERID"], env["CNI_IFNAME"], env["CNI_NETNS"]
    if ":" in node.pod_cidr:
        raise CniError(INVALID_CONFIG, f"the node's pod CIDR {node.pod_cidr} is IPv6; wiremesh-cni gives IPv4 "
                                       "pod addresses only")
    if not Path(netns).exists():
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {netns} does not exist")
    mtu = conf.get("mtu") or node.pod_mtu
    with state.locked():
        old = state.load(cid, ifname)
        if old is not None:
            if old.netns == netns and not check_pod_interface(netns, cid, ifname, old.address, old.gateway):
                iface = PodInterface(old.host_ifname, "", ifname, "", old.address, old.gateway, mtu)
                return _result(conf["cniVersion"], old, iface)  # ADD again: the same answer
            del_pod_interface(cid, ifname)
            state.release(cid, ifname)
            state.forget(cid, ifname)
        try:
            ip = state.allocate(node.pod_cidr, cid, ifname)
        except NoFreeAddress as e:
            raise CniError(INTERNAL, f"no free pod address on this node: {e}") from None
        try:
            iface = add_pod_interface(netns, cid, ifname, f"{ip}/32", node.overlay_ip, mtu)
            a = Attachment(cid, ifname, netns, f"{ip}/32", node.overlay_ip, iface.host_ifname)
            state.save(a)
        except BaseException as e:
            del_pod_interface(cid, ifname)
            state.release(cid, ifname)
            state.forget(cid, ifname)
            if isinstance(e, TunnelError):
                raise CniError(INTERNAL, f"setting up {ifname}: {e}") from None
            raise
    return _result(conf["cniVersion"], a, iface)


def cmd_del(conf: dict[str, Any], env: dict[str, str]) -> None:
    from wiremesh.tunnels.pods import del_pod_interface

    from .state import CniState

    state = CniState(Path(conf.get("stateDir", DEFAULT_STATE_DIR)))
    cid, ifname = env["CNI_CONTAINERID"], env["CNI_IFNAME"]
    with state.locked():
        del_pod_interface(cid, ifname)
        state.release(cid, ifname)
        state.forget(cid, ifname)


def cmd_check(conf: dict[str, Any], env: dict[str, str]) -> None:
    from wiremesh.tunnels.pods import check_pod_interface

    from .state import CniState

    if _version_tuple(conf["cniVersion"]) < (0, 4, 0):
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, not {conf['cniVersion']}")
    prev = conf.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult in the network config")
    state = CniState(Path(conf.get("stateDir", DEFAULT_STATE_DIR)))
    cid, ifname, netns = env["CNI_CONTAINERID"], env["CNI_IFNAME"], env["CNI_NETNS"]
    if not Path(netns).exists():
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {netns} does not exist")
    with state.locked():
        a = state.load(cid, ifname)
        if a is None:
            raise CniError(UNKNOWN_CONTAINER, f"no wiremesh attachment for container {cid} interface {ifname}")
        prev_ips = {str(i.get("address")) for i in prev.get("ips", []) if isinstance(i, dict)}
        if a.address not in prev_ips:
            raise CniError(INTERNAL, f"prevResult does not hold {a.address}")
        problems = check_pod_interface(netns, cid, ifname, a.address, a.gateway)
        if problems:
            raise CniError(INTERNAL, "; ".join(problems))


def run(env: dict[str, str], stdin: str) -> tuple[int, dict[str, Any] | None]:
    """One invocation: returns (exit code, JSON for stdout or None)."""
    command = env.get("CNI_COMMAND", "")
    version = "1.0.0"
    try:
        if command == "VERSION":
            return 0, {"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}
        if command not in ("ADD", "DEL", "CHECK"):
            raise CniError(INVALID_ENV, f"CNI_COMMAND {command!r} is not one of ADD, DEL, CHECK, VERSION")
        conf = parse_config(stdin)
        version = conf["cniVersion"]
        e = parse_env(env, command)
        if command == "ADD":
            return 0, cmd_add(conf, e)
        if command == "DEL":
            cmd_del(conf, e)
        else:
            cmd_check(conf, e)
        return 0, None
    except CniError as err:
        out = {"cniVersion": version, "code": err.code, "msg": err.msg}
        if err.details:
            out["details"] = err.details
        return 1, out
    except OSError as err:
        return 1, {"cniVersion": version, "code": IO_FAILURE, "msg": f"I/O failure: {err.strerror or err}"}
    except Exception as err:  # noqa: BLE001 - a runtime must always get error JSON, never a traceback
        return 1, {"cniVersion": version, "code": INTERNAL, "msg": f"{err.__class__.__name__}: {err}"}


def main() -> NoReturn:
    stdin = "" if os.environ.get("CNI_COMMAND") == "VERSION" else sys.stdin.read()
    code, out = run(dict(os.environ), stdin)
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    sys.exit(code)


