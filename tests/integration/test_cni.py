"""The CNI plugin run as the spec says, with the spec's conformance cases, in a real node."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wiremesh.lab import Lab
from wiremesh.lab.netns import enter_cmd, netns_add, netns_del, netns_path, sh
from wiremesh.lab.pods import cni_binary, cni_config, run_cni
from wiremesh.tunnels.pods import host_ifname

from .conftest import new_lab_name
from .helpers import wait_until


@pytest.fixture(scope="module")
def cnilab() -> Iterator[Lab]:
    """One node whose pod CIDR is a /29: five pod addresses, easy to exhaust."""
    lab = Lab(new_lab_name())
    try:
        lab.up(1, pod_cidr="10.240.0.0/24", node_prefix_len=29)
        yield lab
    finally:
        lab.down()


@pytest.fixture
def sandbox(cnilab: Lab) -> Iterator[str]:
    """A pod network namespace (what a runtime creates before calling ADD)."""
    name = f"{cnilab.prefix}sb-{new_lab_name()}"
    netns_add(name)
    try:
        yield str(netns_path(name))
    finally:
        netns_del(name)


def veths(lab: Lab) -> list[str]:
    out = lab.run("node1", "ip", "-o", "link", "show", "type", "veth", check=True).stdout
    return sorted(l.split(": ")[1].split("@")[0] for l in out.splitlines())


def leases(lab: Lab) -> list[str]:
    d = Path(lab.node("node1").dir, "cni", "ipam")
    return sorted(p.name for p in d.iterdir() if p.name != "last") if d.is_dir() else []


def attachments(lab: Lab) -> list[str]:
    d = Path(lab.node("node1").dir, "cni", "attachments")
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def nothing_left(lab: Lab, before: tuple[list[str], list[str], list[str]]) -> None:
    assert (veths(lab), leases(lab), attachments(lab)) == before


def state(lab: Lab) -> tuple[list[str], list[str], list[str]]:
    return veths(lab), leases(lab), attachments(lab)


def invoke(lab: Lab, node: str, env: dict[str, str], stdin: str) -> tuple[int, dict[str, Any] | None]:
    """Run the plugin inside NODE with only ENV (and PATH, CNI_PATH): for verbs and cases run_cni does not cover."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_PATH": str(Path(cni_binary()).parent), **env}
    p = subprocess.run(enter_cmd(lab.node(node).netns, None) + [cni_binary()], input=stdin, env=env,
                       capture_output=True, text=True, timeout=60)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None


def conf_1_1(lab: Lab, node: str = "node1", **kw: Any) -> dict[str, Any]:
    return dict(cni_config(lab, node), cniVersion="1.1.0", **kw)


def gc(lab: Lab, valid: Any) -> tuple[int, dict[str, Any] | None]:
    """GC as a runtime calls it: no attachment parameters, the still valid attachments in the config."""
    return invoke(lab, "node1", {"CNI_COMMAND": "GC"}, json.dumps(conf_1_1(lab, **{"cni.dev/valid-attachments": valid})))


def status(lab: Lab, node: str) -> tuple[int, dict[str, Any] | None]:
    return invoke(lab, node, {"CNI_COMMAND": "STATUS"}, json.dumps(conf_1_1(lab, node)))


def pod_routes(lab: Lab) -> list[str]:
    """The node's routes to pods (protocol 88, the plugin's)."""
    out = lab.run("node1", "ip", "-o", "-4", "route", "show", "proto", "88", check=True).stdout
    return sorted(line.split()[0] for line in out.splitlines())


def links_in(netns: str) -> list[str]:
    out = sh("ip", "-n", netns, "-o", "link", "show").stdout
    return sorted(line.split(": ")[1].split("@")[0] for line in out.splitlines())


def test_version(cnilab: Lab) -> None:
    code, out = run_cni(cnilab, "node1", "VERSION", "x", None)
    assert code == 0 and out and out["cniVersion"] == "1.1.0"
    assert {"1.0.0", "1.1.0"} <= set(out["supportedVersions"])


