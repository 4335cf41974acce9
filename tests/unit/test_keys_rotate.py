"""`wiremesh keys rotate` and `wiremesh keys status` through click's CliRunner, against a fake Consul KV.

The fake holds keys in a dict with Consul's modify indexes, honours check-and-set, and its watch
wakes on writes. The agent's side of a rotation is played by the test: `on_idle` runs when the
CLI's watch has nothing new (it advances rotations as an agent would), or a thread writes.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from wiremesh.cli import keys_cmd, rotate_cmd
from wiremesh.cli.main import cli
from wiremesh.clustermesh import ClusterConfig, ConsulUnavailable, KVItem, NodeRecord, layout
from wiremesh.clustermesh.rotation import Rotation, parse_rotations
from wiremesh.clustermesh.watch import Stop

C = "lab"
NODES = ("n1", "n2", "n3", "n4", "n5")


class FakeKV:
    """A dict-backed Consul KV: get, put (cas), list, watch (blocking: woken by writes)."""

    def __init__(self) -> None:
        self.kv: dict[str, KVItem] = {}
        self.index = 10
        self.cond = threading.Condition()
        self.puts: list[tuple[str, int | None, bool]] = []  # (key, cas, written)
        self.on_idle: Callable[[FakeKV], bool] | None = None  # the test's agent; True if it wrote
        self.before_put: Callable[[FakeKV, str], None] | None = None  # a racing writer, once per call
        self.watch_failures = 0  # the next watch reads raise ConsulUnavailable
        self.active_now: set[str] = set()
        self.max_active = 0

    # --- ConsulStore's KV calls -----------------------------------------------------------
    def get(self, key: str, dc: str | None = None) -> KVItem | None:
        with self.cond:
            return self.kv.get(key)

    def list(self, prefix: str, dc: str | None = None) -> tuple[int, dict[str, KVItem]]:
        with self.cond:
            return self.index, {k: v for k, v in self.kv.items() if k.startswith(prefix)}

    def put(self, key: str, value: str | bytes, *, cas: int | None = None, acquire: str | None = None,
            dc: str | None = None, retry: bool = True) -> bool:
        if self.before_put is not None:
            racer, self.before_put = self.before_put, None
            racer(self, key)
        with self.cond:
            current = self.kv.get(key)
            written = cas is None or cas == (current.modify_index if current else 0)
            self.puts.append((key, cas, written))
            if written:
                self.index += 1
                data = value.encode() if isinstance(value, str) else value
                self.kv[key] = KVItem(key, data, self.index, current.session if current else None)
                self._count_active()
                self.cond.notify_all()
            return written

    def watch(self, prefix: str, stop: Stop, wait_s: int = 30, dc: str | None = None, *,
              min_interval_s: float = 0.0) -> Iterator[tuple[int, dict[str, KVItem]]]:
        last: dict[str, KVItem] | None = None
        while not stop.is_set():
            if self.watch_failures:
                self.watch_failures -= 1
                raise ConsulUnavailable("watch rotations: Consul unreachable (fake)")
            index, items = self.list(prefix)
            if items != last:
                last = items
                yield index, items
                continue
            if self.on_idle is not None and self.on_idle(self):
                continue
            with self.cond:
                self.cond.wait(0.02)

    # --- for the tests --------------------------------------------------------------------
    def _count_active(self) -> None:
        self.active_now = {r.node for r in self.rotations().values() if r.active}
        self.max_active = max(self.max_active, len(self.active_now))

    def rotations(self) -> dict[str, Rotation]:
        pfx = layout.rotations_prefix(C)
        return parse_rotations(C, {k: v.value for k, v in self.kv.items() if k.startswith(pfx)})[0].rotations

    def rotation(self, node: str) -> Rotation:
        return self.rotations()[node]

    def write_rotation(self, rot: Rotation) -> None:
        self.put(layout.rotation_key(C, rot.node), rot.to_json())


def agent_step(fake: FakeKV, node: str, state: str, **changes: Any) -> None:
    """What a node's agent writes: its rotation record, advanced to `state`."""
    rot = fake.rotation(node)
    fields: dict[str, Any] = {"epoch_from": 3, "epoch_to": 4, "updated_at": rot.requested_at + 2500, **changes}
    fake.write_rotation(replace(rot, state=state, **fields))


