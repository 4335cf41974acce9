"""`wiremesh-cni`: a CNI 1.1 plugin giving pods addresses from the node's pod CIDR.

Runtimes call it as any CNI plugin: CNI_COMMAND (ADD, DEL, CHECK, GC, STATUS, VERSION),
CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and CNI_PATH in the environment, the network
config as JSON on stdin. The result, or an error with the spec's code, goes to stdout as JSON.

Network config::

    {"cniVersion": "1.1.0", "name": "wiremesh", "type": "wiremesh-cni",
     "stateDir": "/var/lib/wiremesh"}          # the agent's state_dir (default shown)

GC and STATUS (CNI 1.1) need cniVersion 1.1.0. GC removes every attachment the node holds that
the runtime's `cni.dev/valid-attachments` does not list; STATUS says whether ADD can be served.

The agent writes the node's pod CIDR and MTU to <stateDir>/state.json; the plugin leases
addresses from that CIDR (see wiremesh.tunnels.podstate) and never talks to Consul.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from wiremesh.errors import WiremeshError

from .labels import pod_labels

if TYPE_CHECKING:
    from wiremesh.tunnels import CniState, NodeInfo

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
LATEST = SUPPORTED[-1]
DEFAULT_STATE_DIR = "/var/lib/wiremesh"
# The spec's error codes.
INCOMPATIBLE_VERSION, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER, INVALID_ENV, IO_FAILURE, DECODE_FAILURE, \
    INVALID_CONFIG, TRY_AGAIN_LATER, NOT_AVAILABLE, INTERNAL = 1, 2, 3, 4, 5, 6, 7, 11, 50, 999
# The still valid attachments of a GC. libcni sends both names: the spec's text at its 1.1.0 tag
# said `cni.dev/attachments`, libcni (and the spec since) say `cni.dev/valid-attachments`.
VALID_ATTACHMENTS = ("cni.dev/valid-attachments", "cni.dev/attachments")
KNOWN_FIELDS = {"cniVersion", "name", "type", "args", "capabilities", "runtimeConfig", "prevResult", "dns",
                "stateDir", "mtu", "cniVersions", "disableCheck", "disableGC", *VALID_ATTACHMENTS}
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
# What each command needs in the environment: GC and STATUS have no attachment parameters.
NEEDED_ENV = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
              "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
              "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
              "GC": ("CNI_PATH",),
              "STATUS": ()}
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class CniError(WiremeshError):
    """An error as the CNI spec reports it: a code, a message and details (printed as JSON)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def parse_config(raw: str) -> dict[str, Any]:
    try:
        conf = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
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
    if "stateDir" in conf and not _is_path(conf["stateDir"]):
        raise CniError(INVALID_CONFIG, "network config: stateDir must be an absolute path")
    if "mtu" in conf and (isinstance(conf["mtu"], bool) or not isinstance(conf["mtu"], int)
                          or not 576 <= conf["mtu"] <= 9000):
        raise CniError(INVALID_CONFIG, "network config: mtu must be an integer 576-9000")
    return conf


def _is_path(v: Any) -> bool:
    """An absolute path the filesystem can take: text that is UTF-8 (JSON can escape lone surrogates), no NUL."""
    if not isinstance(v, str) or not v.startswith("/") or "\x00" in v:
        return False
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def _valid_ifname(ifname: str) -> bool:
    try:
        size = len(ifname.encode())  # the kernel counts bytes (IFNAMSIZ); a name that is not UTF-8 is refused
    except UnicodeEncodeError:
        return False
    return 0 < size <= 15 and ifname not in (".", "..") and not re.search(r"[/:\s]", ifname)


def parse_env(env: dict[str, str], command: str) -> dict[str, str]:
    out = {}
    for name in NEEDED_ENV[command]:
        if not env.get(name):
            raise CniError(INVALID_ENV, f"{name} is required for {command}")
        out[name] = env[name]
    if "CNI_CONTAINERID" in out and not _CONTAINER_ID.fullmatch(out["CNI_CONTAINERID"]):
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID {out['CNI_CONTAINERID']!r} is not a valid container id")
    if "CNI_IFNAME" in out and not _valid_ifname(out["CNI_IFNAME"]):
        raise CniError(INVALID_ENV, f"CNI_IFNAME {out['CNI_IFNAME']!r} is not a valid interface name")
    if "CNI_CONTAINERID" in out and env.get("CNI_NETNS"):
        out["CNI_NETNS"] = env["CNI_NETNS"]
    return out


