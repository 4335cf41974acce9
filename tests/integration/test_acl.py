"""`wiremesh setup` creating per-node ACL tokens on a Consul with ACLs enabled (default deny)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiremesh.clustermesh import ConsulError, ConsulOptions, ConsulStore, layout
from wiremesh.clustermesh.tokens import write_token_file
from wiremesh.lab import consul_server
from wiremesh.lab.netns import NetnsExecutor, enter_cmd, netns_add, netns_del, terminate

from .conftest import new_lab_name

WM = str(Path(sys.executable).with_name("wiremesh"))


@pytest.fixture
def acl_consul(tmp_path: Path) -> Iterator[tuple[str, str, NetnsExecutor]]:
    ns = "wmtest-acl-" + new_lab_name()
    master = str(uuid.uuid4())
    netns_add(ns)
    ex = NetnsExecutor(ns)
    pid = 0
    try:
        cfg = tmp_path / "consul.json"
        consul_server.write_config(cfg, datacenter="acl1", node_name="consul-acl", data_dir=tmp_path / "data",
                                   bind="127.0.0.1", acl_master=master)
        pid = consul_server.start(ns, cfg, tmp_path / "consul.log")
        consul_server.wait_ready(ex, "http://127.0.0.1:8500", pid, token=master)
        yield ns, master, ex
    finally:
        ex.close()
        if pid:
            terminate([pid])
        netns_del(ns)


def test_agent_token_writes_only_its_own_node(acl_consul: tuple[str, str, NetnsExecutor], tmp_path: Path) -> None:
    ns, master, ex = acl_consul
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"clusters": [{"consul": "http://127.0.0.1:8500", "name": "secure", "id": 7,
                                                 "pod_cidr": "10.250.0.0/16", "acl_nodes": ["n1", "n2"]}]}))
    out = tmp_path / "tokens"
    master_file = tmp_path / "master.token"
    write_token_file(master_file, master)  # never on a command line
    cmd = enter_cmd(ns, None) + [WM, "--token-file", str(master_file), "setup", "--answers", str(answers), "--yes",
                                 "--acl-out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    token_file = out / "secure" / "n1.token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    secret = token_file.read_text().strip()
    assert secret not in p.stdout + p.stderr  # secrets go to the file only

    n1 = ConsulStore(ConsulOptions(address="http://127.0.0.1:8500", token=secret), retries=False)
    assert ex.call(n1.put, layout.node_key("secure", "n1"), "{}")
    lease = ex.call(n1.get, layout.ipam_key("secure", "10.250.0.0/24"))  # leased by the setup, for n1
    assert lease is not None and lease.value == b"n1"
    assert ex.call(n1.put, layout.ipam_key("secure", "10.250.0.0/24"), "n1", cas=lease.modify_index)
    assert ex.call(n1.get, layout.config_key("secure")) is not None
    ex.call(n1.catalog_register_node, "n1", "192.0.2.1")
    assert ex.call(n1.session_create, "wiremesh-agent secure/n1", 10, node="n1")
    with pytest.raises(ConsulError, match="permission denied"):
        ex.call(n1.put, layout.node_key("secure", "n2"), "{}")
    with pytest.raises(ConsulError, match="permission denied"):
        ex.call(n1.put, layout.config_key("secure"), "{}")

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to change" in again.stderr and "kept ACL token" in again.stderr
    assert token_file.read_text().strip() == secret


def test_acl_nodes_without_acls_is_refused(tmp_path: Path) -> None:
    from wiremesh.lab import Lab

    lab = Lab(new_lab_name())
    try:
        lab.up(0)
        answers = tmp_path / "answers.json"
        answers.write_text(json.dumps({"clusters": [{"consul": lab.consul_address(), "name": "lab", "id": 1,
                                                     "pod_cidr": "10.240.0.0/16", "acl_nodes": ["n1"]}]}))
        p = subprocess.run(enter_cmd(lab.hub, None) + [WM, "setup", "--answers", str(answers), "--yes", "--acl-out",
                                                       str(tmp_path / "t")], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and "acl_nodes" in p.stderr and "ACLs are not enabled" in p.stderr, p.stderr
    finally:
        lab.down()