def finish_one(state: str = "done", **changes: Any) -> Callable[[FakeKV], bool]:
    """An agent that ends one active rotation (the first by name) each time the CLI waits."""

    def idle(fake: FakeKV) -> bool:
        active = sorted(n for n, r in fake.rotations().items() if r.active)
        if not active:
            return False
        confirmed = tuple(f"{C}/{p}" for p in NODES if p != active[0])[:2]
        agent_step(fake, active[0], state, confirmed=confirmed, **changes)
        return True

    return idle


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, cluster_config: ClusterConfig,
         make_node: Callable[..., NodeRecord]) -> FakeKV:
    """A cluster 'lab' with five live nodes n1..n5 (config, IPAM leases, records with a session)."""
    kv = FakeKV()
    kv.put(layout.config_key(C), cluster_config.to_json())
    for i, name in enumerate(NODES, start=1):
        cidr = f"10.240.{i}.0/24"
        kv.put(layout.ipam_key(C, cidr), name)
        kv.put(layout.node_key(C, name), make_node(name, cidr, key_epoch=3).to_json())
        kv.kv[layout.node_key(C, name)] = replace(kv.kv[layout.node_key(C, name)], session=f"s-{name}")
    kv.puts.clear()
    monkeypatch.setattr("wiremesh.cli.target.ConsulStore", lambda options: kv)
    return kv


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="wiremesh")


