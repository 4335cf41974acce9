"""Issue 16, trigger 4: a failure that is not Consul's (the record cannot be built or signed)
inside the record publication of a rotation's commit. Before the change it ended the loop
that made the write; now the registration thread survives, the commit's publication is
answered False, the rotation stays staged (no switch time anyone could act on) and the
rotator commits on a later try once the record can be written again.

Driven through the real agent.registration.Registration (its loop in a thread owned by
agent.supervisor, so a death would be recorded), agent.rotation_link.RecordPublisher and
agent.rotation.Rotator; only Consul is a stand-in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from wiremesh.agent.metrics import AgentMetrics
from wiremesh.agent.registration import Registration
from wiremesh.agent.rotation import Rotator
from wiremesh.agent.rotation_link import RecordPublisher
from wiremesh.agent.supervisor import Supervisor
from wiremesh.clustermesh import ConsulOptions, NodeRecord, layout
from wiremesh.clustermesh.consul_values import KVItem
from wiremesh.clustermesh.rotation import Rotation, RotationReady
from wiremesh.keys import PrivateKey, read_key_file, write_key_file


class Store:
    """Consul's KV and sessions, in memory, thread-safe."""

    def __init__(self) -> None:
        self.kv: dict[str, str] = {}
        self.lock = threading.Lock()

    def get(self, key: str, **_: Any) -> KVItem | None:
        with self.lock:
            return KVItem(key, self.kv[key].encode(), 1) if key in self.kv else None

    def put(self, key: str, value: str | bytes, **_: Any) -> bool:
        with self.lock:
            self.kv[key] = value if isinstance(value, str) else value.decode()
        return True

    def delete(self, key: str, **_: Any) -> bool:
        with self.lock:
            self.kv.pop(key, None)
        return True

    def session_create(self, name: str, ttl_s: int, behavior: str = "delete", node: str | None = None) -> str:
        return "0123456789abcdef"

    def session_renew(self, session_id: str, retry: bool = True) -> None:
        return None


class Broken:
    """What fails while `on` is set: the record builder or the signing, as the test says."""

    def __init__(self) -> None:
        self.on = False
        self.calls = 0

    def check(self, what: str) -> None:
        if self.on:
            self.calls += 1
            raise RuntimeError(f"{what} failed (simulated)")


class FailingIdentity:
    """A node identity whose signing raises (an unusable identity key)."""

    def __init__(self, broken: Broken) -> None:
        self.broken = broken
        self.certificate = SimpleNamespace(to_dict=lambda: {"serial": "0" * 32})

    def sign(self, domain: bytes, doc: Any) -> str:
        self.broken.check("signing")
        return "c2lnbmVk"


@pytest.fixture(params=["record builder", "signing"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    key = PrivateKey.generate()
    write_key_file(tmp_path / "private.key", key)
    store, broken = Store(), Broken()
    rot = Rotator(store, "c", "a", tmp_path / "private.key")  # type: ignore[arg-type]
    base = NodeRecord("a", "c", "192.0.2.1:51820", key.public_key().base64, "10.240.1.0/24", "10.240.1.1")

    def build() -> NodeRecord:
        if request.param == "record builder":
            broken.check("building the record")
        return rot.announce(base)
    cfg = SimpleNamespace(cluster="c", node="a", session_ttl=10, state_dir=tmp_path, consul=ConsulOptions())
    stop = threading.Event()
    wake = threading.Event()
    reg = Registration(store, cfg, build, AgentMetrics(), stop, on_published=wake.set)  # type: ignore[arg-type]
    if request.param == "signing":
        reg.identity = FailingIdentity(broken)  # type: ignore[assignment]
    sup = Supervisor(stop)
    sup.spawn("register", reg.loop)
    try:
        yield SimpleNamespace(store=store, broken=broken, rot=rot, reg=reg, sup=sup, pub=RecordPublisher(reg, rot),
                              wake=wake)
    finally:
        stop.set()
        reg.republish.set()
        assert sup.join(timeout=5) == []


def drive_until(r: Any, pred: Callable[[], bool], ready: dict[str, RotationReady], timeout: float = 5.0) -> None:
    """Run the rotation stage as the agent's loop does (the rotation as Consul has it, the
    publisher's answers looked at on later passes) until `pred`."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out; rotation {r.rot.rotation}"
        item = r.store.get(layout.rotation_key("c", "a"))
        own = Rotation.from_json(item.value) if item is not None else None
        r.rot.drive(own, {"c/b"}, ready, dict, lambda _k: True, r.pub, r.reg.republish.set, {})
        r.wake.wait(0.05)
        r.wake.clear()


def test_a_commit_whose_record_cannot_be_written_is_retried_and_nothing_dies(rig: Any) -> None:
    r = rig
    r.store.put(layout.rotation_key("c", "a"), Rotation.new("a", int(time.time() * 1000)).to_json())
    drive_until(r, lambda: r.rot.rotation is not None and r.rot.rotation.state == "staged", {})
    nxt = read_key_file(r.rot.next_file).public_key().base64
    ready = {"c/b": RotationReady(nxt)}
    before = r.reg.metrics.sync_errors_total.labels("register")._value.get()

    # The commit's publication: building or signing the record raises (not a Consul error).
    r.broken.on = True
    drive_until(r, lambda: r.broken.calls > 0 and r.rot._committing == 0, ready)
    assert r.rot.rotation.state == "staged" and r.rot.switch_at == 0, "a commit Consul never took"
    rec = NodeRecord.from_json(r.store.kv[layout.node_key("c", "a")])
    assert rec.next_public_key == nxt and not rec.switch_at, "no switch time reached Consul"
    assert r.sup.alive() == ["register"] and r.sup.dead == {}, "the registration thread died"
    assert r.reg.metrics.sync_errors_total.labels("register")._value.get() > before
    assert r.rot.wake is not None, "the rotator scheduled no retry"

    # The record can be written again: the rotator commits on its own on a later pass.
    r.broken.on = False
    drive_until(r, lambda: r.rot.rotation.state == "committed", ready, timeout=10)
    rec = NodeRecord.from_json(r.store.kv[layout.node_key("c", "a")])
    assert rec.switch_at == r.rot.switch_at > 0 and rec.next_public_key == nxt
    assert r.sup.alive() == ["register"] and r.sup.dead == {}
