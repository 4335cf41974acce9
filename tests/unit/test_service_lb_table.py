"""The order of map operations of the service LB (ServiceTable), on fake maps that record it.

The property that matters: after every single map write or delete, a program looking up any
VIP finds either nothing, or a count N whose slots 1..N all name a backend that exists.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

import pytest

from wiremesh.tunnels.bpf import Backend, Frontend, ServiceEntry
from wiremesh.tunnels.bpf.errors import BpfMapFull
from wiremesh.tunnels.bpf.model import BACKEND_KEY, SERVICE_VALUE, decode_service_key, decode_service_value
from wiremesh.tunnels.bpf.table import ServiceTable

FE = Frontend("10.96.0.10", 80, "tcp")
FE2 = Frontend("10.96.0.11", 53, "udp")


def bk(i: int, cluster: int = 1) -> Backend:
    return Backend(f"10.1.0.{i}", 8080, cluster)


class FakeMap:
    """A map as a dict; every element written or deleted is logged, and `check` runs after it."""

    def __init__(self, name: str, log: list[tuple[str, str, bytes]], check: Callable[[], None]) -> None:
        self.name, self.log, self.check = name, log, check
        self.data: dict[bytes, bytes] = {}
        self.fail_on: str | None = None  # an operation that fails (after writing nothing)

    def _op(self, op: str, key: bytes, value: bytes | None) -> None:
        if self.fail_on == op:
            raise BpfMapFull(f"{op} in {self.name}: No space left on device", 28)
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value
        self.log.append((self.name, op, key))
        self.check()

    def update(self, key: bytes, value: bytes) -> None:
        self._op("update", key, value)

    def update_batch(self, keys: list[bytes], values: list[bytes]) -> None:
        for k, v in zip(keys, values):  # the kernel writes them one after the other too
            self._op("batch", k, v)

    def delete(self, key: bytes) -> bool:
        found = key in self.data
        self._op("delete", key, None)
        return found

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self.data.items())


class Maps:
    def __init__(self) -> None:
        self.log: list[tuple[str, str, bytes]] = []
        self.services = FakeMap("services", self.log, self.check)
        self.backends = FakeMap("backends", self.log, self.check)

    def check(self) -> None:
        """What a program could see right now is never a VIP with a hole."""
        for key, value in self.services.data.items():
            fe, slot = decode_service_key(key)
            if slot != 0 or fe is None:
                continue
            _, count, _ = decode_service_value(value)
            for s in range(1, count + 1):
                raw = self.services.data.get(fe.key(s))
                assert raw is not None, f"{fe}: count {count} but slot {s} missing"
                bid = decode_service_value(raw)[0]
                assert BACKEND_KEY.pack(bid) in self.backends.data, f"{fe}: slot {s} names missing backend {bid}"

    def table(self) -> ServiceTable:
        return ServiceTable(self.services, self.backends)

    def ops(self) -> list[tuple[str, str, object]]:
        """The log with keys readable: (map, op, slot or backend id); cleared."""
        out = []
        for name, op, key in self.log:
            what: object = decode_service_key(key)[1] if name == "services" else BACKEND_KEY.unpack(key)[0]
            out.append((name, op, what))
        self.log.clear()
        return out


@pytest.fixture
def maps() -> Maps:
    return Maps()


def test_create_writes_backends_then_slots_then_count(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1), bk(2)])
    assert maps.ops() == [("backends", "batch", 1), ("backends", "batch", 2),
                          ("services", "batch", 1), ("services", "batch", 2), ("services", "update", 0)]
    assert t.read() == {FE: ServiceEntry(1, (bk(1), bk(2)))}


def test_same_state_writes_nothing(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1), bk(2)])
    maps.ops()
    t.update(FE, [bk(1), bk(2)])
    maps.table().update(FE, [bk(1), bk(2)])  # nor does a new table over the same maps
    assert maps.ops() == []


def test_grow_writes_the_new_slot_before_the_count(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1), bk(2)])
    maps.ops()
    t.update(FE, [bk(1), bk(2), bk(3)])
    assert maps.ops() == [("backends", "update", 3), ("services", "update", 3), ("services", "update", 0)]


def test_shrink_lowers_the_count_before_removing_slots_and_backends(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1), bk(2), bk(3)])
    maps.ops()
    t.update(FE, [bk(3)])
    assert maps.ops() == [("services", "update", 1), ("services", "update", 0),
                          ("services", "delete", 2), ("services", "delete", 3),
                          ("backends", "delete", 1), ("backends", "delete", 2)]
    assert t.read()[FE].backends == (bk(3),)


def test_replacing_a_backend_keeps_the_count(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1), bk(2)])
    maps.ops()
    t.update(FE, [bk(1), bk(5)])
    assert maps.ops() == [("backends", "update", 3), ("services", "update", 2), ("backends", "delete", 2)]


def test_cluster_id_change_rewrites_the_backend_under_its_id(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1)])
    maps.ops()
    t.update(FE, [bk(1, cluster=2)])
    assert maps.ops() == [("backends", "update", 1)]
    assert t.read()[FE].backends == (bk(1, cluster=2),)


def test_zero_backends_keeps_the_service_with_count_zero(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1)])
    maps.ops()
    t.update(FE, [])
    assert maps.ops() == [("services", "update", 0), ("services", "delete", 1), ("backends", "delete", 1)]
    assert t.read() == {FE: ServiceEntry(1, ())}


def test_delete_removes_the_service_entry_first(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1), bk(2)])
    maps.ops()
    assert t.delete(FE)
    assert maps.ops() == [("services", "delete", 0), ("services", "delete", 1), ("services", "delete", 2),
                          ("backends", "delete", 1), ("backends", "delete", 2)]
    assert not t.delete(FE) and maps.ops() == []
    assert t.read() == {} and maps.backends.data == {}


def test_a_shared_backend_stays_while_a_service_uses_it(maps: Maps) -> None:
    t = maps.table()
    t.update_many({FE: [bk(1), bk(2)], Frontend("10.96.0.12", 80): [bk(2)]})
    t.delete(FE)
    assert [b for _, b in [(k, v) for k, v in maps.backends.data.items()]] == [bk(2).value(6)]


def test_tcp_and_udp_backends_are_distinct(maps: Maps) -> None:
    t = maps.table()
    t.update_many({FE: [bk(1)], Frontend("10.96.0.10", 80, "udp"): [bk(1)]})
    assert len(maps.backends.data) == 2


def test_update_many_is_one_batch_per_phase(maps: Maps) -> None:
    t = maps.table()
    other = Frontend("10.96.0.12", 80)
    t.update_many({FE: [bk(1), bk(2)], other: [bk(2), bk(3)]})  # bk(2) shared: written once
    phases = [(name, op, what == 0) for name, op, what in maps.ops()]
    assert phases == ([("backends", "batch", False)] * 3 + [("services", "batch", False)] * 4
                      + [("services", "batch", True)] * 2)
    assert t.snapshot() == {FE: ServiceEntry(1, (bk(1), bk(2))), other: ServiceEntry(2, (bk(2), bk(3)))}


def test_duplicates_are_one_slot(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1), bk(1, cluster=2), bk(2)])
    assert t.read()[FE].backends == (bk(1), bk(2))


def test_too_many_backends_changes_nothing(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1)])
    maps.ops()
    many = [Backend(ipaddress.IPv4Address(0x0A020000 + i), 80) for i in range(0x10000)]
    with pytest.raises(ValueError, match="at most 65535"):
        t.update_many({FE2: [bk(2)], FE: many})
    assert maps.ops() == [] and t.snapshot() == {FE: ServiceEntry(1, (bk(1),))}
    t.update(FE2, [bk(2)])
    assert t.read()[FE2] == ServiceEntry(2, (bk(2),))


def test_adopting_maps_keeps_ids_and_allocates_above_them(maps: Maps) -> None:
    first = maps.table()
    first.update_many({FE: [bk(1), bk(2), bk(3)], FE2: [bk(4)]})
    first.update(FE, [bk(3)])  # frees ids 1 and 2
    held = first.read()
    second = maps.table()  # the restarted agent
    assert second.read() == held
    maps.ops()
    second.update_many({FE: [bk(3), bk(9)], Frontend("10.96.0.13", 80): [bk(4)]})
    ops = maps.ops()
    assert ("backends", "update", 5) in ops or ("backends", "batch", 5) in ops  # above the highest id (4)
    assert not any(name == "backends" and what in (3, 4) for name, _, what in ops)  # 3 and 4 kept
    assert second.read()[Frontend("10.96.0.13", 80)].service_id == 3


def test_prune_removes_the_unwanted_and_orphans(maps: Maps) -> None:
    t = maps.table()
    t.update_many({FE: [bk(1)], FE2: [bk(2)]})
    maps.backends.data[BACKEND_KEY.pack(77)] = bk(7).value(6)  # an orphan left by a crash
    maps.services.data[FE2.key(5)] = SERVICE_VALUE.pack(2, 0, 0, 0)  # a surplus slot, likewise
    t = maps.table()
    assert t.prune([FE]) == [FE2]
    assert t.read() == {FE: ServiceEntry(1, (bk(1),))}
    assert list(maps.backends.data) == [BACKEND_KEY.pack(1)]


def test_a_failed_write_leaves_the_table_equal_to_the_maps(maps: Maps) -> None:
    t = maps.table()
    t.update(FE, [bk(1)])
    maps.services.fail_on = "batch"
    with pytest.raises(BpfMapFull):
        t.update(FE, [bk(1), bk(2), bk(3)])
    assert t.snapshot() == ServiceTable(maps.services, maps.backends).snapshot() == {FE: ServiceEntry(1, (bk(1),))}
    maps.services.fail_on = None
    t.update(FE, [bk(1), bk(2), bk(3)])
    assert t.read()[FE].backends == (bk(1), bk(2), bk(3))


def test_no_hole_ever_visible_in_random_changes(maps: Maps) -> None:
    rng = random.Random(9)
    fes = [Frontend(f"10.96.0.{i}", 80, rng.choice(["tcp", "udp"])) for i in range(1, 6)]
    pool = [bk(i, cluster=rng.randint(1, 2)) for i in range(1, 12)]
    t = maps.table()
    for _ in range(300):  # Maps.check runs after every single map operation
        action = rng.random()
        if action < 0.1:
            t.delete(rng.choice(fes))
        elif action < 0.15:
            t = maps.table()  # a restart: adopt
        elif action < 0.4:
            t.update_many({fe: rng.sample(pool, rng.randint(0, 5)) for fe in rng.sample(fes, 3)})
        else:
            fe = rng.choice(fes)
            t.update(fe, rng.sample(pool, rng.randint(0, 6)))
        assert t.snapshot() == maps.table().read()
    t.prune([])
    assert maps.services.data == {} and maps.backends.data == {}