def errors(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def json_out(result: Result) -> dict[str, Any]:
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


# --- asking: created, joined, replaced -------------------------------------------------------


def test_request_created_with_check_and_set_create_only(fake: FakeKV) -> None:
    before = int(time.time() * 1000)
    result = run("keys", "rotate", "n2", "--cluster", C)
    assert result.exit_code == 0, result.output
    rot = fake.rotation("n2")
    assert rot.state == "requested" and rot.node == "n2" and re.fullmatch(r"[0-9a-f]{16}", rot.id)
    assert before <= rot.requested_at == rot.updated_at <= int(time.time() * 1000)
    assert fake.puts == [(layout.rotation_key(C, "n2"), 0, True)]
    assert f"n2: rotation {rot.id} requested" in result.stderr
    assert "n2" in result.stdout and "requested" in result.stdout  # the data table on stdout
    assert set(fake.rotations()) == {"n2"}


def test_active_rotation_is_the_same_rotation(fake: FakeKV) -> None:
    running = replace(Rotation.new("n1", 1_000), state="staged", epoch_from=3, epoch_to=4)
    fake.write_rotation(running)
    index = fake.kv[layout.rotation_key(C, "n1")].modify_index
    fake.puts.clear()
    result = run("-o", "json", "keys", "rotate", "n1", "--cluster", C)
    assert result.exit_code == 0, result.output
    assert fake.puts == []  # nothing written over an active rotation
    assert fake.kv[layout.rotation_key(C, "n1")].modify_index == index
    assert f"n1: already rotating (rotation {running.id}, staged)" in result.stderr
    (res,) = json_out(result)["rotations"]
    assert (res["id"], res["state"], res["already_rotating"]) == (running.id, "staged", True)


def test_two_commands_at_once_make_one_rotation(fake: FakeKV) -> None:
    other = Rotation.new("n1", 2_000)

    def racing_command(kv: FakeKV, key: str) -> None:  # another `keys rotate n1` wins the create
        kv.put(key, other.to_json(), cas=0)

    fake.before_put = racing_command
    result = run("-o", "json", "keys", "rotate", "n1", "--cluster", C)
    assert result.exit_code == 0, result.output
    assert [(cas, ok) for _, cas, ok in fake.puts] == [(0, True), (0, False)]
    assert fake.rotation("n1") == other
    (res,) = json_out(result)["rotations"]
    assert (res["id"], res["already_rotating"]) == (other.id, True)
    assert "already rotating" in result.stderr


@pytest.mark.parametrize("state", ["done", "failed", "abandoned"])
def test_ended_rotation_is_replaced_on_its_modify_index(fake: FakeKV, state: str) -> None:
    old = replace(Rotation.new("n3", 1_000), state=state, updated_at=5_000, error="x" if state != "done" else "")
    fake.write_rotation(old)
    index = fake.kv[layout.rotation_key(C, "n3")].modify_index
    fake.puts.clear()
    result = run("keys", "rotate", "n3", "--cluster", C)
    assert result.exit_code == 0, result.output
    new = fake.rotation("n3")
    assert new.id != old.id and new.state == "requested" and new.error == ""
    assert fake.puts == [(layout.rotation_key(C, "n3"), index, True)]


def test_ended_rotation_replaced_by_another_command_meanwhile_is_joined(fake: FakeKV) -> None:
    fake.write_rotation(replace(Rotation.new("n3", 1_000), state="done"))
    theirs = Rotation.new("n3", 9_000)
    fake.before_put = lambda kv, key: kv.write_rotation(theirs)
    result = run("-o", "json", "keys", "rotate", "n3", "--cluster", C)
    assert result.exit_code == 0, result.output
    assert fake.rotation("n3") == theirs
    assert json_out(result)["rotations"][0]["id"] == theirs.id


def test_invalid_stored_rotation_is_left_alone(fake: FakeKV) -> None:
    fake.put(layout.rotation_key(C, "n1"), '{"node": "n1", "id": "nothex!", "state": "requested"}')
    fake.puts.clear()
    result = run("keys", "rotate", "n1", "--cluster", C)
    assert result.exit_code == 1
    (line,) = errors(result)
    assert "n1" in line and "invalid" in line and "id" in line
    assert f"consul kv delete {layout.rotation_key(C, 'n1')}" in result.stderr
    assert fake.puts == []


# --- which nodes --------------------------------------------------------------------------------


def test_unknown_node_refused_and_nothing_asked(fake: FakeKV) -> None:
    result = run("keys", "rotate", "n1", "ghost", "--cluster", C)
    assert result.exit_code == 1
    (line,) = errors(result)
    assert "ghost" in line and "not a node of cluster lab" in line and "no rotation was asked for" in line
    assert "hint: its nodes (those whose agent runs): n1, n2, n3, n4, n5" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert fake.puts == []


def test_node_with_invalid_record_refused_with_its_reason(fake: FakeKV) -> None:
    fake.kv[layout.node_key(C, "n4")] = replace(fake.kv[layout.node_key(C, "n4")], value=b'{"name": "n4"}')
    result = run("keys", "rotate", "n4", "--cluster", C)
    assert result.exit_code == 1
    (line,) = errors(result)
    assert "n4 (its record is invalid:" in line


def test_unknown_cluster(fake: FakeKV) -> None:
    result = run("keys", "rotate", "n1", "--cluster", "nowhere")
    assert result.exit_code == 1
    assert "cluster 'nowhere': no config" in errors(result)[0]
    assert "hint: create it with: wiremesh cluster init" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [([], "which nodes? give NODE names, or --all"), (["n1", "--all"], "give NODE names or --all, not both"),
     (["N1"], "is not a node name"), (["n1", "--parallel", "0"], "--parallel"),
     (["n1", "--timeout", "0"], "--timeout")],
)
def test_usage_errors(fake: FakeKV, args: list[str], message: str) -> None:
    result = run("keys", "rotate", "--cluster", C, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert fake.puts == []


def test_cluster_required_without_agent_config(fake: FakeKV) -> None:
    result = run("keys", "rotate", "n1")
    assert result.exit_code == 2
    assert "which cluster? give --cluster NAME (or -c agent.toml)" in result.stderr


def test_cluster_from_agent_config(fake: FakeKV, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'node = "n1"\ncluster = "{C}"\nunderlay_address = "192.0.2.11"\n')
    monkeypatch.setenv("WIREMESH_AGENT_CONFIG", str(cfg))
    result = run("keys", "rotate", "n5")
    assert result.exit_code == 0, result.output
    assert fake.rotation("n5").state == "requested"
    assert run("keys", "status", "-c", str(cfg)).exit_code == 0


def test_all_asks_every_live_node(fake: FakeKV) -> None:
    result = run("-o", "json", "keys", "rotate", "--all", "--parallel", "5", "--cluster", C)
    assert result.exit_code == 0, result.output
    assert sorted(fake.rotations()) == list(NODES)
    assert all(r.state == "requested" for r in fake.rotations().values())
    assert [r["node"] for r in json_out(result)["rotations"]] == list(NODES)


def test_duplicate_node_names_are_one_node(fake: FakeKV) -> None:
    result = run("-o", "json", "keys", "rotate", "n1", "n1", "--cluster", C)
    assert result.exit_code == 0, result.output
    assert len(json_out(result)["rotations"]) == 1 and len(fake.puts) == 1


# --- waiting ------------------------------------------------------------------------------------


def test_parallel_2_over_5_never_more_than_2_active(fake: FakeKV) -> None:
    fake.on_idle = finish_one("done")
    result = run("-o", "json", "keys", "rotate", "--all", "--parallel", "2", "--cluster", C, "--timeout", "20")
    assert result.exit_code == 0, result.output
    assert fake.max_active == 2  # two at a time, and never a third
    assert all(r.state == "done" for r in fake.rotations().values()) and len(fake.rotations()) == 5
    results = json_out(result)["rotations"]
    assert [r["state"] for r in results] == ["done"] * 5
    assert len(result.stderr.splitlines()) == 10  # asked and ended: one line each, per node


def test_parallel_1_is_one_at_a_time_in_the_order_given(fake: FakeKV) -> None:
    order: list[str] = []

    def idle(kv: FakeKV) -> bool:
        order.extend(sorted(kv.active_now))
        return finish_one("done")(kv)

    fake.on_idle = idle
    result = run("keys", "rotate", "n3", "n1", "n2", "--cluster", C)  # --wait implied: 1 < 3 nodes
    assert result.exit_code == 0, result.output
    assert order == ["n3", "n1", "n2"] and fake.max_active == 1


def test_wait_done_exits_0_with_one_line_per_node(fake: FakeKV) -> None:
    fake.on_idle = finish_one("done")
    result = run("keys", "rotate", "n1", "n2", "--parallel", "2", "--wait", "--cluster", C)
    assert result.exit_code == 0, result.output
    assert "n1: done, key epoch 3 -> 4, 2 peers confirmed (2.5 s)" in result.stderr
    assert "n2: done, key epoch 3 -> 4" in result.stderr
    assert errors(result) == []


def test_watch_wakes_on_another_writer(fake: FakeKV) -> None:
    """An agent in another thread: its write wakes the CLI's watch (no polling of the test's)."""
    stop = threading.Event()

    def agent() -> None:
        while not stop.is_set():
            with fake.cond:
                fake.cond.wait(0.05)
            for node, rot in fake.rotations().items():
                if rot.state == "requested":
                    agent_step(fake, node, "staged")
                elif rot.state == "staged":
                    agent_step(fake, node, "done", confirmed=(f"{C}/n5",))

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    try:
        result = run("keys", "rotate", "n1", "n2", "--cluster", C, "--timeout", "20")
    finally:
        stop.set()
        thread.join(5)
    assert result.exit_code == 0, result.output
    assert {r.state for r in fake.rotations().values()} == {"done"}


def test_wait_failed_exits_1_naming_node_error_and_lagging_peers(fake: FakeKV) -> None:
    fake.on_idle = finish_one("failed", error="peers did not confirm within 30 s", lagging=("lab/n3", "east/e1"))
    result = run("keys", "rotate", "n1", "--wait", "--cluster", C)
    assert result.exit_code == 1
    (line,) = errors(result)
    assert line.startswith("error: n1: failed: peers did not confirm within 30 s; lagging peers: lab/n3, east/e1")
    assert "Traceback" not in result.output


def test_wait_abandoned_exits_1(fake: FakeKV) -> None:
    fake.on_idle = finish_one("abandoned", error="agent restarted before the switch; old key kept")
    result = run("-o", "json", "keys", "rotate", "n1", "n2", "--parallel", "2", "--wait", "--cluster", C)
    assert result.exit_code == 1
    assert len(errors(result)) == 2 and all("abandoned: agent restarted" in e for e in errors(result))
    assert [r["state"] for r in json_out(result)["rotations"]] == ["abandoned", "abandoned"]


def test_mixed_outcomes_exit_1_with_a_line_for_each_that_did_not_end_done(fake: FakeKV) -> None:
    outcomes = iter([("done", ""), ("failed", "boom"), ("done", "")])

    def idle(kv: FakeKV) -> bool:
        active = sorted(n for n, r in kv.rotations().items() if r.active)
        if not active:
            return False
        state, error = next(outcomes)
        agent_step(kv, active[0], state, error=error)
        return True

    fake.on_idle = idle
    result = run("keys", "rotate", "n1", "n2", "n3", "--cluster", C)
    assert result.exit_code == 1
    (line,) = errors(result)
    assert line.startswith("error: n2: failed: boom")


def test_wait_timeout_exits_1_and_names_the_state_and_the_nodes_not_started(fake: FakeKV) -> None:
    t0 = time.monotonic()
    result = run("-o", "json", "keys", "rotate", "n1", "n2", "--cluster", C, "--timeout", "0.5")
    assert time.monotonic() - t0 < 5
    assert result.exit_code == 1
    lines = errors(result)
    assert len(lines) == 2
    assert lines[0].startswith("error: n1: timed out: in state requested; 0 peers confirmed")
    assert lines[1] == "error: n2: not started: its turn had not come when the timeout passed"
    n1, n2 = json_out(result)["rotations"]
    assert (n1["state"], n1["timed_out"], n1["error"]) == ("requested", True, "timed out in state requested")
    assert (n2["state"], n2["id"], n2["timed_out"]) == ("not started", None, True)
    assert set(fake.rotations()) == {"n1"}  # n2 was never asked


def test_record_removed_while_waiting_is_reported(fake: FakeKV) -> None:
    def idle(kv: FakeKV) -> bool:
        key = layout.rotation_key(C, "n1")
        if key not in kv.kv:
            return False
        with kv.cond:
            del kv.kv[key]
            kv.index += 1
        return True

    fake.on_idle = idle
    result = run("keys", "rotate", "n1", "--wait", "--cluster", C, "--timeout", "5")
    assert result.exit_code == 1
    assert "its record was removed before it ended" in errors(result)[0]


def test_consul_outage_while_waiting_pauses_and_goes_on(fake: FakeKV) -> None:
    fake.watch_failures = 1
    fake.on_idle = finish_one("done")
    result = run("keys", "rotate", "n1", "--wait", "--cluster", C, "--timeout", "10")
    assert result.exit_code == 0, result.output
    assert "warning: watch rotations: Consul unreachable (fake); still waiting" in result.stderr


def test_json_result_fields(fake: FakeKV) -> None:
    fake.on_idle = finish_one("done")
    result = run("-o", "json", "keys", "rotate", "n4", "--wait", "--cluster", C)
    assert result.exit_code == 0, result.output
    data = json_out(result)
    assert data["cluster"] == C
    (res,) = data["rotations"]
    rot = fake.rotation("n4")
    assert res == {"node": "n4", "id": rot.id, "state": "done", "epoch_from": 3, "epoch_to": 4,
                   "confirmed": ["lab/n1", "lab/n2"], "lagging": [], "error": "", "seconds": 2.5,
                   "already_rotating": False, "timed_out": False}
    assert "{" not in result.stderr  # messages on stderr, data only on stdout


def test_progress_bar_on_a_terminal(fake: FakeKV, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr(rotate_cmd, "_terminal_console",
                        lambda: Console(file=screen, force_terminal=True, width=100, no_color=True))
    fake.on_idle = finish_one("done")
    result = run("keys", "rotate", "n1", "n2", "n3", "--cluster", C)
    assert result.exit_code == 0, result.output
    shown = screen.getvalue()
    assert "nodes rotated" in shown and "3/3" in shown
    assert "n1: done, key epoch 3 -> 4" in shown
    assert "peers confirmed" in shown  # the bar of a rotation in flight


# --- keys status --------------------------------------------------------------------------------


@pytest.fixture
def rotated(fake: FakeKV) -> FakeKV:
    now = int(time.time() * 1000)
    fake.write_rotation(replace(Rotation.new("n1", now - 200_000), state="done", updated_at=now - 180_000,
                                epoch_from=2, epoch_to=3, confirmed=("lab/n2",)))
    fake.write_rotation(replace(Rotation.new("n2", now - 8_000_000), state="failed", updated_at=now - 7_300_000,
                                error="peers did not confirm", lagging=("lab/n3", "east/e1")))
    fake.write_rotation(replace(Rotation.new("n3", now - 5_000), state="staged", confirmed=("lab/n1",)))
    return fake


def test_keys_status_table(rotated: FakeKV) -> None:
    result = run("keys", "status", "--cluster", C)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NODE", "KEY", "EPOCH", "LAST", "ROTATION", "PENDING", "LAGGING", "PEERS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(NODES)
    assert "done 3m ago" in rows["n1"]
    assert "failed 2h ago (peers did not confirm)" in rows["n2"] and "lab/n3, east/e1" in rows["n2"]
    assert re.search(r"staged, asked [45]s ago, 1 confirmed", rows["n3"])
    n4 = rows["n4"].split()
    assert n4[2] == "3" and n4[3:] == ["-", "-", "-"]
    rec = NodeRecord.from_json(rotated.kv[layout.node_key(C, "n4")].value)
    assert n4[1] == rec.fingerprint


def test_keys_status_json(rotated: FakeKV) -> None:
    result = run("-o", "json", "keys", "status", "--cluster", C)
    assert result.exit_code == 0, result.output
    data = json_out(result)
    by = {n["node"]: n for n in data["nodes"]}
    assert data["cluster"] == C and list(by) == list(NODES)
    assert by["n1"]["last_rotation"]["state"] == "done" and by["n1"]["pending"] is None
    assert by["n1"]["last_rotation"]["age_s"] in (179, 180, 181)
    assert by["n2"]["lagging"] == ["lab/n3", "east/e1"] and by["n2"]["last_rotation"]["error"]
    assert by["n3"]["pending"]["state"] == "staged" and by["n3"]["last_rotation"] is None
    assert by["n3"]["pending"]["confirmed"] == ["lab/n1"]
    assert by["n4"] == {"node": "n4", "live": True, "fingerprint": by["n4"]["fingerprint"], "key_epoch": 3,
                        "next_fingerprint": None, "last_rotation": None, "pending": None, "lagging": []}


def test_keys_status_shows_a_pending_request_and_nodes_gone(fake: FakeKV) -> None:
    assert run("keys", "rotate", "n5", "--cluster", C).exit_code == 0
    del fake.kv[layout.node_key(C, "n1")]  # n1's agent stopped: its record went with its session
    fake.write_rotation(replace(Rotation.new("n1", 1_000), state="done", updated_at=2_000))
    result = run("-o", "json", "keys", "status", "--cluster", C)
    by = {n["node"]: n for n in json_out(result)["nodes"]}
    assert by["n5"]["pending"]["state"] == "requested"
    assert by["n1"]["live"] is False and by["n1"]["fingerprint"] is None
    assert "(no record)" in run("keys", "status", "--cluster", C).stdout


def test_keys_status_warns_about_invalid_rotation_records(fake: FakeKV) -> None:
    fake.put(layout.rotation_key(C, "n2"), "not json")
    result = run("keys", "status", "--cluster", C)
    assert result.exit_code == 0
    assert f"warning: skipped invalid rotation record {layout.rotation_key(C, 'n2')}" in result.stderr


@pytest.mark.parametrize(("ms", "text"), [(0, "0s ago"), (119_999, "119s ago"), (120_000, "2m ago"),
                                          (7_199_000, "119m ago"), (7_200_000, "2h ago"),
                                          (3 * 86_400_000, "3d ago")])
def test_age(ms: int, text: str) -> None:
    assert keys_cmd.age(10**12 - ms, 10**12) == text


# --- cluster init --rotate-every ------------------------------------------------------------------


@pytest.fixture
def empty_kv(monkeypatch: pytest.MonkeyPatch) -> FakeKV:
    kv = FakeKV()
    monkeypatch.setattr("wiremesh.cli.cluster.ConsulStore", lambda options: kv)
    return kv


@pytest.mark.parametrize(("given", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("3600", 3600),
                                                ("2w", 14 * 86400), ("0", 0)])
def test_cluster_init_rotate_every(empty_kv: FakeKV, given: str, seconds: int) -> None:
    result = run("cluster", "init", C, "--id", "1", "--pod-cidr", "10.240.0.0/16", "--rotate-every", given)
    assert result.exit_code == 0, result.output
    stored = json.loads(empty_kv.kv[layout.config_key(C)].value)
    assert stored.get("rotate_every", 0) == seconds
    assert ("rotate_every" in stored) == bool(seconds)  # absent at 0: older agents read the config


@pytest.mark.parametrize(("given", "message"), [("30m", "1800 is outside 3600-31536000"),
                                                ("366d", "is outside 3600-31536000"),
                                                ("soon", "'soon' is not a duration"), ("-1h", "is not a duration")])
def test_cluster_init_rotate_every_refused(empty_kv: FakeKV, given: str, message: str) -> None:
    result = run("cluster", "init", C, "--id", "1", "--pod-cidr", "10.240.0.0/16", "--rotate-every", given)
    assert result.exit_code == 2
    assert "--rotate-every" in result.stderr and message in result.stderr
    assert empty_kv.kv == {}


@pytest.mark.parametrize("args", [["keys", "rotate"], ["keys", "status"], ["keys"]])
def test_help(args: list[str]) -> None:
    result = run(*args, "--help")
    assert result.exit_code == 0 and result.stdout.startswith("Usage: wiremesh")
    assert "rotate" in result.stdout if args == ["keys"] else "--cluster" in result.stdout
