"""ConsulStore against a real Consul 1.8 (ACLs on, default deny): watches of KV, catalog and health,
transactions, and errors typed from what Consul really answers.

Each Consul here runs on 127.0.0.1 with free ports and its own data directory, and is stopped by
its pid; nothing waits for a fixed time, every wait is for a state.
"""

from __future__ import annotations

import json
import queue
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wiremesh.clustermesh import (
    ClusterConfig,
    ConsulError,
    ConsulOptions,
    ConsulReason,
    ConsulStore,
    ConsulUnavailable,
    Endpoint,
    KVOp,
    ServiceHealth,
    SessionExpired,
    TransactionFailed,
)
from wiremesh.clustermesh.acl import ensure_agent_token
from wiremesh.clustermesh.clusters import init_cluster

from .helpers import wait_until

MASTER = str(uuid.uuid4())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Consul:
    """One Consul server on loopback, free ports, a fresh directory; `stop()` ends it by its pid."""

    def __init__(self, root: Path, *, acl_master: str | None = None, bootstrap_expect: int = 1,
                 rpc_hold_timeout: str = "7s") -> None:
        binary = shutil.which("consul")
        assert binary, "consul is not installed"
        self.http_port = _free_port()
        cfg: dict[str, Any] = {
            "datacenter": "store1", "node_name": "store-test", "server": True, "bootstrap_expect": bootstrap_expect,
            "data_dir": str(root / "data"), "bind_addr": "127.0.0.1", "client_addr": "127.0.0.1",
            "ports": {"http": self.http_port, "dns": -1, "grpc": -1, "serf_lan": _free_port(),
                      "serf_wan": _free_port(), "server": _free_port()},
            "performance": {"raft_multiplier": 1, "rpc_hold_timeout": rpc_hold_timeout},
            "disable_update_check": True, "log_level": "warn",
        }
        if acl_master:
            cfg["primary_datacenter"] = "store1"
            cfg["acl"] = {"enabled": True, "default_policy": "deny", "tokens": {"master": acl_master}}
        (root / "consul.json").write_text(json.dumps(cfg))
        with open(root / "consul.log", "ab") as log:
            self.proc = subprocess.Popen([binary, "agent", f"-config-file={root / 'consul.json'}"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self.address = f"http://127.0.0.1:{self.http_port}"

    def store(self, token: str | None = None, *, timeout: float = 5.0) -> ConsulStore:
        return ConsulStore(ConsulOptions(self.address, token=token, timeout=timeout), retries=False)

    def answers(self, ready: Callable[[ConsulStore], object], token: str | None = None) -> bool:
        assert self.proc.poll() is None, "consul exited during start-up; see consul.log"
        try:
            return bool(ready(self.store(token)))
        except ConsulError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consul]:
    c = Consul(tmp_path_factory.mktemp("consul-store"), acl_master=MASTER)
    try:
        wait_until(lambda: c.answers(lambda s: s.leader() and s.list("wiremesh/") is not None, MASTER), 60,
                   interval=0.1, what="consul to elect itself and answer KV")
        yield c
    finally:
        c.stop()


@pytest.fixture
def store(consul: Consul) -> ConsulStore:
    return consul.store(MASTER)


class Watcher:
    """Runs a watch in a thread; what it yields goes to a queue; `count` is the reads it made."""

    def __init__(self, make: Callable[[threading.Event], Iterator[tuple[int, Any]]]) -> None:
        self.stop = threading.Event()
        self.got: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(make,), daemon=True)
        self.thread.start()

    def _run(self, make: Callable[[threading.Event], Iterator[tuple[int, Any]]]) -> None:
        try:
            for index, value in make(self.stop):
                self.got.put((index, value))
        except Exception as e:  # noqa: BLE001 - handed to the test
            self.got.put(e)

    def next(self, timeout: float = 15) -> tuple[int, Any]:
        item = self.got.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()


