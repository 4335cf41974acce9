"""Fuzz target for `wiremesh-cni`: its stdin (the network config) and CNI_* environment, through main().

The kernel is stubbed (the tunnels face's pod functions, as tests/unit/test_cni.py does) and every stateDir lands
under the fuzzer's scratch directory, so nothing outside it is touched.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wiremesh.errors import WiremeshError
from wiremesh.tunnels import TunnelError

from . import files, seeds
from .oracles import Bug
from .seeds import Reader, dumps_json, mutate


def root() -> Path:
    return files.SCRATCH / "cni"


def _safe_state_dir(state_dir: str) -> Path:
    """Where a config's stateDir lands: under root(), keeping what the filesystem itself refuses
    (a NUL byte, an over-long name), so that those paths are still exercised."""
    odd = ("\x00" if "\x00" in state_dir else "") + ("-" + "x" * 300 if len(state_dir) > 255 else "")
    return root() / f"state{zlib.crc32(state_dir.encode('utf-8', 'surrogatepass')) % 2}{odd}"


class FakePods:
    """The pod functions of tunnels without the kernel: ADD succeeds unless `fail`; CHECK reports `problems`."""

    def __init__(self) -> None:
        self.fail = False
        self.problems: list[str] = []

    def add_pod_interface(self, netns: str, container_id: str, ifname: str, address: str, gateway: str,
                          mtu: int | None) -> Any:
        from wiremesh.tunnels import PodInterface

        if self.fail:
            raise TunnelError("create veth: Operation not permitted", 1)
        return PodInterface("wmp0", "02:00:00:00:00:01", ifname, "02:00:00:00:00:02", address, gateway, mtu)

    def del_pod_interface(self, container_id: str, ifname: str) -> bool:
        if self.fail:
            raise TunnelError("delete wmp0: Operation not permitted", 1)
        return False

    def check_pod_interface(self, *args: Any) -> list[str]:
        return list(self.problems)

    def set_pod_mtu(self, *args: Any) -> bool:
        raise Bug("the CNI plugin called set_pod_mtu")


PODS = FakePods()


@contextlib.contextmanager
def stubbed_kernel() -> Iterator[None]:
    """The tunnels face's pod functions replaced by PODS and every stateDir mapped under root(), for the block."""
    import wiremesh.tunnels as pods  # the plugin imports them from the face
    from wiremesh.cni import plugin
    from wiremesh.tunnels import CniState

    names = ("add_pod_interface", "del_pod_interface", "check_pod_interface", "set_pod_mtu")
    saved = {n: getattr(pods, n) for n in names}
    saved_state = plugin._state
    try:
        for n in names:
            setattr(pods, n, getattr(PODS, n))
        plugin._state = lambda conf: CniState(_safe_state_dir(str(conf.get("stateDir", plugin.DEFAULT_STATE_DIR))))
        yield
    finally:
        for n, f in saved.items():
            setattr(pods, n, f)
        plugin._state = saved_state


def _subclasses(cls: type) -> set[str]:
    out = {cls.__name__}
    children: list[type] = cls.__subclasses__()
    for child in children:
        out |= _subclasses(child)
    return out


# The spec's error codes (cni.plugin).
ERROR_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 999}
# The plugin's last-resort handler names the exception class: one of wiremesh's own is an expected
# failure (a TunnelError of the kernel); any other class there is a bug that reached the runtime.
_OWN_ERRORS = _subclasses(WiremeshError)
NODE_STATES = [None, '{"pod_cidr": "10.240.1.0/24", "pod_mtu": 1420}', '{"pod_cidr": "10.240.1.0/30"}',
               '{"pod_cidr": "fd00::/64"}', "{", '{"pod_cidr": 5}', '{"pod_cidr": "10.240.1.0/24", "pod_mtu": 0}']