def require_version(conf: dict[str, Any], command: str, first: str) -> None:
    if _version_tuple(conf["cniVersion"]) < _version_tuple(first):
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion {first} or later, not {conf['cniVersion']}")


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def parse_valid_attachments(conf: dict[str, Any]) -> set[tuple[str, str]]:
    """The (container id, ifname) pairs a GC must keep. Every field is checked: one bad one refuses
    the whole GC, since removing pods on a misread list cannot be undone."""
    present = [k for k in VALID_ATTACHMENTS if k in conf]
    if not present:
        raise CniError(INVALID_CONFIG, f"GC needs {VALID_ATTACHMENTS[0]} in the network config",
                       "the list of still valid attachments, [{\"containerID\": ..., \"ifname\": ...}, ...]")
    valid = set()
    for key in present:  # libcni sends both names with the same list; keep what either names
        items = conf[key]
        if not isinstance(items, list):
            raise CniError(INVALID_CONFIG, f"{key} must be a list, not {_json_type(items)}")
        for i, item in enumerate(items):
            where = f"{key}[{i}]"
            if not isinstance(item, dict):
                raise CniError(INVALID_CONFIG, f"{where} must be an object with containerID and ifname, "
                                               f"not {_json_type(item)}")
            for field, ok, what in (("containerID", _CONTAINER_ID.fullmatch, "container id"),
                                    ("ifname", _valid_ifname, "interface name")):
                if field not in item:
                    raise CniError(INVALID_CONFIG, f"{where}.{field} is required")
                v = item[field]
                if not isinstance(v, str):
                    raise CniError(INVALID_CONFIG, f"{where}.{field} must be a string, not {_json_type(v)}")
                if not ok(v):
                    raise CniError(INVALID_CONFIG, f"{where}.{field} {v[:64]!r} is not a valid {what}")
            valid.add((item["containerID"], item["ifname"]))
    return valid


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


def _state(conf: dict[str, Any]) -> CniState:
    from wiremesh.tunnels import CniState

    return CniState(Path(conf.get("stateDir", DEFAULT_STATE_DIR)))


def _ipv6_problem(node: NodeInfo) -> str:
    if ":" not in node.pod_cidr:
        return ""
    return f"the node's pod CIDR {node.pod_cidr} is IPv6; wiremesh-cni gives IPv4 pod addresses only"


def _remove(state: CniState, cid: str, ifname: str) -> None:
    """Undo one attachment: its veth pair (the node's route to the pod goes with it), its lease, its record.

    The lease is given back only once the veth is gone, so that a failure never leaves an
    address that a new pod could get while the old pod's route still points at the old veth."""
    from wiremesh.tunnels import del_pod_interface

    del_pod_interface(cid, ifname)
    state.release(cid, ifname)
    state.forget(cid, ifname)