@pytest.fixture
def watcher() -> Iterator[Callable[..., Watcher]]:
    made: list[Watcher] = []

    def make(fn: Callable[[threading.Event], Iterator[tuple[int, Any]]]) -> Watcher:
        made.append(Watcher(fn))
        return made[-1]

    yield make
    for w in made:
        w.close()


def test_kv_watch_yields_on_change_and_not_spuriously(store: ConsulStore, watcher: Callable[..., Watcher],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}/"
    reads = {"n": 0}
    fetch = store._fetch

    def counted(*args: Any, **kw: Any) -> Any:
        reads["n"] += 1
        return fetch(*args, **kw)

    monkeypatch.setattr(store, "_fetch", counted)
    w = watcher(lambda stop: store.watch(prefix, stop, wait_s=1))
    index, items = w.next()
    assert items == {} and index >= 1  # nothing there yet (a 404 with an index)

    assert store.put(prefix + "a", "1")
    _, items = w.next()
    assert {k: v.value for k, v in items.items()} == {prefix + "a": b"1"}

    # Writes elsewhere and blocking reads that time out (index unchanged) deliver nothing: the
    # next delivery is the next change under the prefix.
    for i in range(3):
        assert store.put(f"elsewhere-{prefix}{i}", "x")
    seen = reads["n"]
    wait_until(lambda: reads["n"] >= seen + 2, 10, what="two more blocking reads (timeouts)")
    assert store.put(prefix + "b", "2")
    _, items = w.next()
    assert sorted(items) == [prefix + "a", prefix + "b"]
    assert w.got.empty()

    assert store.delete(prefix + "a")
    _, items = w.next()
    assert sorted(items) == [prefix + "b"]


def test_health_watch_sees_a_service_turn_passing_then_critical(store: ConsulStore,
                                                                watcher: Callable[..., Watcher]) -> None:
    name = f"web-{uuid.uuid4().hex[:6]}"
    check = store.agent_service_register(name, service_id=f"{name}-1", address="127.0.0.1", port=8080, ttl_s=300)
    assert check == f"service:{name}-1"
    try:
        passing = watcher(lambda stop: store.watch(Endpoint.health_service(name), stop, wait_s=2))
        every = watcher(lambda stop: store.watch(Endpoint.health_service(name, passing=False), stop, wait_s=2))
        _, h = passing.next()
        assert isinstance(h, ServiceHealth) and h.instances == ()  # a TTL check starts critical
        _, h = every.next()
        assert [(i.service_id, i.status) for i in h.instances] == [(f"{name}-1", "critical")]

        store.agent_check_update(check, "passing", "ok")
        _, h = passing.next()
        (inst,) = h.instances
        assert (str(inst.address), inst.port, inst.status, inst.datacenter) == ("127.0.0.1", 8080, "passing", "store1")
        _, h = every.next()
        assert [i.status for i in h.instances] == ["passing"]

        store.agent_check_update(check, "critical", "down")
        _, h = passing.next()
        assert h.instances == ()
        assert store.health_service(name, passing=False).instances[0].status == "critical"
    finally:
        store.agent_service_deregister(f"{name}-1")


def test_catalog_watch_sees_a_service_come_and_go(store: ConsulStore, watcher: Callable[..., Watcher]) -> None:
    name = f"db-{uuid.uuid4().hex[:6]}"
    w = watcher(lambda stop: store.watch(Endpoint.catalog_services(), stop, wait_s=2, dc="store1"))
    _, services = w.next()
    assert "consul" in services and name not in services
    store.agent_service_register(name, tags=["primary", "v2"])
    _, services = w.next()
    assert services[name] == {"primary", "v2"}
    assert store.catalog_services(dc="store1")[name] == {"primary", "v2"}
    store.agent_service_deregister(name)
    _, services = w.next()
    assert name not in services


