"""The CNI plugin run as the spec says, with the spec's conformance cases, in a real node."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiremesh.lab import Lab
from wiremesh.lab.netns import netns_add, netns_del, netns_path
from wiremesh.lab.pods import cni_config, run_cni

from .conftest import new_lab_name


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


def test_version(cnilab: Lab) -> None:
    code, out = run_cni(cnilab, "node1", "VERSION", "x", None)
    assert code == 0 and out and "1.0.0" in out["supportedVersions"]


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
    import subprocess

    from wiremesh.lab.netns import enter_cmd
    from wiremesh.lab.pods import cni_binary

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "bad-conf",
           "CNI_NETNS": sandbox, "CNI_IFNAME": "eth0", "CNI_PATH": str(Path(cni_binary()).parent)}
    p = subprocess.run(enter_cmd(cnilab.node("node1").netns, None) + [cni_binary()],
                       input=conf if isinstance(conf, str) else json.dumps(conf), env=env,
                       capture_output=True, text=True)
    assert p.returncode == 1
    err = json.loads(p.stdout)
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