def test_add_add_check_del_del(cnilab: Lab, sandbox: str) -> None:
    before = state(cnilab)
    code, first = run_cni(cnilab, "node1", "ADD", "ctr-one", sandbox)
    assert code == 0 and first, first
    assert first["cniVersion"] == "1.0.0"
    (ip,) = first["ips"]
    assert ip["address"].endswith("/32") and ip["gateway"] == "10.240.0.1" and ip["interface"] == 1
    assert first["interfaces"][1] == {"name": "eth0", "mac": first["interfaces"][1]["mac"], "sandbox": sandbox}
    code, second = run_cni(cnilab, "node1", "ADD", "ctr-one", sandbox)
    assert code == 0 and second and second["ips"] == first["ips"]
    assert len(veths(cnilab)) == len(before[0]) + 1

    conf = dict(cni_config(cnilab, "node1"), prevResult=first)
    assert run_cni(cnilab, "node1", "CHECK", "ctr-one", sandbox, conf) == (0, None)
    bad_prev = dict(conf, prevResult=dict(first, ips=[dict(ip, address="10.240.0.6/32")]))
    code, err = run_cni(cnilab, "node1", "CHECK", "ctr-one", sandbox, bad_prev)
    assert code == 1 and err and err["code"] == 999
    cnilab.run("node1", "ip", "link", "del", first["interfaces"][0]["name"], check=True)
    code, err = run_cni(cnilab, "node1", "CHECK", "ctr-one", sandbox, conf)
    assert code == 1 and err and "missing" in err["msg"]

    assert run_cni(cnilab, "node1", "DEL", "ctr-one", sandbox) == (0, None)
    assert run_cni(cnilab, "node1", "DEL", "ctr-one", sandbox) == (0, None)
    nothing_left(cnilab, before)


def test_del_of_an_unknown_container(cnilab: Lab) -> None:
    before = state(cnilab)
    assert run_cni(cnilab, "node1", "DEL", "never-added", "/run/netns/does-not-exist") == (0, None)
    assert run_cni(cnilab, "node1", "DEL", "never-added", None) == (0, None)
    nothing_left(cnilab, before)


@pytest.mark.parametrize("conf, code", [
    ("{not json", 6),
    ({"cniVersion": "1.0.0", "type": "wiremesh-cni"}, 7),
    ({"cniVersion": "9.9.9", "name": "wiremesh", "type": "wiremesh-cni"}, 1),
    ({"cniVersion": "1.0.0", "name": "wiremesh", "type": "wiremesh-cni", "ipam": {"type": "host-local"}}, 2),
    ({"cniVersion": "1.0.0", "name": "wiremesh", "type": "wiremesh-cni", "mtu": "big"}, 7),
    ({"cniVersion": "1.0.0", "name": "wiremesh", "type": "wiremesh-cni", "stateDir": "/nonexistent/wm"}, 11),
])
def test_bad_config_is_refused_and_leaves_nothing(cnilab: Lab, sandbox: str, conf: object, code: int) -> None:
    before = state(cnilab)
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "bad-conf", "CNI_NETNS": sandbox, "CNI_IFNAME": "eth0"}
    rc, err = invoke(cnilab, "node1", env, conf if isinstance(conf, str) else json.dumps(conf))
    assert rc == 1 and err
    assert err["code"] == code and err["msg"], err
    nothing_left(cnilab, before)
    assert cnilab.run("node1", "ip", "netns", "identify").returncode == 0  # node still fine


def test_add_into_a_missing_namespace(cnilab: Lab) -> None:
    before = state(cnilab)
    code, err = run_cni(cnilab, "node1", "ADD", "ghost", "/run/netns/wm-no-such-ns")
    assert code == 1 and err and err["code"] == 3
    nothing_left(cnilab, before)


def test_exhausted_pod_cidr(cnilab: Lab) -> None:
    before = state(cnilab)
    names = [f"{cnilab.prefix}ex{i}" for i in range(6)]
    for n in names:
        netns_add(n)
    try:
        ips = []
        for i, n in enumerate(names[:5]):
            code, out = run_cni(cnilab, "node1", "ADD", f"ex-{i}", str(netns_path(n)))
            assert code == 0 and out, out
            ips.append(out["ips"][0]["address"])
        assert len(set(ips)) == 5
        assert "10.240.0.1/32" not in ips and "10.240.0.0/32" not in ips and "10.240.0.7/32" not in ips
        full = state(cnilab)
        code, err = run_cni(cnilab, "node1", "ADD", "ex-5", str(netns_path(names[5])))
        assert code == 1 and err and "no free pod address" in err["msg"], err
        assert state(cnilab) == full
        assert cnilab.run("node1", "ip", "link").returncode == 0
    finally:
        for i, n in enumerate(names):
            run_cni(cnilab, "node1", "DEL", f"ex-{i}", str(netns_path(n)))
            netns_del(n)
    nothing_left(cnilab, before)


