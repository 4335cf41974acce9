"""The agent never dies silently (issue 16): each trigger that used to kill a thread of the
agent (or freeze its federation) while /healthz said ok, driven through the real agents of a
lab of two clusters (east, west; two nodes each), real Consul, real wireguard-go.

After each trigger the agent must be *working*: a node added afterwards is programmed on it
within 5 s of that node's record appearing in Consul; no stage of a pass failed
(`wiremesh_pass_errors_total` unchanged) and no thread died (`dead_threads` absent, HTTP 200).
Each test also checks that its trigger really happened (two generations of a follower alive at
once, the remote re-watched, the epoch file refused by a full disk).

The keeper path: an agent that exits non-zero at start is started again by lab/keeper.py and
the node converges; one SIGKILLed (or SIGTERMed) is not.

Trigger 4 of the issue (a signing failure inside the commit's record publication) is in
tests/unit/test_registration_liveness.py: no real condition makes sign_record raise in a
running agent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from wiremesh.clustermesh import MeshMember, NodeRecord, layout
from wiremesh.clustermesh.rotation import Rotation
from wiremesh.clustermesh.services import ServicePort
from wiremesh.lab import Lab
from wiremesh.lab import services as lab_services
from wiremesh.lab import signing as lab_signing
from wiremesh.lab.netns import pid_alive
from wiremesh.lab.topology import load_topology

from .conftest import new_lab_name
from .helpers import keep_agent_logs, device_key, wait_until

PROGRAMMED_S = 5.0  # the bound: a node added afterwards is programmed within this
SERVICE = "liveness"
HELD_PEER = "west-node1"  # SIGSTOPped to hold a rotation staged


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two clusters of two nodes; the agents' logs kept (agent-logs*) when the lab goes."""
    lab = Lab(new_lab_name())
    try:
        lab.up(topology=load_topology(clusters=2, nodes=2))
        yield lab
    finally:
        keep_agent_logs(lab, tmp_path_factory.mktemp("agent-logs"))
        lab.down()


@pytest.fixture
def live(lab: Lab) -> Iterator[Lab]:
    """The lab converged before the test; nodes the test added are stopped (SIGTERM: their
    records go) after it, whatever happened."""
    before = set(lab.nodes)
    for n, node in lab.nodes.items():
        if not node.pid or not pid_alive(node.pid):
            lab.start_agent(n)
    lab.wait_converged(timeout=90)
    yield lab
    for n in set(lab.nodes) - before:
        if lab.node(n).pid:
            lab.stop_agent(n)


# --- reading the agents ------------------------------------------------------------------------


def running(lab: Lab) -> list[str]:
    return sorted(n for n, node in lab.nodes.items() if node.pid)


def cluster_of(lab: Lab, node: str) -> str:
    return lab.node(node).cluster or lab.clusters[0]


def get_json(lab: Lab, node: str, path: str) -> Any:
    n = lab.node(node)
    code, body = lab.http_get(n.health_url + path, timeout=2.0, cluster=n.cluster or None)
    assert code == 200, f"{node} {path}: HTTP {code}: {body[:300]!r}"
    return json.loads(body)


def threads(lab: Lab, node: str) -> list[str]:
    return list(get_json(lab, node, "/status")["threads"])


def pass_errors(lab: Lab, node: str) -> dict[str, float]:
    """wiremesh_pass_errors_total by stage, from the agent's /metrics."""
    n = lab.node(node)
    code, body = lab.http_get(n.health_url + "/metrics", timeout=2.0, cluster=n.cluster or None)
    assert code == 200
    out = {}
    for m in re.finditer(r'^wiremesh_pass_errors_total\{stage="([^"]+)"\} ([0-9.e+]+)$', body.decode(), re.MULTILINE):
        out[m.group(1)] = float(m.group(2))
    return out


def log_since(lab: Lab, node: str, offset: int) -> str:
    return (Path(lab.node(node).dir) / "agent.log").read_bytes()[offset:].decode(errors="replace")


def log_size(lab: Lab, node: str) -> int:
    return (Path(lab.node(node).dir) / "agent.log").stat().st_size


