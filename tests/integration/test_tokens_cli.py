"""Consul tokens through the real `wiremesh` command against a real Consul 1.8 with ACLs on (issue 17,
item 5): a good token from each source reaches Consul; a bad one (a space, a line break, a control
character) or a file holding one that others may read is refused in one line that names the source
and the reason, with a hint, and the token appears in no output.

No namespaces: one Consul on loopback with free ports, stopped by its pid; each test's files live
in its own temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import wait_until
from .test_store import MASTER, Consul

WIREMESH = Path(sys.executable).with_name("wiremesh")
TOKEN_ENV = ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_ADDR", "WIREMESH_CONSUL_HTTP_ADDR")


@pytest.fixture(scope="module")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consul]:
    c = Consul(tmp_path_factory.mktemp("consul-tokens"), acl_master=MASTER)
    try:
        wait_until(lambda: c.answers(lambda s: s.leader() and s.list("wiremesh/") is not None, MASTER), 60,
                   interval=0.1, what="consul to elect itself and answer KV")
        yield c
    finally:
        c.stop()


def run(consul: Consul, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in TOKEN_ENV}
    return subprocess.run([str(WIREMESH), "--consul", consul.address, *args], capture_output=True, text=True,
                          timeout=120, env={**base, "NO_COLOR": "1", **(env or {})})


def refused(p: subprocess.CompletedProcess[str], said: str, hint: str) -> None:
    """Exit 1, one error line and one hint line on stderr, nothing on stdout, no token anywhere."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 2, p.stderr
    assert lines[0].startswith("error: ") and said in lines[0], p.stderr
    assert lines[1].startswith("hint: ") and hint in lines[1], p.stderr
    assert MASTER not in p.stdout + p.stderr and MASTER[:8] not in p.stdout + p.stderr


def secret_file(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_good_token_from_each_source_reaches_consul(consul: Consul, tmp_path: Path) -> None:
    init = ("cluster", "init", "tok", "--id", "7", "--pod-cidr", "10.250.0.0/16", "--unsigned")
    p = run(consul, *init)  # ACLs default deny: without a token Consul refuses the write
    assert p.returncode == 1 and "permission denied by Consul ACLs" in p.stderr, p.stderr
    f = secret_file(tmp_path / "token", MASTER + "\n", 0o600)
    try:
        for args, env in (([], {"CONSUL_HTTP_TOKEN": MASTER}), (["--token-file", str(f)], {}),
                          ([], {"CONSUL_HTTP_TOKEN_FILE": str(f)}), (["--token", MASTER], {})):
            p = run(consul, *args, *init, env=env)
            assert p.returncode == 0 and MASTER not in p.stdout + p.stderr, (args, env, p.stderr)
    finally:
        consul.store(MASTER).delete("wiremesh/v1/clusters/tok/config")


@pytest.mark.parametrize("source, value, said", [
    ("--token", MASTER + " ", "--token: has whitespace around it"),
    ("CONSUL_HTTP_TOKEN", MASTER + "\n", "CONSUL_HTTP_TOKEN: ends with a line break at position 37 of 37"),
    ("CONSUL_HTTP_TOKEN", f"{MASTER[:8]} {MASTER[9:]}", "CONSUL_HTTP_TOKEN: holds whitespace (a space or a tab)"),
    ("CONSUL_HTTP_TOKEN", MASTER + "\x1b[0m", "CONSUL_HTTP_TOKEN: holds a control character"),
    ("--token-file", f"{MASTER}\n{MASTER}\n", "not a token (holds a line break"),
    ("CONSUL_HTTP_TOKEN_FILE", f"{MASTER} x", "CONSUL_HTTP_TOKEN_FILE: token file"),
])
def test_a_bad_token_is_refused_naming_its_source_never_the_token(consul: Consul, tmp_path: Path, source: str,
                                                                  value: str, said: str) -> None:
    if source.startswith("--token-file") or source.endswith("_FILE"):
        f = secret_file(tmp_path / "token", value, 0o600)
        p = run(consul, "--token-file", str(f), "cluster", "list") if source.startswith("--") else \
            run(consul, "cluster", "list", env={source: str(f)})
    elif source == "--token":
        p = run(consul, "--token", value, "cluster", "list")
    else:
        p = run(consul, "cluster", "list", env={source: value})
    refused(p, said, "a Consul token is printable ASCII without spaces")


def test_token_files_others_may_read_are_refused_with_chmod_600(consul: Consul, tmp_path: Path) -> None:
    f = secret_file(tmp_path / "token", MASTER, 0o640)
    refused(run(consul, "--token-file", str(f), "cluster", "list"), f"--token-file: token file {f}: mode 0640",
            f"chmod 600 {f}")
    refused(run(consul, "cluster", "list", env={"CONSUL_HTTP_TOKEN_FILE": str(f)}),
            f"CONSUL_HTTP_TOKEN_FILE: token file {f}: mode 0640", f"chmod 600 {f}")


def test_agent_toml_holding_a_token(consul: Consul, tmp_path: Path) -> None:
    def toml(token: str) -> str:
        return (f'node = "node1"\ncluster = "lab"\nunderlay_address = "192.0.2.11"\n'
                f'[consul]\naddress = "{consul.address}"\ntoken = {json.dumps(token)}\n')

    config = secret_file(tmp_path / "agent.toml", toml(MASTER), 0o644)
    refused(run(consul, "agent", "--config", str(config), "--check"),
            f"{config}: consul.token: the file holds a token and mode 0644 lets others read it",
            f"chmod 600 {config}")
    config.chmod(0o600)
    p = run(consul, "agent", "--config", str(config), "--check")
    assert p.returncode == 0 and MASTER not in p.stdout + p.stderr, p.stderr
    secret_file(config, toml(MASTER + "\t"), 0o600)
    refused(run(consul, "agent", "--config", str(config), "--check"),
            f"{config}: consul.token: has whitespace around it", "printable ASCII")


def test_answers_file_holding_a_token(consul: Consul, tmp_path: Path) -> None:
    def answers(token: str) -> str:
        return json.dumps({"clusters": [{"consul": consul.address, "name": "tok", "id": 7, "pod_cidr": "10.250.0.0/16",
                                         "token": token, "unsigned": True}]})

    f = secret_file(tmp_path / "answers.json", answers(MASTER), 0o644)
    refused(run(consul, "setup", "--answers", str(f), "--dry-run"),
            f"{f}: it holds a Consul token and mode 0644 lets others read it", f"chmod 600 {f}")
    f.chmod(0o600)
    p = run(consul, "setup", "--answers", str(f), "--dry-run")
    assert p.returncode == 0 and "dry run" in p.stderr and MASTER not in p.stdout + p.stderr, p.stderr
    secret_file(f, answers(MASTER + "\n"), 0o600)
    refused(run(consul, "setup", "--answers", str(f), "--dry-run"),
            "clusters[0].token: ends with a line break", "printable ASCII")
