"""Signed control inputs in a live signed lab (issue 17, item 3): a catalog instance outside every
certified pod CIDR never becomes a backend; an unsigned service definition or rotation request is
refused (one log line per key, counted) and the last good state stays; the CLI signs what it writes,
and a rotation, whose progress and readiness words the agents sign, runs to its end.

Real Consul (servers and the nodes' client agents that run the health checks), real agents,
wireguard-go and the eBPF service lookup. Waiting is on real state: Consul's health, the agents'
log lines and metrics, the pinned eBPF maps.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiremesh.clustermesh import ConsulStore, Rotation, ServiceDef, ServicePort, layout
from wiremesh.lab import Lab, services
from wiremesh.tunnels.bpf import read_pinned

from .conftest import new_lab_name
from .helpers import wait_until

if not Path("/sys/kernel/btf/vmlinux").exists():
    pytest.skip("the kernel has no BTF (/sys/kernel/btf/vmlinux)", allow_module_level=True)

C = "lab"
NODES = ("node1", "node2")
WM = str(Path(sys.executable).with_name("wiremesh"))
STRAY = "10.123.0.5"  # in no node's pod CIDR, nor any node's address


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(new_lab_name())  # signed: its cluster requires signed records
    try:
        lab.up(2)
        lab.add_pod("p1", "node1")
        lab.add_pod("p2", "node2")
        yield lab
    finally:
        lab.down()


def log_lines(lab: Lab, node: str, text: str) -> list[str]:
    return [line for line in (Path(lab.node(node).dir) / "agent.log").read_text(errors="replace").splitlines()
            if text in line]


def invalid_total(lab: Lab, node: str) -> dict[str, float]:
    _, body = lab.http_get(lab.node(node).health_url + "/metrics")
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^wiremesh_invalid_records_total\{reason="([^"]+)"\} (\S+)$', body.decode(), re.M)}


def held(lab: Lab, node: str, vip: str) -> dict[int, set[str]]:
    """port -> the backend addresses NODE's eBPF maps hold for VIP."""
    return {fe.port: {str(b.address) for b in e.backends}
            for fe, e in read_pinned(lab.node(node).pin_dir).items() if str(fe.vip) == vip}


def register(lab: Lab, node: str, service_id: str, address: str, port: int, health_url: str) -> None:
    """A catalog instance of `web` in NODE's Consul client agent, checked passing by `health_url`."""
    services._client(lab, node)(functools.partial(
        ConsulStore.agent_service_register_http, name="web", url=health_url, service_id=service_id,
        address=address, port=port, interval_s=services.CHECK_INTERVAL_S, timeout_s=services.CHECK_TIMEOUT_S))


def deregister(lab: Lab, node: str, service_id: str) -> None:
    services._client(lab, node)(functools.partial(ConsulStore.agent_service_deregister, service_id=service_id))


def passing(lab: Lab, service_id: str) -> bool:
    h = lab.consul(lambda s: s.health_service("web", passing=True), C)
    return any(i.service_id == service_id for i in h.instances)


def test_a_catalog_instance_outside_every_certified_pod_cidr_never_becomes_a_backend(lab: Lab) -> None:
    state = services.add(lab, "web", 8090, ["p1", "p2"])
    vip = state["vips"][C]
    pods = {lab.pods["p1"].ip, lab.pods["p2"].ip}
    node2_address = lab.node("node2").underlay
    before = {n: invalid_total(lab, n).get("backend", 0) for n in NODES}
    url = state["backends"]["p1"]["health_url"]  # a check that passes: only the address is wrong
    try:
        register(lab, "node1", "web-stray", STRAY, 8090, url)
        register(lab, "node1", "web-host", node2_address, 8090, url)  # a certified node's own address
        wait_until(lambda: passing(lab, "web-stray") and passing(lab, "web-host"), 30,
                   what="the stray and host instances passing in Consul")
        for n in NODES:
            # The host instance is taken (the agent has read the new health), the stray one left out.
            wait_until(lambda n=n: held(lab, n, vip).get(8090) == pods | {node2_address}, 20,
                       what=f"{n} to program the host instance")
            assert held(lab, n, vip) == {8090: pods | {node2_address}}, f"{n} programmed {STRAY}"
            lines = log_lines(lab, n, f"service web backend {C}/{STRAY}")
            assert len(lines) == 1 and "certified" in lines[0], lines
            assert invalid_total(lab, n).get("backend", 0) == before[n] + 1
        listed = json.loads(lab.run("node1", WM, "-o", "json", "service", "list", check=True).stdout)
        (web,) = [x for x in listed["services"] if x["name"] == "web"]
        shown = {b["address"]: (b["certified"], b["in_use"]) for b in web["backends"]}
        assert shown[STRAY] == (False, False) and shown[node2_address] == (True, True), shown
        # Another change in Consul (a new answer of the health watch): still left out, not logged again.
        deregister(lab, "node1", "web-host")
        for n in NODES:
            wait_until(lambda n=n: held(lab, n, vip).get(8090) == pods, 20, what=f"{n} to drop the host instance")
            assert len(log_lines(lab, n, f"service web backend {C}/{STRAY}")) == 1
        assert services.expected_backends(lab, "web")[C] == {(a, 8090) for a in pods}  # the lab's view agrees
    finally:
        for sid in ("web-stray", "web-host"):
            deregister(lab, "node1", sid)
        services.delete(lab, "web")