def assert_no_crash(lab: Lab, nodes: list[str], errors_before: dict[str, dict[str, float]],
                    offsets: dict[str, int]) -> None:
    """Every agent answers /healthz 200 "ok" with no dead thread, and no stage of a pass failed
    since `errors_before` (the agent's log since `offsets` is shown if one did)."""
    for n in nodes:
        h = lab.health(n)
        tail = log_since(lab, n, offsets.get(n, 0))[-2500:]
        assert h.get("http") == 200 and "dead_threads" not in h, f"{n}: {h}\n{tail}"
        assert h.get("status") == "ok", f"{n}: {h}\n{tail}"
        now = pass_errors(lab, n)
        grew = {s: v - errors_before[n].get(s, 0.0) for s, v in now.items() if v != errors_before[n].get(s, 0.0)}
        assert not grew, f"{n}: passes failed meanwhile (by stage): {grew}\n{tail}"
        assert not re.search(r"thread \S+ (died|ended with an error|returned while)", tail), f"{n}: a thread died:\n{tail}"


def record(lab: Lab, cluster: str, node: str) -> NodeRecord | None:
    item = lab.consul(lambda s: s.get(layout.node_key(cluster, node)), cluster)
    return NodeRecord.from_json(item.value, item.key) if item is not None else None


def programmed_key(lab: Lab, on: str, public_key: str) -> bool:
    try:
        peers = lab.peers(on)
    except (OSError, ValueError):
        return False
    return any(p["public_key"] == public_key and p["state"] == "done" for p in peers)


def add_node_programmed(lab: Lab, cluster: str, on: list[str],
                        timing: Callable[[str, float], None], what: str) -> str:
    """Add a node to `cluster`; assert it is programmed (peer done, its key) on each agent of
    `on` within PROGRAMMED_S of its record appearing in Consul. Returns its name."""
    node = lab.add_node(cluster=cluster, start=False, wait=False)
    lab.start_agent(node.name)
    rec: list[NodeRecord] = []

    def appeared() -> bool:
        r = record(lab, cluster, node.name)
        if r is not None:
            rec.append(r)
        return r is not None
    wait_until(appeared, 60, interval=0.02, what=f"{node.name}'s record in Consul")
    t0 = time.monotonic()
    key = rec[-1].public_key
    left = set(on)
    while left and time.monotonic() - t0 <= PROGRAMMED_S:
        left = {n for n in left if not programmed_key(lab, n, key)}
        time.sleep(0.02)
    took = time.monotonic() - t0
    if left:
        detail = {n: [p for p in lab.peers(n) if p["node"].endswith(node.name)] for n in sorted(left)}
        pytest.fail(f"{what}: {node.name} (record in Consul) not programmed within {PROGRAMMED_S} s on "
                    f"{sorted(left)}: {detail}; health: {[lab.health(n) for n in sorted(left)]}")
    timing(f"{what}: node added afterwards programmed on {len(on)} agents (from its record in Consul)", took)
    return node.name