def test_txn_applies_all_or_nothing(store: ConsulStore) -> None:
    p = f"txn-{uuid.uuid4().hex[:8]}/"
    store.txn([KVOp.set(p + "a", "1"), KVOp.cas(p + "b", "2", 0)])
    a = store.get(p + "a")
    assert a is not None and a.value == b"1"
    with pytest.raises(TransactionFailed) as ei:
        store.txn([KVOp.set(p + "c", "3"), KVOp.cas(p + "a", "x", a.modify_index + 1000)])
    e = ei.value
    assert (e.status, e.reason) == (409, ConsulReason.CONFLICT)
    assert [err.op_index for err in e.errors] == [1]
    assert store.get(p + "c") is None  # rolled back: the first op was not applied either
    store.txn([KVOp.delete(p + "a"), KVOp.delete(p + "b")])
    assert store.list(p)[1] == {}


def test_acl_refusals_are_typed(consul: Consul, store: ConsulStore) -> None:
    anonymous = consul.store(None)
    with pytest.raises(ConsulError) as ei:
        anonymous.put("wiremesh/v1/x", "1")
    assert (ei.value.status, ei.value.reason) == (403, ConsulReason.PERMISSION_DENIED)
    assert not isinstance(ei.value, ConsulUnavailable) and "permission denied" in str(ei.value)
    with pytest.raises(TransactionFailed) as ti:
        anonymous.txn([KVOp.set("wiremesh/v1/x", "1")])
    assert ti.value.reason is ConsulReason.PERMISSION_DENIED
    with pytest.raises(ConsulError) as ui:
        consul.store(str(uuid.uuid4())).get("wiremesh/v1/x")
    assert (ui.value.status, ui.value.reason) == (403, ConsulReason.ACL_NOT_FOUND)

    init_cluster(store, ClusterConfig(name="lab", id=7, pod_cidr="10.251.0.0/16"), force=True)  # tokens lease
    tok = ensure_agent_token(store, "lab", "n1")
    again = ensure_agent_token(store, "lab", "n1")
    assert again.created is False and again.secret_id == tok.secret_id
    agent = consul.store(tok.secret_id)
    assert agent.put("wiremesh/v1/clusters/lab/nodes/n1", "{}")
    with pytest.raises(ConsulError) as di:
        agent.put("wiremesh/v1/clusters/lab/nodes/n2", "{}")
    assert di.value.reason is ConsulReason.PERMISSION_DENIED


def test_session_refusals_are_typed(store: ConsulStore) -> None:
    with pytest.raises(ConsulError) as ei:
        store.session_create("too-short", 5)  # this server keeps Consul's default session_ttl_min (10s)
    assert ei.value.reason is ConsulReason.SESSION_TTL and not isinstance(ei.value, ConsulUnavailable)
    sid = store.session_create("ok", 10)
    store.session_destroy(sid)
    with pytest.raises(SessionExpired):
        store.put(f"s-{uuid.uuid4().hex[:8]}", "v", acquire=sid)
    with pytest.raises(SessionExpired):
        store.session_renew(sid)


def test_a_server_without_leader_is_unavailable(tmp_path: Path) -> None:
    # It waits for a second server that never comes; it holds each request up to rpc_hold_timeout
    # for a leader before it answers "No cluster leader".
    c = Consul(tmp_path, bootstrap_expect=2, rpc_hold_timeout="1s")
    try:
        wait_until(lambda: c.answers(lambda s: s.datacenters()), 60, interval=0.1, what="consul's HTTP API")
        patient = c.store(timeout=15.0)
        with pytest.raises(ConsulUnavailable) as ei:
            patient.list("wiremesh/")
        assert (ei.value.status, ei.value.reason) == (500, ConsulReason.NO_LEADER)
        with pytest.raises(ConsulUnavailable) as ti:
            patient.txn([KVOp.set("k", "v")])
        assert ti.value.reason is ConsulReason.NO_LEADER
    finally:
        c.stop()
