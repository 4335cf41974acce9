"""agent.service_plan and agent.services: frontends from definitions and per-cluster health."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from wiremesh.agent.service_plan import BackendsView, plan_services
from wiremesh.agent.services import ServiceBackends, backends_of
from wiremesh.clustermesh import ConsulUnavailable, ServiceHealth, ServiceInstance
from wiremesh.clustermesh.services import Backend, ClusterBackends, ServiceDef, ServicePort
from wiremesh.tunnels import Backend as LBBackend
from wiremesh.tunnels import Frontend

WEB = ServiceDef("web", "east", "10.96.0.11", (ServicePort(80), ServicePort(53, "udp", 5353)), "local")
E1, W1 = Backend("east", "10.240.1.2", 8080, "n1"), Backend("west", "10.241.1.2", 8080, "w1")
IDS = {"east": 1, "west": 2}


def test_each_port_is_a_frontend_with_the_affinity_s_backends() -> None:
    st = plan_services("east", {"web": WEB}, BackendsView({"web": {"east": ClusterBackends((E1,)), "west": ClusterBackends((W1,))}},
                       {"web": True}), IDS)
    assert st.frontends == {
        Frontend("10.96.0.11", 80, "tcp"): (LBBackend("10.240.1.2", 8080, 1),),  # local affinity: east only
        Frontend("10.96.0.11", 53, "udp"): (LBBackend("10.240.1.2", 5353, 1),),  # target_port wins
    }
    assert st.unsettled == frozenset()


def test_failover_to_the_remote_cluster_carries_its_cluster_id() -> None:
    st = plan_services("east", {"web": WEB},
                       BackendsView({"web": {"east": ClusterBackends(()), "west": ClusterBackends((W1,))}}, {"web": True}),
                       IDS)
    assert st.frontends[Frontend("10.96.0.11", 80)] == (LBBackend("10.241.1.2", 8080, 2),)


def test_a_service_whose_health_is_not_read_yet_is_left_as_it_is() -> None:
    st = plan_services("east", {"web": WEB}, BackendsView({}, {"web": False}), IDS)
    assert st.frontends == {}
    assert st.unsettled == {Frontend("10.96.0.11", 80, "tcp"), Frontend("10.96.0.11", 53, "udp")}


def test_no_healthy_backend_is_an_empty_frontend() -> None:
    st = plan_services("east", {"web": WEB}, BackendsView({"web": {"east": ClusterBackends(())}}, {"web": True}), IDS)
    assert st.frontends[Frontend("10.96.0.11", 80)] == ()


def instance(addr: str, port: int = 8080, node: str = "n1") -> ServiceInstance:
    return ServiceInstance("web", f"web-{addr}", node, "east", ipaddress.ip_address(addr), port, "passing")


def test_backends_of_keeps_ipv4_instances_with_a_port() -> None:
    h = ServiceHealth("web", (instance("10.240.1.3"), instance("fd00::1"), instance("10.240.1.2", port=0)))
    assert backends_of("east", h) == (Backend("east", "10.240.1.3", 8080, "n1", "web-10.240.1.3"),)


class FakeStore:
    """Health answers fed by the test, per (service, dc); a watch blocks until the next one."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.answers: dict[tuple[str, str | None], list[Any]] = {}

    def feed(self, service: str, dc: str | None, answer: Any) -> None:
        with self.cond:
            self.answers.setdefault((service, dc), []).append(answer)
            self.cond.notify_all()

    def watch(self, endpoint: Any, stop: threading.Event, wait_s: int = 30, dc: str | None = None) -> Iterator[Any]:
        service = endpoint.what.split()[-1]
        while not stop.is_set():
            with self.cond:
                self.cond.wait_for(lambda: self.answers.get((service, dc)) or stop.is_set(), timeout=0.05)
                q = self.answers.get((service, dc)) or []
                item = q.pop(0) if q else None
            if isinstance(item, Exception):
                raise item
            if item is not None:
                yield 1, item


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def watcher() -> Iterator[tuple[ServiceBackends, FakeStore, Clock, threading.Event]]:
    store, clock, changed = FakeStore(), Clock(), threading.Event()
    threads: list[threading.Thread] = []

    def spawn(name: str, fn: Callable[[], object]) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        threads.append(t)
        t.start()

    sb = ServiceBackends(store, spawn, changed.set, clock=clock, grace_s=10)  # type: ignore[arg-type]
    yield sb, store, clock, changed
    sb.close()
    for t in threads:
        t.join(5)
    assert not [t.name for t in threads if t.is_alive()]


def wait(pred: Callable[[], bool]) -> None:
    for _ in range(400):
        if pred():
            return
        threading.Event().wait(0.01)
    raise AssertionError("condition not reached")


def test_every_cluster_is_watched_and_settles_once_read(watcher: Any) -> None:
    sb, store, clock, changed = watcher
    sb.follow({"web"}, {"east": None, "west": "dc-west"})
    assert sb.settled() == {"web": False}
    store.feed("web", None, ServiceHealth("web", (instance("10.240.1.2"),)))
    wait(lambda: sb.view()["web"]["east"].backends != ())
    assert sb.settled() == {"web": False}  # west not read yet
    store.feed("web", "dc-west", ServiceHealth("web", ()))
    wait(lambda: sb.settled() == {"web": True})
    assert sb.view()["web"]["west"] == ClusterBackends((), False)


def test_an_unreadable_cluster_keeps_its_backends_until_the_grace_ends(watcher: Any) -> None:
    sb, store, clock, changed = watcher
    sb.follow({"web"}, {"west": "dc-west"})
    store.feed("web", "dc-west", ServiceHealth("web", (instance("10.241.1.2", node="w1"),)))
    wait(lambda: sb.settled() == {"web": True})
    store.feed("web", "dc-west", ConsulUnavailable("watch: Consul unreachable"))
    wait(lambda: sb.next_change() == 110.0)
    assert sb.view()["web"]["west"].stale is False and sb.view()["web"]["west"].backends
    clock.now = 110.0
    assert sb.view()["web"]["west"].stale is True
    assert sb.next_change() is None
    store.feed("web", "dc-west", ServiceHealth("web", (instance("10.241.1.2", node="w1"),)))
    wait(lambda: sb.view()["web"]["west"].stale is False)


def test_following_fewer_services_stops_their_watches(watcher: Any) -> None:
    sb, store, clock, changed = watcher
    sb.follow({"web", "db"}, {"east": None})
    assert set(sb.view()) == {"web", "db"}
    sb.follow({"web"}, {"east": None})
    assert set(sb.view()) == {"web"}