def snapshot_errors(lab: Lab, nodes: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    return {n: pass_errors(lab, n) for n in nodes}, {n: log_size(lab, n) for n in nodes}


# --- 1. a global service deleted and created again within one blocking-query wait --------------


def _health_threads(names: list[str]) -> dict[str, set[int]]:
    """health-SERVICE@CLUSTER -> generations alive."""
    out: dict[str, set[int]] = {}
    for t in names:
        m = re.fullmatch(rf"(health-{SERVICE}@[a-z0-9-]+)#(\d+)", t)
        if m:
            out.setdefault(m.group(1), set()).add(int(m.group(2)))
    return out


def test_service_deleted_and_created_again_within_a_blocking_wait(live: Lab,
                                                                  timing: Callable[[str, float], None]) -> None:
    lab = live
    nodes = running(lab)
    if not all(lab.node(n).cgroup for n in nodes):
        pytest.skip("the lab's nodes have no eBPF service lookup (service_cgroup): no health watches")
    for n in nodes:
        assert "service_cgroup" in (Path(lab.node(n).dir) / "agent.toml").read_text()
    errors, offsets = snapshot_errors(lab, nodes)
    watched = {f"health-{SERVICE}@{c}" for c in lab.clusters}

    def define_all() -> None:
        for c in lab.clusters:
            lab.consul(lambda s, c=c: lab_services.define(s, c, SERVICE, [ServicePort(8181)], "none", [],
                                                          signer=lab_signing.operator_key(lab, c)), c)

    def delete_all() -> None:
        for c in lab.clusters:
            lab.consul(lambda s, c=c: s.delete(layout.service_key(c, SERVICE)), c)

    try:
        define_all()
        gens: dict[str, dict[str, set[int]]] = {}

        def watching() -> bool:
            for n in nodes:
                gens[n] = _health_threads(threads(lab, n))
            return all(set(gens[n]) == watched for n in nodes)
        wait_until(watching, 30, interval=0.1, what=f"every agent to watch {sorted(watched)}")
        # The trigger: deleted, then defined again while the first generation of each watch still
        # sits in its 10 s blocking query. Seen when both generations are alive at once.
        overlapped: dict[str, set[str]] = {n: set() for n in nodes}
        for _attempt in range(4):
            first = {n: {w: max(g) for w, g in gens[n].items()} for n in nodes}
            passes = {n: lab.health(n).get("passes", 0) for n in nodes}
            delete_all()
            wait_until(lambda: all(lab.health(n).get("passes", 0) > passes[n] for n in nodes),  # noqa: B023
                       15, interval=0.02,
                       what="a pass on every agent after the deletion")
            define_all()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 15:
                for n in nodes:
                    now = _health_threads(threads(lab, n))
                    for w, g in now.items():
                        if first[n].get(w) in g and any(x > first[n][w] for x in g):
                            overlapped[n].add(w)
                    gens[n] = now
                if all(all(w in g and max(g) > first[n].get(w, 0) for w, g in [(w, gens[n].get(w, set()))
                                                                             for w in watched]) for n in nodes) \
                        and all(overlapped[n] for n in nodes):
                    break
                time.sleep(0.05)
            if all(overlapped[n] for n in nodes):
                break
        assert all(overlapped[n] for n in nodes), (
            f"the trigger never happened (two generations of a health watch alive at once): {overlapped}, "
            f"threads now: {gens}")
        # Watching again: a successor per (service, cluster) on every agent.
        wait_until(watching, 30, interval=0.1, what="every agent to watch the service again")
        assert_no_crash(lab, nodes, errors, offsets)
        for n in nodes:  # the predecessors end once their blocking query returns
            wait_until(lambda n=n: all(len(g) == 1 for g in _health_threads(threads(lab, n)).values()), 30,
                       interval=0.2, what=f"{n}'s old health watches to end")
        add_node_programmed(lab, "east", nodes, timing, "service deleted and created again")
        assert_no_crash(lab, nodes, errors, offsets)
    finally:
        delete_all()


# --- 2. a member cluster whose mesh record changes ------------------------------------------------


def _mesh_member(lab: Lab, where: str, name: str) -> MeshMember:
    item = lab.consul(lambda s: s.get(layout.mesh_key(name)), where)
    assert item is not None, f"no mesh record of {name} in {where}"
    return MeshMember.from_json(item.value, item.key)


def _watch_gens(names: list[str], remote: str) -> set[int]:
    return {int(m.group(1)) for t in names if (m := re.fullmatch(rf"watch-{remote}#(\d+)", t))}


def test_member_cluster_record_changes(live: Lab, timing: Callable[[str, float], None]) -> None:
    lab = live
    nodes = running(lab)
    east = [n for n in nodes if cluster_of(lab, n) == "east"]
    errors, offsets = snapshot_errors(lab, nodes)
    original = _mesh_member(lab, "east", "west")
    free_id = next(i for i in range(200, 255) if i not in {lab.cluster_state(c)["id"] for c in lab.clusters})
    changed = dataclasses.replace(original, id=free_id)
    before = {n: _watch_gens(threads(lab, n), "west") for n in east}
    assert all(before[n] for n in east), f"east agents do not watch west: {before}"
    overlapped: dict[str, bool] = {n: False for n in east}

    def put(m: MeshMember) -> None:
        lab.consul(lambda s: s.put(layout.mesh_key("west"), m.to_json()), "east")

    def rewatched(want_id: int, older_than: dict[str, set[int]]) -> bool:
        ok = True
        for n in east:
            gens = _watch_gens(threads(lab, n), "west")
            if older_than[n] & gens and any(g > max(older_than[n]) for g in gens):
                overlapped[n] = True  # the predecessor still in its blocking query, its successor running
            w = lab.health(n).get("clusters", {}).get("west", {})
            ok = ok and w.get("id") == want_id and w.get("synced") and w.get("reachable") \
                and any(g > max(older_than[n]) for g in gens)
        return ok

    try:
        put(changed)
        wait_until(lambda: rewatched(free_id, before), 30, interval=0.05,
                   what="east agents to watch west again under its changed record")
        middle = {n: _watch_gens(threads(lab, n), "west") for n in east}
        put(original)
        wait_until(lambda: rewatched(original.id, middle), 30, interval=0.05,
                   what="east agents to watch west again under its restored record")
    finally:
        put(original)
    assert any(overlapped.values()), "the trigger never happened: no two watches of west alive at once"
    for n in east:
        text = log_since(lab, n, offsets[n])
        assert text.count("watching cluster west") >= 2 and "cluster west left the mesh (or changed)" in text, \
            f"{n}'s log does not show west re-watched twice:\n{text[-2000:]}"
    assert_no_crash(lab, nodes, errors, offsets)
    # The acid test: west's watch is not frozen on the east agents.
    add_node_programmed(lab, "west", nodes, timing, "member cluster record changed twice")
    assert_no_crash(lab, nodes, errors, offsets)


# --- 3. a full disk while a rotation is staged ----------------------------------------------------


def _rotation(lab: Lab, cluster: str, node: str) -> Rotation | None:
    item = lab.consul(lambda s: s.get(layout.rotation_key(cluster, node)), cluster)
    return Rotation.from_json(item.value) if item is not None else None


def test_state_dir_full_while_a_rotation_is_staged(live: Lab, tmp_path: Path,
                                                   timing: Callable[[str, float], None]) -> None:
    lab, node = live, "east-node1"
    nodes = running(lab)
    errors, offsets = snapshot_errors(lab, nodes)
    epoch = record(lab, "east", node).key_epoch  # type: ignore[union-attr]
    d = lab.node(node).dir
    full = f"{d}.full"
    saved = tmp_path / "state"
    saved.mkdir()
    with ExitStack() as stack:
        held = lab.node(HELD_PEER).pid
        stack.callback(lambda: pid_alive(held) and os.kill(held, signal.SIGCONT))  # type: ignore[func-returns-value]
        os.kill(held, signal.SIGSTOP)  # its readiness cannot come: the rotation stays staged
        r = lab_signing.operator_request(lab, "east", Rotation.new(node, int(time.time() * 1000)))
        lab.consul(lambda s: s.put(layout.rotation_key("east", node), r.to_json()), "east")
        wait_until(lambda: (x := _rotation(lab, "east", node)) is not None and x.id == r.id and x.state == "staged",
                   8, interval=0.05, what="the rotation staged")
        assert Path(d, "private.key.next").exists()
        # The node's state dir becomes a full 1 MiB tmpfs inside its mount namespace (the host's
        # view and the agent's log, opened outside, stay as they are): a copy of the dir (its log
        # left out) on a tmpfs, bound over the dir at once, then filled to the last byte.
        lab.run(node, "sh", "-c", f"mkdir -p {full} && mount -t tmpfs -o size=1m wmfull {full} && "
                f"for f in {d}/* {d}/.[!.]*; do [ -e \"$f\" ] && [ \"${{f##*/}}\" != agent.log ] && "
                f"cp -a \"$f\" {full}/; done; mount --bind {full} {d}", check=True)

        def unmount() -> None:  # what the agent wrote meanwhile goes back to the real dir
            lab.run(node, "sh", "-c", f"rm -f {d}/fill {d}/.hold; cp -a {d}/. {saved}/; umount {d}; umount -l {full}; "
                    f"rmdir {full}")
            kept = {f.name for f in saved.iterdir()}
            for f in saved.iterdir():
                if f.is_file() and f.name != "agent.log":
                    (Path(d) / f.name).write_bytes(f.read_bytes())
            for f in Path(d).iterdir():  # what the agent removed meanwhile (private.key.next) goes too
                if f.is_file() and f.name not in kept and f.name not in ("agent.log", "agent.pid"):
                    f.unlink()
            epoch_file = Path(d) / "private.key.epoch"
            on_disk = epoch_file.read_text().strip() if epoch_file.exists() else "absent"
            now = record(lab, "east", node)
            if now is not None and on_disk != str(now.key_epoch):
                warnings.warn(f"{node}: epoch file says {on_disk} once space is back, its record "
                              f"{now.key_epoch}: never written again (a restart would announce the old epoch)")
        stack.callback(unmount)
        # A second name for the current key file: the switch's rename over it then frees nothing
        # (else the old key's page and inode would hold the epoch file it writes next).
        lab.run(node, "sh", "-c", f"ln {d}/private.key {d}/.hold && dd if=/dev/zero of={d}/fill bs=4k 2>/dev/null; true")
        assert lab.run(node, "sh", "-c", f"echo x > {d}/probe").returncode != 0, "the state dir is not full"
        os.kill(held, signal.SIGCONT)
        t0 = time.monotonic()
        wait_until(lambda: (x := _rotation(lab, "east", node)) is not None and not x.active, 40, interval=0.05,
                   what="the rotation to end on a full state dir")
        end = _rotation(lab, "east", node)
        timing("full state dir: peer released to the rotation ended", time.monotonic() - t0)
        text = log_since(lab, node, offsets[node])
        assert end is not None and end.state == "done", f"rotation ended {end}:\n{text[-2500:]}"
        # The trigger: the switch's epoch file write met the full disk (on the loop thread, before).
        assert re.search(r"cannot save \S*private\.key\.epoch \(No space left on device\)", text), \
            f"the epoch file write never met the full disk:\n{text[-2500:]}"
        rec = record(lab, "east", node)
        assert rec is not None and rec.key_epoch == epoch + 1 and rec.public_key == device_key(lab, node), rec
        assert_no_crash(lab, nodes, errors, offsets)
        # Working with the disk still full: a node added now is programmed on it.
        add_node_programmed(lab, "east", [node], timing, "state dir full after a rotation")
        assert_no_crash(lab, nodes, errors, offsets)


# --- the keeper: restarts a failed agent, never a killed one ---------------------------------------


def _keeper_lines(text: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^keeper: \S+ exited with (-?\d+); starting it again", text, re.MULTILINE)]


def test_keeper_restarts_an_agent_that_exits_non_zero(live: Lab) -> None:
    lab, node = live, "west-node2"
    toml = Path(lab.node(node).dir) / "agent.toml"
    good = toml.read_text()
    try:
        lab.stop_agent(node)  # SIGTERM: exits 0, not restarted
        wait_until(lambda: not lab.agent_pidfile(node).exists(), 10, what="the keeper to exit")
        toml.write_text(good + "\nthis is not toml = [\n")  # the agent refuses to start: exits non-zero
        at = log_size(lab, node)
        first = lab.start_agent(node)
        wait_until(lambda: _keeper_lines(log_since(lab, node, at)), 30, interval=0.05,
                   what="the keeper to see the agent fail")
        rc = _keeper_lines(log_since(lab, node, at))[0]
        assert rc > 0, f"the agent's exit code {rc}"
        toml.write_text(good)  # repaired: the keeper's next start succeeds
        wait_until(lambda: (p := lab.node(node).pid) != first and pid_alive(p)
                   and lab.health(node).get("status") == "ok", 60, interval=0.1,
                   what="the keeper to start the agent again and it to be healthy")
        lab.wait_converged(timeout=60)
        assert "Traceback" not in log_since(lab, node, at)
    finally:
        toml.write_text(good)
        if not lab.node(node).pid or not pid_alive(lab.node(node).pid):
            lab.start_agent(node)


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


def test_keeper_does_not_restart_a_killed_agent(live: Lab) -> None:
    lab, node = live, "east-node2"
    try:
        pid = lab.node(node).pid
        keeper = _ppid(pid)
        assert "keeper.py" in Path(f"/proc/{keeper}/cmdline").read_text()
        at = log_size(lab, node)
        lab.stop_agent(node, signal.SIGKILL)
        wait_until(lambda: not pid_alive(keeper), 15, interval=0.05, what="the keeper to exit")
        pidfile = lab.agent_pidfile(node)
        assert not pidfile.exists(), f"the keeper left (or wrote) a pid: {pidfile.read_text()}"
        assert not _keeper_lines(log_since(lab, node, at)), log_since(lab, node, at)
        assert lab.health(node).get("status") == "down"
    finally:
        if not lab.node(node).pid or not pid_alive(lab.node(node).pid):
            lab.start_agent(node)
    lab.wait_converged(timeout=60)
