"""`lab up --tls --acl`: Consul serves HTTPS only (client certificates verified), every agent
verifies Consul's certificate with the lab's CA and runs on its own least-privilege token, read
from a 0600 file; no token is ever in a process's argv or a log. A Consul whose certificate
comes from another CA is refused with one clear line."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiremesh.clustermesh import ConsulOptions, layout, leases
from wiremesh.lab import Lab, consul_server, secure
from wiremesh.lab.lab import wiremesh_binary
from wiremesh.lab.netns import NetnsExecutor, enter_cmd, netns_add, netns_del, pids_in_netns, terminate

from .conftest import new_lab_name


@pytest.fixture(scope="module")
def tls_lab() -> Iterator[Lab]:
    lab = Lab(new_lab_name())
    try:
        lab.up(2, tls=True, acl=True)
        yield lab
    finally:
        lab.down()


def tokens(lab: Lab) -> dict[str, str]:
    files = [secure.master_token_file(lab, c) for c in lab.clusters]
    files += [Path(n.dir) / "consul.token" for n in lab.nodes.values()]
    return {str(f): f.read_text().strip() for f in files}


def test_agents_mesh_over_verified_https_on_their_own_tokens(tls_lab: Lab) -> None:
    lab = tls_lab
    assert lab.consul_address() == "https://10.99.0.1:8501"
    server = json.loads((lab.dir / "consul-lab.json").read_text())
    assert server["ports"]["http"] == -1 and server["verify_incoming_https"] is True
    for node in lab.nodes.values():
        toml = (Path(node.dir) / "agent.toml").read_text()
        assert 'address = "https://10.99.0.1:8501"' in toml and f'ca_file = "{secure.ca_file(lab)}"' in toml
        assert "token_file" in toml and "token =" not in toml
        assert (Path(node.dir) / "consul.token").stat().st_mode & 0o777 == 0o600
        assert lab.health(node.name)["peers_programmed"] == 1
    # Each agent's session is on its own Consul node, which is all its token allows.
    sessions = lab.consul(lambda s: {n: s.get(layout.node_key("lab", n)) for n in lab.nodes})
    for n, item in sessions.items():
        assert item is not None and item.session
        assert lab.consul(lambda s: s.session_info(item.session))["Node"] == n  # type: ignore[index, union-attr, arg-type]


def test_plain_http_and_no_client_certificate_are_refused(tls_lab: Lab) -> None:
    p = tls_lab.run("hub", "wiremesh", "--consul", "http://10.99.0.1:8500", "cluster", "status")
    assert p.returncode == 1 and "unreachable" in p.stderr
    p = tls_lab.run("hub", "env", "-u", "CONSUL_CLIENT_CERT", "-u", "CONSUL_CLIENT_KEY", "wiremesh", "cluster", "status")
    assert p.returncode == 1 and "refused this client's certificate" in p.stderr, p.stderr
    p = tls_lab.run("hub", "wiremesh", "cluster", "status", check=True)  # the operator: CA, certificate, token
    assert "lab" in p.stdout


def test_node_token_cannot_write_the_other_nodes_keys(tls_lab: Lab) -> None:
    """Through Consul's own CLI with node1's files (CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT, ...)."""
    lab = tls_lab
    cidr2 = next(c for c, n in lab.consul(lambda s: leases(s, "lab")).items() if n == "node2")
    lease2 = layout.ipam_key("lab", cidr2)
    before = lab.consul(lambda s: s.get(lease2))
    for key in (layout.node_key("lab", "node2"), lease2, layout.rotation_key("lab", "node2"), layout.config_key("lab")):
        p = lab.run("node1", "consul", "kv", "put", key, "x")
        assert p.returncode != 0 and "403" in p.stderr, (key, p.stderr)
    assert lab.consul(lambda s: s.get(lease2)) == before
    assert lab.health("node2")["peers_programmed"] == 1


def test_tokens_never_in_argv_or_logs(tls_lab: Lab) -> None:
    lab = tls_lab
    secrets = tokens(lab)
    assert len(secrets) == 3 and all(len(t) == 36 for t in secrets.values())
    # A refused command, verbose, prints no token either.
    p = lab.run("node1", "wiremesh", "-v", "service", "create", "web", "--port", "80")
    outputs = {"refused command": p.stdout + p.stderr}
    for f in [*lab.dir.glob("*.log"), *lab.dir.glob("nodes/*/*.log")]:
        outputs[str(f)] = f.read_text(errors="replace")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                outputs[f"argv of pid {proc.name}"] = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                pass  # exited meanwhile
    assert any("wiremesh agent" in v.replace("\0", " ") for v in outputs.values())  # the agents were looked at
    leaks = [(where, f) for where, text in outputs.items() for f, t in secrets.items() if t in text]
    assert leaks == []


def test_consul_with_another_cas_certificate_is_refused(tls_lab: Lab, tmp_path: Path) -> None:
    """A Consul serving HTTPS with a certificate of its own CA: the CLI and an agent that trust
    the lab's CA refuse it, one line naming the address and that the certificate is not trusted."""
    rogue = tmp_path / "rogue"
    secure.make_ca(rogue / "ca.pem", rogue / "ca-key.pem", "another CA")
    secure.issue(rogue / "ca.pem", rogue / "ca-key.pem", rogue / "server.pem", rogue / "server-key.pem",
                 "server.rogue.consul", ips=["127.0.0.1"], server=True)
    ns = "wmtest-tls-" + new_lab_name()
    netns_add(ns)
    ex = NetnsExecutor(ns)
    pid = 0
    try:
        cfg = tmp_path / "consul.json"
        consul_server.write_config(cfg, datacenter="rogue", node_name="consul-rogue", data_dir=tmp_path / "data",
                                   bind="127.0.0.1", extra={
                                       "ports": {"http": -1, "https": 8501, "dns": -1, "grpc": -1},
                                       "ca_file": str(rogue / "ca.pem"), "cert_file": str(rogue / "server.pem"),
                                       "key_file": str(rogue / "server-key.pem")})
        pid = consul_server.start(ns, cfg, tmp_path / "consul.log")
        consul_server.wait_ready(ex, "https://127.0.0.1:8501", pid, options=ConsulOptions(
            address="https://127.0.0.1:8501", ca_file=str(rogue / "ca.pem"), timeout=2.0))
        want = ("the certificate of Consul at https://127.0.0.1:8501 is not trusted "
                "(unable to get local issuer certificate)")
        p = _run(ns, "--consul", "https://127.0.0.1:8501", "--ca-file", str(secure.ca_file(tls_lab)),
                 "cluster", "status")
        assert p.returncode == 1 and p.stderr.startswith("error: ") and want in p.stderr, p.stderr
        assert p.stderr.count("\n") == 2 and p.stderr.splitlines()[1].startswith("hint: ")  # one line, one hint

        agent_dir = tmp_path / "agent"
        agent_dir.mkdir(mode=0o700)
        (agent_dir / "agent.toml").write_text(
            f'node = "n1"\ncluster = "lab"\nunderlay_address = "127.0.0.1"\nkey_file = "{agent_dir}/private.key"\n'
            f'state_dir = "{agent_dir}"\nhealth_address = ""\n\n[consul]\naddress = "https://127.0.0.1:8501"\n'
            f'ca_file = "{secure.ca_file(tls_lab)}"\n')
        p = _run(ns, "agent", "--config", str(agent_dir / "agent.toml"))
        assert p.returncode == 1 and want in p.stderr, p.stderr
        assert p.stderr.count("error: ") == 1 and "Traceback" not in p.stderr
    finally:
        ex.close()
        left = [p for p in pids_in_netns(ns) if p != pid]
        if pid:
            terminate([pid])
        if left:
            terminate(left)
        netns_del(ns)
    assert left == []  # the refused agent left nothing running


def _run(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = ["env", "-u", "CONSUL_HTTP_TOKEN", "-u", "CONSUL_HTTP_TOKEN_FILE", "-u", "CONSUL_CACERT"]
    return subprocess.run(enter_cmd(ns, None) + env + [wiremesh_binary(), *args], capture_output=True, text=True,
                          timeout=60)

