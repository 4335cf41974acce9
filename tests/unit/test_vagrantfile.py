"""vagrant/Vagrantfile from a topology file, without booting anything.

The Vagrantfile is evaluated by Ruby against a stub of Vagrant's configuration DSL that records
every VM, network and provisioner; the result must match vagrant/machines.py (the rules
test-federation.sh uses) and the netns lab's names. `vagrant validate` runs for both providers
where Vagrant is installed (VirtualBox through a stub VBoxManage: validation only asks its version).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VAGRANT = REPO / "vagrant"
MINI = REPO / "lab" / "topologies" / "vagrant-mini.yaml"
DEFAULT = REPO / "lab" / "topologies" / "default.yaml"


def _machines_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wiremesh_vagrant_machines", VAGRANT / "machines.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


machines_py = _machines_module()

# A recorder standing in for Vagrant: `Vagrant.configure` yields an object on which every setter
# and block is recorded; `define NAME` and `provider NAME` blocks get a recorder of their own.
STUB = r"""
require "json"
class Rec
  attr_reader :calls
  def initialize; @calls = {}; @children = {}; end
  def method_missing(name, *args, **kw, &blk)
    key = name.to_s
    if key.end_with?("=")
      @calls[key.chomp("=")] = args.first
      return nil
    end
    if blk
      child = (@children[[key, args.first]] ||= Rec.new)
      override = (@children[[key + ".override", args.first]] ||= Rec.new)
      blk.arity == 2 ? blk.call(child, override) : blk.call(child)
      return child
    end
    if @children.key?([key, nil]) && args.empty? && kw.empty?
      return @children[[key, nil]]
    end
    if args.empty? && kw.empty?
      return (@children[[key, nil]] ||= Rec.new)
    end
    (@calls[key + "()"] ||= []) << { "args" => args, "kw" => kw }
    nil
  end
  def respond_to_missing?(*) = true
  def to_h
    h = @calls.dup
    @children.each { |(k, a), c| h[a.nil? ? k : "#{k}[#{a}]"] = c.to_h }
    h
  end
end
module Vagrant
  def self.configure(_version)
    $root = Rec.new
    yield $root
  end
end
load ARGV[0]
puts JSON.generate($root.to_h)
"""


def evaluate(topology: Path, tmp_path: Path, **env: str) -> dict[str, Any]:
    if not shutil.which("ruby"):
        pytest.skip("ruby is not installed (it comes with Vagrant: scripts/vagrant-setup.sh)")
    stub = tmp_path / "stub.rb"
    stub.write_text(STUB)
    out = subprocess.run(["ruby", str(stub), str(VAGRANT / "Vagrantfile")], capture_output=True, text=True,
                         check=True, env={**os.environ, "WIREMESH_TOPOLOGY": str(topology), **env}, timeout=60)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def vms(conf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {ip, network, args} as the Vagrantfile defines each VM for libvirt."""
    out = {}
    for key, m in conf["vm"].items():
        if not key.startswith("define["):
            continue
        vm = m["vm"]
        net = vm["provider.override[libvirt]"]["vm"]["network()"][0]
        vb = vm["provider.override[virtualbox]"]["vm"]["network()"][0]
        assert vb["args"] == ["private_network"] and vb["kw"]["ip"] == net["kw"]["ip"]
        prov = vm["provision()"][0]
        assert prov["args"] == ["shell"] and prov["kw"]["path"] == "provision.sh"
        out[key[len("define["):-1]] = {"ip": net["kw"]["ip"], "network": net["kw"]["libvirt__network_name"],
                                       "forward": net["kw"]["libvirt__forward_mode"], "args": prov["kw"]["args"]}
    return out


@pytest.mark.parametrize("topology", [MINI, DEFAULT], ids=["vagrant-mini", "default"])
def test_vagrantfile_defines_the_machines_of_the_topology(topology: Path, tmp_path: Path) -> None:
    conf = evaluate(topology, tmp_path)
    got = vms(conf)
    data = yaml.safe_load(topology.read_text())
    want = machines_py.machines(data)
    assert list(got) == [m.name for m in want]          # the same VMs, in the same order
    for m in want:
        g = got[m.name]
        assert g["ip"] == m.ip and g["network"] == f"wiremesh-{m.cluster}" and g["forward"] == "route"
        assert g["args"][:3] == [m.name, m.ip, m.router]
        assert ("--consul" in g["args"]) == m.consul and ("--node" in g["args"]) == m.node
        if m.node:
            assert g["args"][g["args"].index("--node") + 1:][:2] == [m.cluster, f"http://{m.consul_ip}:8500"]
        if m.consul:
            others = sorted(o.ip for o in want if o.consul and o.cluster != m.cluster)
            assert sorted(g["args"][g["args"].index("--consul") + 2].split(",")) == others
    libvirt = conf["vm"]["provider[libvirt]"]
    opts = machines_py.vagrant_options(data)
    assert libvirt["memory"] == opts["memory"] and libvirt["cpus"] == opts["cpus"]
    assert libvirt["management_network_name"] == "wiremesh-mgmt"
    assert conf["vm"]["box"] == "wiremesh/bookworm"