def test_gc_keeps_exactly_the_listed_attachments(cnilab: Lab) -> None:
    before, routes_before = state(cnilab), pod_routes(cnilab)
    sandboxes = {k: f"{cnilab.prefix}gc{k}-{new_lab_name()}" for k in "abc"}
    pods = [("gc-a", "eth0", "a"), ("gc-a", "net1", "a"), ("gc-b", "eth0", "b"), ("gc-c", "eth0", "c")]
    # Not gc-a's eth0: the same container, another interface. (gc-a's net1, added last, holds the
    # pod's default route: ADD of a second interface replaces it.)
    keep = [("gc-a", "net1"), ("gc-c", "eth0")]
    netns = {(cid, ifname): str(netns_path(sandboxes[k])) for cid, ifname, k in pods}
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for name in sandboxes.values():
        netns_add(name)
    try:
        for cid, ifname, _ in pods:
            code, out = run_cni(cnilab, "node1", "ADD", cid, netns[(cid, ifname)], conf_1_1(cnilab), ifname=ifname)
            assert code == 0 and out and out["cniVersion"] == "1.1.0" and "version" not in out["ips"][0], out
            results[(cid, ifname)] = out
        ip = {p: results[p]["ips"][0]["address"] for p in results}
        full = state(cnilab)
        assert len(full[1]) == len(before[1]) + 4 and len(pod_routes(cnilab)) == len(routes_before) + 4

        # A list with one bad field is refused as a whole: nothing is removed.
        code, err = gc(cnilab, [{"containerID": "gc-a", "ifname": "net1"}, {"containerID": "gc-c", "ifname": 0}])
        assert code == 1 and err and err["code"] == 7, err
        assert err["msg"].startswith("cni.dev/valid-attachments[1].ifname must be a string"), err
        assert state(cnilab) == full

        # gc-b's runtime lost it without a DEL: its namespace is gone, and the kernel takes its veth
        # pair with it; its lease and record stay until GC.
        netns_del(sandboxes["b"])
        wait_until(lambda: host_ifname("gc-b", "eth0") not in veths(cnilab), 10, what="gc-b's veth to go with its netns")

        valid = [{"containerID": cid, "ifname": ifname} for cid, ifname in keep]
        for _ in range(2):  # the second GC finds nothing left to remove
            assert gc(cnilab, valid) == (0, None)
            assert veths(cnilab) == sorted(before[0] + [host_ifname(*p) for p in keep])
            assert leases(cnilab) == sorted(before[1] + [ip[p].split("/")[0] for p in keep])
            assert len(attachments(cnilab)) == len(before[2]) + 2
            assert pod_routes(cnilab) == sorted(routes_before + [ip[p].removesuffix("/32") for p in keep])
            assert "eth0" not in links_in(sandboxes["a"]) and "net1" in links_in(sandboxes["a"])
        for p in keep:  # the listed ones are intact
            check = conf_1_1(cnilab, prevResult=results[p])
            assert run_cni(cnilab, "node1", "CHECK", p[0], netns[p], check, ifname=p[1]) == (0, None)
        code, err = run_cni(cnilab, "node1", "CHECK", "gc-a", netns[("gc-a", "eth0")],
                            conf_1_1(cnilab, prevResult=results[("gc-a", "eth0")]))
        assert code == 1 and err and err["code"] == 3, err  # GC removed it: unknown to CHECK now
    finally:
        for cid, ifname, _ in pods:
            run_cni(cnilab, "node1", "DEL", cid, netns[(cid, ifname)], ifname=ifname)
        for name in sandboxes.values():
            netns_del(name)
    nothing_left(cnilab, before)
    assert pod_routes(cnilab) == routes_before


def test_status_before_and_after_the_agent_writes_its_state(cnilab: Lab) -> None:
    node = cnilab.add_node("node2", start=False, wait=False)
    try:
        code, err = status(cnilab, "node2")
        assert code == 1 and err and err["code"] == 50 and err["cniVersion"] == "1.1.0", err
        assert f"{node.dir}/state.json does not exist" in err["msg"], err
        cnilab.start_agent("node2")
        wait_until(lambda: status(cnilab, "node2") == (0, None), 30, interval=0.1, what="STATUS ready on node2")
        assert Path(node.dir, "state.json").is_file()
        assert status(cnilab, "node1") == (0, None)
    finally:
        cnilab.stop_agent("node2")