def cmd_add(conf: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    from wiremesh.tunnels import (Attachment, NodeStateUnavailable, NoFreeAddress, PodInterface, TunnelError,
                                  link_index, policy_ready,
                                  add_pod_interface, check_pod_interface)

    state = _state(conf)
    try:
        node = state.read_node_info()
    except NodeStateUnavailable as e:
        raise CniError(TRY_AGAIN_LATER, f"the wiremesh agent has not leased this node's pod CIDR yet ({e})") from None
    cid, ifname, netns = env["CNI_CONTAINERID"], env["CNI_IFNAME"], env["CNI_NETNS"]
    if problem := _ipv6_problem(node):
        raise CniError(INVALID_CONFIG, problem)
    if not Path(netns).exists():
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {netns} does not exist")
    mtu = conf.get("mtu") or node.pod_mtu
    try:
        labels = pod_labels(conf, env)
    except ValueError as e:
        raise CniError(INVALID_CONFIG, f"pod labels: {e}") from None
    with state.locked():
        old = state.load(cid, ifname)
        if old is not None:
            if old.netns == netns and not check_pod_interface(netns, cid, ifname, old.address, old.gateway):
                iface = PodInterface(old.host_ifname, "", ifname, "", old.address, old.gateway, mtu)
                if old.labels != labels:  # (the same pod, labelled anew)
                    old = Attachment(**{**asdict(old), "labels": labels})
                    state.save(old)
                return _result(conf["cniVersion"], old, iface)  # ADD again: the same answer
            _remove(state, cid, ifname)
        try:
            ip = state.allocate(node.pod_cidr, cid, ifname)
        except NoFreeAddress as e:
            raise CniError(INTERNAL, f"no free pod address on this node: {e}") from None
        try:
            iface = add_pod_interface(netns, cid, ifname, f"{ip}/32", node.overlay_ip, mtu)
            a = Attachment(cid, ifname, netns, f"{ip}/32", node.overlay_ip, iface.host_ifname, labels)
            state.save(a)
            # Under network policy from its first packet: the agent writes its maps and puts the
            # programs on the veth before ADD returns (tunnels.policy_ready).
            if not policy_ready.wait_ready(state.state_dir, iface.host_ifname, link_index(iface.host_ifname)):
                raise CniError(TRY_AGAIN_LATER, f"the wiremesh agent did not put {ifname} under network policy "
                                                f"within {policy_ready.WAIT_S:.0f} s (is it running?)")
        except BaseException as e:
            _remove(state, cid, ifname)
            if isinstance(e, TunnelError):
                raise CniError(INTERNAL, f"setting up {ifname}: {e}") from None
            raise
    return _result(conf["cniVersion"], a, iface)


def cmd_del(conf: dict[str, Any], env: dict[str, str]) -> None:
    state = _state(conf)
    with state.locked():
        _remove(state, env["CNI_CONTAINERID"], env["CNI_IFNAME"])


def cmd_check(conf: dict[str, Any], env: dict[str, str]) -> None:
    from wiremesh.tunnels import check_pod_interface

    require_version(conf, "CHECK", "0.4.0")
    prev = conf.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult in the network config")
    state = _state(conf)
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


def cmd_gc(conf: dict[str, Any]) -> None:
    """Remove every attachment the node holds (a record or a lease) that the runtime does not list.

    One failure does not stop the others (the spec: remove as much as possible, then report)."""
    from wiremesh.tunnels import TunnelError

    require_version(conf, "GC", "1.1.0")
    valid = parse_valid_attachments(conf)
    state = _state(conf)
    failed: list[tuple[int, str]] = []
    with state.locked():
        stale = sorted(state.held() - valid)
        for cid, ifname in stale:
            try:
                _remove(state, cid, ifname)
            except TunnelError as e:
                failed.append((INTERNAL, f"container {cid} interface {ifname}: {e}"))
            except OSError as e:
                failed.append((IO_FAILURE, f"container {cid} interface {ifname}: {e.strerror or e}"))
    if failed:
        code = INTERNAL if any(c == INTERNAL for c, _ in failed) else IO_FAILURE
        raise CniError(code, f"GC removed {len(stale) - len(failed)} of {len(stale)} stale attachments; "
                             f"{failed[0][1]}", "; ".join(m for _, m in failed))


def cmd_status(conf: dict[str, Any]) -> None:
    """Ready (no error) when ADD can be served: the agent's state.json is usable and addresses are left."""
    from wiremesh.tunnels import NodeStateUnavailable

    require_version(conf, "STATUS", "1.1.0")
    state = _state(conf)
    try:
        node = state.read_node_info()
    except NodeStateUnavailable as e:
        raise CniError(NOT_AVAILABLE, f"wiremesh-cni is not available: {e}",
                       f"the wiremesh agent writes it once it has leased this node's pod CIDR: is it running, "
                       f"with state_dir = {state.state_dir}?") from None
    if problem := _ipv6_problem(node):
        raise CniError(NOT_AVAILABLE, f"wiremesh-cni is not available: {state.node_state_file}: {problem}")
    if state.free_addresses(node.pod_cidr) == 0:
        raise CniError(NOT_AVAILABLE, f"wiremesh-cni is not available: every address of the pod CIDR "
                                      f"{node.pod_cidr} is leased ({state.ipam})")


def run(env: dict[str, str], stdin: str) -> tuple[int, dict[str, Any] | None]:
    """One invocation: returns (exit code, JSON for stdout or None)."""
    command = env.get("CNI_COMMAND", "")
    version = "1.0.0"  # until the config says which
    try:
        if command == "VERSION":
            return 0, {"cniVersion": LATEST, "supportedVersions": SUPPORTED}
        if command not in COMMANDS:
            raise CniError(INVALID_ENV, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}")
        conf = parse_config(stdin)
        version = conf["cniVersion"]
        e = parse_env(env, command)
        if command == "ADD":
            return 0, cmd_add(conf, e)
        if command == "DEL":
            cmd_del(conf, e)
        elif command == "CHECK":
            cmd_check(conf, e)
        elif command == "GC":
            cmd_gc(conf)
        else:
            cmd_status(conf)
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
    out: dict[str, Any] | None
    try:
        stdin = "" if os.environ.get("CNI_COMMAND") == "VERSION" else sys.stdin.read()
    except UnicodeDecodeError as e:  # stdin is read as UTF-8: bytes that are not must still get error JSON
        code, out = 1, {"cniVersion": "1.0.0", "code": DECODE_FAILURE, "msg": "network config is not UTF-8 text",
                        "details": str(e)}
    else:
        code, out = run(dict(os.environ), stdin)
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    sys.exit(code)