def test_mini_is_two_clusters_of_one_node_with_consul_on_it(tmp_path: Path) -> None:
    ms = machines_py.machines(yaml.safe_load(MINI.read_text()))
    assert [(m.name, m.ip, m.consul, m.node) for m in ms] == [
        ("east-node1", "10.99.0.11", True, True), ("west-node1", "10.99.1.11", True, True)]


def test_consul_on_its_own_vm(tmp_path: Path) -> None:
    data = yaml.safe_load(MINI.read_text())
    data["vagrant"]["consul"] = "vm"
    data["clusters"][1]["nodes"] = 2
    topo = tmp_path / "t.yaml"
    topo.write_text(yaml.safe_dump(data))
    want = machines_py.machines(data)
    assert [(m.name, m.ip, m.consul_ip) for m in want] == [
        ("east-consul", "10.99.0.2", "10.99.0.2"), ("east-node1", "10.99.0.11", "10.99.0.2"),
        ("west-consul", "10.99.1.2", "10.99.1.2"), ("west-node1", "10.99.1.11", "10.99.1.2"),
        ("west-node2", "10.99.1.12", "10.99.1.2")]
    got = vms(evaluate(topo, tmp_path))
    assert {n: g["ip"] for n, g in got.items()} == {m.name: m.ip for m in want}


def test_kvm_or_plain_emulation(tmp_path: Path) -> None:
    libvirt = evaluate(MINI, tmp_path)["vm"]["provider[libvirt]"]
    kvm = any(Path(f"/sys/module/{m}").is_dir() for m in ("kvm_intel", "kvm_amd")) and Path("/dev/kvm").exists()
    if kvm:
        assert libvirt["driver"] == "kvm"
    else:
        assert libvirt["driver"] == "qemu" and libvirt["cpu_model"] == "qemu64"
        assert libvirt["emulator_path"] == str(VAGRANT / "qemu-tcg")


def test_the_netns_lab_reads_the_same_file() -> None:
    from wiremesh.lab.topology import load_topology

    specs = load_topology(MINI)
    data = yaml.safe_load(MINI.read_text())
    assert [(s.name, s.id, s.pod_cidr, s.nodes) for s in specs] == [
        (c["name"], c["id"], c["pod_cidr"], c["nodes"]) for c in data["clusters"]]


def test_answers_are_what_the_wizard_accepts() -> None:
    from wiremesh.clustermesh.wizard import parse_answers

    got = parse_answers(machines_py.answers(yaml.safe_load(MINI.read_text())))
    assert [(a.name, a.consul) for a in got] == [("east", "http://10.99.0.11:8500"), ("west", "http://10.99.1.11:8500")]


def test_shell_assignments() -> None:
    out = machines_py.shell(yaml.safe_load(MINI.read_text()))
    assert "NODES=(east:east-node1:0 west:west-node1:1)" in out
    assert "CLUSTERS=(east:east-node1:10.99.0.11 west:west-node1:10.99.1.11)" in out
    assert "VMS=(east-node1 west-node1)" in out


@pytest.mark.parametrize("provider", ["libvirt", "virtualbox"])
def test_vagrant_validate(provider: str, tmp_path: Path) -> None:
    if not shutil.which("vagrant"):
        pytest.skip("vagrant is not installed (scripts/vagrant-setup.sh)")
    if provider == "libvirt" and subprocess.run(["vagrant", "plugin", "list"], check=False, capture_output=True, text=True,
                                                timeout=60).stdout.find("vagrant-libvirt") < 0:
        pytest.skip("the vagrant-libvirt plugin is not installed")
    env = {**os.environ, "VAGRANT_DEFAULT_PROVIDER": provider, "VAGRANT_CWD": str(VAGRANT),
           "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    if provider == "virtualbox" and not shutil.which("VBoxManage"):
        stub = tmp_path / "bin" / "VBoxManage"
        stub.parent.mkdir()
        stub.write_text('#!/bin/sh\n[ "$1" = --version ] && echo 7.0.14r161095\nexit 0\n')
        stub.chmod(0o755)
        env["PATH"] = f"{stub.parent}:{env['PATH']}"
    out = subprocess.run(["vagrant", "validate"], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "validated successfully" in out.stdout
