"""`wiremesh policy` through the real command against a real Consul: apply (idempotent, a bad file
writes nothing and names the field), list, check (the verdict and the deciding rule), delete.

No namespaces: one Consul on loopback with free ports, stopped by its pid.
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
HOME: dict[str, str] = {}  # the commands' $HOME (no operator signing key of the user's own is found)

POLICY_FILE = Path(__file__).resolve().parents[2] / "lab" / "policies" / "api-from-frontend.yaml"  # (the README's)


@pytest.fixture(scope="module")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consul]:
    c = Consul(tmp_path_factory.mktemp("consul-policy"), acl_master=MASTER)
    HOME["path"] = str(tmp_path_factory.mktemp("policy-home"))
    try:
        wait_until(lambda: c.answers(lambda s: s.leader() and s.list("wiremesh/") is not None, MASTER), 60,
                   interval=0.1, what="consul to elect itself and answer KV")
        yield c
    finally:
        c.stop()


def run(consul: Consul, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "WIREMESH_"))}
    return subprocess.run([str(WIREMESH), "--consul", consul.address, *args], capture_output=True, text=True,
                          timeout=120, env={**env, "NO_COLOR": "1", "CONSUL_HTTP_TOKEN": MASTER,
                                            "HOME": HOME["path"]})


@pytest.fixture(scope="module")
def west(consul: Consul) -> str:
    p = run(consul, "cluster", "init", "west", "--id", "2", "--pod-cidr", "10.241.0.0/16")
    assert p.returncode == 0, p.stderr
    return "west"


def test_apply_list_check_delete(consul: Consul, west: str) -> None:
    f = POLICY_FILE
    p = run(consul, "-o", "json", "policy", "apply", "-f", str(f), "--cluster", west)
    assert p.returncode == 0, p.stderr
    assert [r["result"] for r in json.loads(p.stdout)["policies"]] == ["created"]
    again = run(consul, "-o", "json", "policy", "apply", "-f", str(f), "--cluster", west)
    assert [r["result"] for r in json.loads(again.stdout)["policies"]] == ["unchanged"]

    listed = json.loads(run(consul, "-o", "json", "policy", "list", "--cluster", west).stdout)
    assert [(p["name"], p["cluster"], p["selector"]) for p in listed["policies"]] == \
        [("api-from-frontend", "west", 'app == "api"')]

    ok = run(consul, "-o", "json", "policy", "check", "--from", "app=frontend", "--to", "app=api", "--port", "8080",
             "--cluster", west)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ingress"] == "allow by west/api-from-frontend ingress[0]"
    no = run(consul, "-o", "json", "policy", "check", "--from", "app=other", "--to", "app=api", "--port", "8080",
             "--cluster", west)
    assert no.returncode == 1 and json.loads(no.stdout)["ingress"] == "deny by west/api-from-frontend ingress[1]"
    assert "deny: " in no.stderr

    gone = run(consul, "policy", "delete", "api-from-frontend", "--cluster", west)
    assert gone.returncode == 0 and "deleted" in gone.stderr
    assert "not defined" in run(consul, "policy", "delete", "api-from-frontend", "--cluster", west).stderr
    assert json.loads(run(consul, "-o", "json", "policy", "list", "--cluster", west).stdout)["policies"] == []


@pytest.mark.parametrize("text, said", [
    ("name: p\nselector: app = 'x'\n", "selector: at character 5"),
    ("name: p\nselector: all()\ningress:\n  - action: allow\n    ports: [{port: 99999}]\n",
     "ingress[0].ports[0].port"),
    ("name: p\nselector: all()\ningres: []\n", "ingres: unknown field"),
    ("name: ok\nselector: all()\n---\nname: p\nselector: all()\ningress: [{action: maybe}]\n",
     "(document 2): ingress[0].action"),
    ("name: [unclosed\n", "not YAML at line"),
])
def test_a_bad_file_writes_nothing_and_names_the_field(consul: Consul, west: str, tmp_path: Path, text: str,
                                                        said: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    p = run(consul, "policy", "apply", "-f", str(f), "--cluster", west)
    assert p.returncode == 2 and said in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert json.loads(run(consul, "-o", "json", "policy", "list", "--cluster", west).stdout)["policies"] == []