def prepare(node_state: str | None, wipe: bool = False) -> Path:
    """The scratch state: the agent's state.json as given (None: left as it is); returns a netns path that exists."""
    base = root()
    if wipe:
        shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    for d in ("state0", "state1"):
        if node_state is not None:
            (base / d).mkdir(exist_ok=True)
            (base / d / "state.json").write_text(node_state)
    netns = base / "netns"
    netns.touch()
    return netns


def cni(data: bytes) -> None:
    r = Reader(data)
    netns = prepare(r.pick(NODE_STATES), wipe=r.chance(32))
    PODS.fail, PODS.problems = r.chance(4), (["eth0 is down"] if r.chance(4) else [])
    env = {"CNI_COMMAND": r.pick(["ADD", "ADD", "DEL", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "add",
                                  "VERSION ", "GC\x00"])}
    for name, good in (("CNI_CONTAINERID", "c0ffee"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", str(netns)),
                       ("CNI_PATH", "/opt/cni/bin"), ("CNI_ARGS", "K8S_POD_NAME=a;X=1")):
        how = r.below(8)
        if how < 5:
            env[name] = good
        elif how == 5:
            env[name] = ""
        elif how == 6:
            env[name] = r.pick(["a/b", "..", "e" * 16, "-x", "eth0:1", "/proc/self/ns/net", "c0ffee2", r.text(20)])
        # how == 7: absent
    stdin = r.rest() if r.chance(3) else dumps_json(mutate(seeds.CNI_CONFIG, r)).encode("utf-8", "surrogateescape")
    check_cni(env, stdin)


def check_cni(env: dict[str, str], stdin: bytes) -> None:
    """main() exits 0 (with a result for ADD and VERSION) or 1 with one CNI error JSON on stdout;
    an exception of another family than wiremesh's is never what the runtime gets."""
    from wiremesh.cni import plugin

    env = {k: v.replace("\x00", "") for k, v in env.items()}  # an environment cannot hold NUL
    code, out = run_main(env, stdin)
    if code not in (0, 1):
        raise Bug(f"exit code {code!r}")
    if code == 1:
        if not isinstance(out, dict) or not {"cniVersion", "code", "msg"} <= set(out) or out["code"] not in ERROR_CODES \
                or not isinstance(out["msg"], str) or not out["msg"]:
            raise Bug(f"not a CNI error: {out!r}")
        caught = re.match(r"(\w+): ", out["msg"])
        if out["code"] == plugin.INTERNAL and caught and caught.group(1) not in _OWN_ERRORS:
            raise Bug(f"an unexpected exception reached the runtime: {out['msg'][:300]}")
    elif env.get("CNI_COMMAND") == "ADD":
        if not isinstance(out, dict) or not {"cniVersion", "interfaces", "ips", "routes"} <= set(out) or not out["ips"]:
            raise Bug(f"not a CNI result: {out!r}")
    elif env.get("CNI_COMMAND") != "VERSION" and out is not None:
        raise Bug(f"{env.get('CNI_COMMAND')} printed {out!r}")


def run_main(env: dict[str, str], stdin: bytes) -> tuple[Any, Any]:
    """`wiremesh-cni` as a runtime runs it: main() with this environment and stdin (read as UTF-8,
    strictly, as Python reads a pipe under a UTF-8 locale) -> (exit code, its JSON output or None)."""
    from wiremesh.cni import plugin

    saved_env = {k: v for k, v in os.environ.items() if k.startswith("CNI_")}
    saved_io = sys.stdin, sys.stdout
    out = io.StringIO()
    code: Any = None
    try:
        for k in saved_env:
            del os.environ[k]
        os.environ.update(env)
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        sys.stdout = out
        with stubbed_kernel():
            plugin.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.stdin, sys.stdout = saved_io
        for k in [k for k in os.environ if k.startswith("CNI_")]:
            del os.environ[k]
        os.environ.update(saved_env)
    text = out.getvalue()
    if text.count("\n") > 1 or (text and not text.endswith("\n")):
        raise Bug(f"not one JSON line on stdout: {text[:300]!r}")
    return code, json.loads(text) if text else None
