"""`wiremesh setup` on two WAN-joined Consul datacenters: in a real terminal, and from answers files."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from wiremesh.clustermesh import layout
from wiremesh.lab import Lab
from wiremesh.lab.netns import enter_cmd
from wiremesh.lab.topology import load_topology

from .conftest import new_lab_name

WM = str(Path(sys.executable).with_name("wiremesh"))


@pytest.fixture(scope="module")
def pair() -> Iterator[Lab]:
    """Two clusters' Consul servers, WAN-joined, nothing written yet, no nodes."""
    lab = Lab(new_lab_name())
    try:
        lab.up(topology=load_topology(clusters=2, nodes=0), connect=False)
        yield lab
    finally:
        lab.down()


def kv(lab: Lab) -> dict[str, dict[str, bytes]]:
    out = {}
    for c in lab.clusters:
        _, items = lab.consul(lambda s: s.list("wiremesh/"), c)
        out[c] = {k: v.value for k, v in items.items()}
    return out


def setup_cmd(lab: Lab, *args: str) -> list[str]:
    return enter_cmd(lab.hub, None) + [WM, "--consul", lab.consul_address("east"), "setup", *args]


def run_answers(lab: Lab, tmp_path: Path, clusters: list[dict[str, object]]) -> tuple[int, str]:
    f = tmp_path / "answers.yaml"
    f.write_text(json.dumps({"clusters": clusters}))
    import subprocess

    p = subprocess.run(setup_cmd(lab, "--answers", str(f), "--yes"), capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


def good(lab: Lab) -> list[dict[str, object]]:
    return [{"consul": lab.consul_address("east"), "name": "east", "id": 1, "pod_cidr": "10.240.0.0/16"},
            {"consul": lab.consul_address("west"), "name": "west", "id": 2, "pod_cidr": "10.241.0.0/16"}]


@pytest.mark.parametrize("change, field, words", [
    (lambda c: c[1].update(pod_cidr="10.240.128.0/17"), "clusters[1].pod_cidr", "overlaps"),
    (lambda c: c[1].update(id=1), "clusters[1].id", "taken by cluster 'east'"),
    (lambda c: c[1].update(name="West_Cluster"), "clusters[1].name", "not a cluster name"),
    (lambda c: c[1].update(consul="http://10.99.1.1:1"), "clusters[1].consul", "cannot reach Consul"),
    (lambda c: c[1].update(datacenter="north"), "clusters[1].datacenter", "not 'north'"),
], ids=["overlapping-cidr", "duplicate-id", "invalid-name", "unreachable-consul", "wrong-datacenter"])
def test_refusals_name_the_answer_and_write_nothing(pair: Lab, tmp_path: Path, change, field: str,  # type: ignore[no-untyped-def]
                                                     words: str) -> None:
    before = kv(pair)
    answers = good(pair)
    change(answers)
    code, out = run_answers(pair, tmp_path, answers)
    assert code == 1, out
    assert f"error: {field}:" in out and words in out, out
    assert "Traceback" not in out
    assert kv(pair) == before


def test_wizard_in_a_real_terminal(pair: Lab) -> None:
    child = pexpect.spawn(setup_cmd(pair)[0], setup_cmd(pair)[1:], encoding="utf-8", timeout=30,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NO_COLOR": "1", "TERM": "dumb"})
    try:
        child.expect("How many clusters")
        child.sendline("2")
        # Cluster 1: a wrong address first, then the default; everything else as suggested.
        child.expect("Consul HTTP address")
        child.sendline("http://10.99.0.1:1")
        child.expect("token")
        child.sendline("")
        child.expect("cannot reach Consul")
        child.expect("Consul HTTP address")
        child.sendline("")
        child.expect("token")
        child.sendline("")
        child.expect("reached: datacenter 'east'")
        child.expect(r"Datacenter \[east\]")
        child.sendline("")
        child.expect(r"Cluster name \[east\]")
        child.sendline("Bad_Name")
        child.expect("not a cluster name")
        child.expect("Cluster name")
        child.sendline("")
        child.expect(r"Cluster id \(1-255\) \[1\]")
        child.sendline("")
        child.expect(r"Pod CIDR \[10.240.0.0/16\]")
        child.sendline("")
        child.expect("Routing mode")
        child.sendline("")
        child.expect("Pod MTU")
        child.sendline("")
        # Cluster 2: a duplicate name, id and overlapping CIDR are each refused with a suggestion.
        child.expect("Consul HTTP address")
        child.sendline(pair.consul_address("west"))
        child.expect("token")
        child.sendline("")
        child.expect(r"Datacenter \[west\]")
        child.sendline("")
        child.expect("Cluster name")
        child.sendline("east")
        child.expect("already in this setup")
        child.expect("Cluster name")
        child.sendline("west")
        child.expect(r"Cluster id \(1-255\) \[2\]")
        child.sendline("1")
        child.expect("taken by cluster 'east'")
        child.expect(r"Cluster id \(1-255\) \[2\]")
        child.sendline("")
        child.expect(r"Pod CIDR \[10.241.0.0/16\]")
        child.sendline("10.240.128.0/17")
        child.expect("overlaps")
        child.expect(r"Pod CIDR \[10.241.0.0/16\]")
        child.sendline("")
        child.expect("Routing mode")
        child.sendline("vxlan")
        child.expect("Pod MTU")
        child.sendline("")
        child.expect(r"Apply \d+ change\(s\) to 2 datacenter\(s\)\?")
        child.sendline("y")
        child.expect("applied")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    for c in pair.clusters:
        _, items = pair.consul(lambda s: s.list(layout.mesh_prefix()), c)
        members = {json.loads(v.value)["name"]: json.loads(v.value) for v in items.values()}
        assert members["east"]["id"] == 1 and members["west"]["id"] == 2
        assert members["west"]["pod_cidr"] == "10.241.0.0/16" and members["west"]["datacenter"] == "west"
    west = pair.consul(lambda s: s.get(layout.config_key("west")), "west")
    assert west is not None and json.loads(west.value)["routing"] == "vxlan"


def test_running_again_changes_only_what_changed(pair: Lab, tmp_path: Path) -> None:
    answers = good(pair)
    answers[1]["routing"] = "vxlan"
    code, out = run_answers(pair, tmp_path, answers)  # what the terminal test applied: nothing to do
    assert code == 0 and "nothing to change" in out, out
    answers[1]["routing"] = "wireguard"
    before = kv(pair)
    code, out = run_answers(pair, tmp_path, answers)
    assert code == 0 and "west (1 change(s))" in out and "east (unchanged)" in out, out
    after = kv(pair)
    assert after["east"] == before["east"]
    changed = {k for k in after["west"] if after["west"][k] != before["west"].get(k)}
    assert changed == {layout.config_key("west")}


def test_pod_cidr_in_use_cannot_change(pair: Lab, tmp_path: Path) -> None:
    pair.consul(lambda s: s.put(layout.ipam_key("west", "10.241.0.0/24"), "somenode", cas=0), "west")
    try:
        before = kv(pair)
        answers = good(pair)
        answers[1]["pod_cidr"] = "10.242.0.0/16"
        code, out = run_answers(pair, tmp_path, answers)
        assert code == 1 and "clusters[1].pod_cidr" in out and "cannot change" in out, out
        assert kv(pair) == before
    finally:
        pair.consul(lambda s: s.delete(layout.ipam_key("west", "10.241.0.0/24")), "west")