def test_unsigned_or_forged_definitions_are_refused_and_the_last_good_one_stays(lab: Lab) -> None:
    # Written by the CLI inside a node: the lab gives it the cluster's key (WIREMESH_SIGNING_KEY).
    p = lab.run("node1", WM, "-o", "json", "service", "create", "api", "--port", "8095", check=True)
    created = json.loads(p.stdout)["service"]
    vip = created["vip"]
    assert created.get("signature")
    for n in NODES:
        wait_until(lambda n=n: 8095 in held(lab, n, vip), 20, what=f"{n} to program api")
    key = layout.service_key(C, "api")
    evil_key = layout.service_key(C, "evil")
    before = {n: invalid_total(lab, n).get("signature", 0) for n in NODES}
    try:
        forged = ServiceDef("api", C, vip, (ServicePort(8096),))  # unsigned, by anyone with KV write access
        lab.consul(lambda s: s.put(key, forged.to_json()), C)
        evil = json.loads(ServiceDef("evil", C, "10.96.0.222", (ServicePort(80),)).to_json())
        evil["signature"] = created["signature"]  # a signature of another definition
        lab.consul(lambda s: s.put(evil_key, json.dumps(evil)), C)
        for n in NODES:
            wait_until(lambda n=n: log_lines(lab, n, f"skipping invalid record {key}:")
                       and log_lines(lab, n, f"skipping invalid record {evil_key}:"), 20,
                       what=f"{n} to refuse both definitions")
        # One more change in Consul: every agent takes a new snapshot; nothing is logged again.
        lab.run("node1", WM, "service", "create", "api2", "--port", "8097", check=True)
        for n in NODES:
            wait_until(lambda n=n: any(8097 in ports for ports in [held(lab, n, v) for v in
                                                                    _vips(lab)]), 20, what=f"{n} to program api2")
            (line,) = log_lines(lab, n, f"skipping invalid record {key}:")
            assert "signature: missing" in line and "last good definition stays" in line, line
            (line,) = log_lines(lab, n, f"skipping invalid record {evil_key}:")
            assert "forged" in line, line
            assert invalid_total(lab, n).get("signature", 0) == before[n] + 2
            assert set(held(lab, n, vip)) == {8095}, f"{n}: the last good definition of api stays"
            assert not held(lab, n, "10.96.0.222"), f"{n} programmed the forged definition"
        # The operator's signed change is taken.
        lab.run("node1", WM, "service", "create", "api", "--port", "8098", "--force", check=True)
        for n in NODES:
            wait_until(lambda n=n: set(held(lab, n, vip)) == {8098}, 20, what=f"{n} to take the signed change")
    finally:
        for k in (key, evil_key, layout.service_key(C, "api2")):
            lab.consul(lambda s, k=k: s.delete(k), C)


def _vips(lab: Lab) -> set[str]:
    _, items = lab.consul(lambda s: s.list(layout.services_prefix(C)), C)
    return {json.loads(i.value)["vip"] for i in items.values()}


def test_unsigned_rotation_request_is_refused_and_a_signed_one_runs_to_its_end(lab: Lab) -> None:
    key = layout.rotation_key(C, "node2")
    record_key = layout.node_key(C, "node2")
    before = {n: invalid_total(lab, n).get("request_signature", 0) for n in NODES}
    forged = Rotation.new("node2", int(time.time() * 1000))  # unsigned
    lab.consul(lambda s: s.put(key, forged.to_json()), C)
    for n in NODES:
        wait_until(lambda n=n: log_lines(lab, n, f"skipping invalid record {key}:"), 20,
                   what=f"{n} to refuse the unsigned request")
        (line,) = log_lines(lab, n, f"skipping invalid record {key}:")
        assert "request_signature: missing" in line, line
        assert invalid_total(lab, n).get("request_signature", 0) == before[n] + 1
    item = lab.consul(lambda s: s.get(record_key), C)
    assert item is not None and "next_public_key" not in json.loads(item.value), "node2 staged a refused request"
    assert not Path(lab.node("node2").dir, "private.key.next").exists()
    # The CLI, given the cluster's key, signs its request; node2 signs its progress and node1 its
    # readiness: the rotation ends done only if every one of them was accepted.
    p = lab.run("node1", WM, "-o", "json", "keys", "rotate", "node2", "--wait", "--timeout", "60", timeout=90)
    assert p.returncode == 0, p.stderr[-2000:]
    (res,) = json.loads(p.stdout)["rotations"]
    assert res["state"] == "done" and res["confirmed"] == [f"{C}/node1"], res
    for n in NODES:
        assert not log_lines(lab, n, "invalid readiness word"), n
        assert len(log_lines(lab, n, f"skipping invalid record {key}:")) == 1
