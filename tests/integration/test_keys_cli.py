"""`wiremesh keys rotate|status` and `cluster init --rotate-every` against a real Consul.

No agents run here: the nodes are records written into Consul, and the agent's part of a
rotation is played by a thread that watches the rotation records and advances them, as an agent
would. What is tested is the CLI's side against what Consul really does: check-and-set creation
(two commands at once racing for the same key), blocking-query watches that wake on writes, and
the --parallel schedule.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from wiremesh.cli.main import cli
from wiremesh.clustermesh import ConsulStore, NodeRecord, layout, overlay_address
from wiremesh.clustermesh.rotation import parse_rotations
from wiremesh.keys import PrivateKey

from .helpers import wait_until
from .test_store import Consul

C = "rot"
NODES = ("r1", "r2", "r3", "r4")


@pytest.fixture(scope="module")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consul]:
    c = Consul(tmp_path_factory.mktemp("consul-keys"))
    try:
        wait_until(lambda: c.answers(lambda s: s.leader() and s.list("wiremesh/") is not None), 60,
                   interval=0.1, what="consul to elect itself and answer KV")
        yield c
    finally:
        c.stop()


def run(consul: Consul, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--consul", consul.address, *args], prog_name="wiremesh")


@pytest.fixture(scope="module")
def cluster(consul: Consul) -> ConsulStore:
    """Cluster 'rot' made by `cluster init`, with four nodes' records and leases written directly."""
    result = run(consul, "cluster", "init", C, "--id", "9", "--pod-cidr", "10.250.0.0/16", "--rotate-every", "1d",
                 "--unsigned")
    assert result.exit_code == 0, result.output
    store = consul.store()
    for i, name in enumerate(NODES, start=1):
        cidr = f"10.250.{i}.0/24"
        rec = NodeRecord(name, C, f"192.0.2.{i}:51820", PrivateKey.generate().public_key().base64, cidr,
                         overlay_address(cidr), key_epoch=1)
        assert store.put(layout.ipam_key(C, cidr), name, cas=0)
        assert store.put(layout.node_key(C, name), rec.to_json(), cas=0)
    return store


@pytest.fixture(autouse=True)
def no_rotations(cluster: ConsulStore) -> Iterator[None]:
    yield
    cluster.delete(layout.rotations_prefix(C), recurse=True)


class PlayedAgents:
    """Every node's agent, played: each requested rotation goes staged, then done, through a
    real blocking watch; `max_active` is the most rotations active at once that it saw."""

    def __init__(self, store: ConsulStore) -> None:
        self.store, self.stop, self.max_active = store, threading.Event(), 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for _, items in self.store.watch(layout.rotations_prefix(C), self.stop, wait_s=1):
                rotations = parse_rotations(C, {k: v.value for k, v in items.items()})[0].rotations
                self.max_active = max(self.max_active, sum(r.active for r in rotations.values()))
                for node, rot in rotations.items():
                    key = layout.rotation_key(C, node)
                    nxt = {"requested": "staged", "staged": "done"}.get(rot.state)
                    if nxt:
                        peers = tuple(f"{C}/{p}" for p in NODES if p != node)
                        new = replace(rot, state=nxt, epoch_from=1, epoch_to=2, updated_at=rot.requested_at + 100,
                                      confirmed=peers if nxt == "done" else ())
                        self.store.put(key, new.to_json(), cas=items[key].modify_index)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


def test_cluster_init_rotate_every_stored(consul: Consul, cluster: ConsulStore) -> None:
    result = run(consul, "-o", "json", "cluster", "show", C)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rotate_every"] == 86400


def test_rotate_writes_the_request_and_status_shows_it_pending(consul: Consul, cluster: ConsulStore) -> None:
    result = run(consul, "-o", "json", "keys", "rotate", "r1", "--cluster", C)
    assert result.exit_code == 0, result.output
    (res,) = json.loads(result.stdout)["rotations"]
    item = cluster.get(layout.rotation_key(C, "r1"))
    assert item is not None and json.loads(item.value)["id"] == res["id"] and res["state"] == "requested"

    status = run(consul, "-o", "json", "keys", "status", "--cluster", C)
    assert status.exit_code == 0, status.output
    by = {n["node"]: n for n in json.loads(status.stdout)["nodes"]}
    assert by["r1"]["pending"]["id"] == res["id"] and by["r1"]["pending"]["state"] == "requested"
    assert by["r2"]["pending"] is None and by["r2"]["key_epoch"] == 1
    table = run(consul, "keys", "status", "--cluster", C).stdout
    assert any(line.startswith("r1") and "requested, asked" in line for line in table.splitlines())


def test_two_commands_at_once_make_one_rotation(consul: Consul, cluster: ConsulStore, tmp_path: Path) -> None:
    """Two processes ask for r2 at the same moment: one creates the rotation, the other follows it."""
    go = tmp_path / "go"
    script = ("import os, sys, time\n"
              f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
              "from wiremesh.cli.main import main\n"
              "sys.argv = ['wiremesh'] + sys.argv[1:]\n"
              "main()\n")
    args = ["--consul", consul.address, "-o", "json", "keys", "rotate", "r2", "--cluster", C]
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        go.touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(out)["rotations"][0] for out, _ in outs]
    assert results[0]["id"] == results[1]["id"]
    assert sorted(r["already_rotating"] for r in results) == [False, True]
    item = cluster.get(layout.rotation_key(C, "r2"))
    assert item is not None and json.loads(item.value)["id"] == results[0]["id"]


def test_parallel_rollout_with_played_agents(consul: Consul, cluster: ConsulStore) -> None:
    agents = PlayedAgents(cluster)
    try:
        result = run(consul, "-o", "json", "keys", "rotate", "--all", "--parallel", "2", "--cluster", C,
                     "--timeout", "30")
    finally:
        agents.close()
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)["rotations"]
    assert [(r["node"], r["state"], len(r["confirmed"])) for r in results] == [(n, "done", 3) for n in NODES]
    assert agents.max_active <= 2


def test_wait_times_out_without_agents(consul: Consul, cluster: ConsulStore) -> None:
    result = run(consul, "keys", "rotate", "r3", "--wait", "--timeout", "1", "--cluster", C)
    assert result.exit_code == 1
    assert "error: r3: timed out: in state requested" in result.stderr
    # Asked again while it is still pending: the same rotation, not a second one.
    again = run(consul, "-o", "json", "keys", "rotate", "r3", "--cluster", C)
    assert json.loads(again.stdout)["rotations"][0]["already_rotating"] is True
