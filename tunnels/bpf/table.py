"""The service and backend maps as one table: read them, and change them in a safe order.

Kept apart from the loader so that the order of map operations is unit tested on fake maps.

Order (Cilium's, so that a program never finds a VIP with zero backends, nor a slot that points
nowhere): 1. backends, 2. backend slots 1..N, 3. the service entry (slot 0: count, id) — written
last on the way up, deleted first on the way down, 4. surplus slots (> N), 5. backends no
slot references any more. A change of many services (update_many) runs each phase for all of
them at once, one batch per phase.

Backend ids. The backends map itself is the allocation table: at load, every (address, port,
protocol) found there keeps its id, and new ids count up from the highest id in the map. A
restarted agent that adopts the pinned maps therefore gets the same ids without any state of
its own, ids are never reused while anything can hold them (a connecting program that read an
id just before its backend was deleted finds nothing, never another backend), and no hash of an
address can collide. Service ids (the rev-NAT index kept in reverse-NAT entries) are u16: read
back from slot 0 the same way; a freed one is reused only once the counter has gone round.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .errors import BpfMapFull
from .model import (
    BACKEND_KEY,
    MAX_BACKENDS,
    PROTO_NUMBERS,
    SERVICE_VALUE,
    Backend,
    BackendIdentity,
    Frontend,
    ServiceEntry,
    decode_backend,
    decode_service_key,
    decode_service_value,
)

MAX_BACKEND_ID = 0xFFFFFFFF
MAX_SERVICE_ID = 0xFFFF


class MapLike(Protocol):
    """What the table needs of a map (libbpf.BpfMap, or a fake in unit tests)."""

    name: str

    def update(self, key: bytes, value: bytes) -> None: ...
    def update_batch(self, keys: list[bytes], values: list[bytes]) -> None: ...
    def delete(self, key: bytes) -> bool: ...
    def items(self) -> list[tuple[bytes, bytes]]: ...


@dataclass
class _Service:
    service_id: int = 0            # slot 0's rev_nat_index; 0 while slot 0 is absent
    count: int = 0
    present: bool = False          # slot 0 is in the map
    slots: dict[int, int] = field(default_factory=dict)  # slot >= 1 -> backend id, as in the map


@dataclass
class _Ops:
    """Map operations of one change, by phase; applied in the order of the fields."""

    backend_writes: dict[int, bytes] = field(default_factory=dict)
    slot_writes: dict[bytes, bytes] = field(default_factory=dict)
    service_writes: dict[bytes, bytes] = field(default_factory=dict)
    service_deletes: list[bytes] = field(default_factory=list)
    slot_deletes: list[bytes] = field(default_factory=list)
    backend_deletes: list[int] = field(default_factory=list)
    unreferenced: set[int] = field(default_factory=set)


class ServiceTable:
    """wm_lb4_services and wm_lb4_backends, mirrored in memory; the maps are the truth."""

    def __init__(self, services: MapLike, backends: MapLike) -> None:
        self.services, self.backends = services, backends
        self._lock = threading.RLock()
        self._load()

    # ---- reading ----

    def _load(self) -> None:
        self._svcs: dict[Frontend, _Service] = {}
        self._backends: dict[int, bytes] = {}  # id -> the value in the map (decoded only by snapshot)
        self._ids: dict[BackendIdentity, int] = {}
        self._refs: collections.Counter[int] = collections.Counter()
        self._junk_keys: list[bytes] = []  # service keys no frontend can have
        frontends: dict[bytes, Frontend | None] = {}
        for raw_key, raw_value in self.backends.items():
            (bid,) = BACKEND_KEY.unpack(raw_key)
            self._backends[bid] = raw_value
            ident = (raw_value[:6], raw_value[6])  # (address and port, protocol)
            if raw_value[4:6] != b"\0\0" and bid < self._ids.get(ident, MAX_BACKEND_ID + 1):
                self._ids[ident] = bid
        for raw_key, raw_value in self.services.items():
            fe, slot = decode_service_key(raw_key, frontends)
            if fe is None:
                self._junk_keys.append(raw_key)
                continue
            svc = self._svcs.setdefault(fe, _Service())
            bid, count, rev_nat = decode_service_value(raw_value)
            if slot == 0:
                svc.service_id, svc.count, svc.present = rev_nat, count, True
            else:
                svc.slots[slot] = bid
                self._refs[bid] += 1
        # Above every id in use, also those only a (dangling) slot still names.
        self._next_backend_id = max(max(self._backends, default=0), max(self._refs, default=0)) + 1
        self._service_ids = {s.service_id for s in self._svcs.values() if s.service_id}
        self._next_service_id = max(self._service_ids, default=0) + 1

    def read(self) -> dict[Frontend, ServiceEntry]:
        """What the maps hold now, per frontend: its id and its backends in slot order."""
        with self._lock:
            self._load()
            return self.snapshot()

    def snapshot(self) -> dict[Frontend, ServiceEntry]:
        """What the maps held at the last read or change, without reading them again."""
        with self._lock:
            out = {}
            decoded: dict[int, Backend | None] = {}
            for fe, svc in self._svcs.items():
                backends = []
                for slot in range(1, svc.count + 1):
                    bid = svc.slots.get(slot, 0)
                    if bid not in decoded:
                        raw = self._backends.get(bid)
                        decoded[bid] = None if raw is None else decode_backend(raw)[0]
                    b = decoded[bid]
                    if b is not None:
                        backends.append(b)
                out[fe] = ServiceEntry(svc.service_id, tuple(backends))
            return out

    # ---- changing ----

    def update(self, frontend: Frontend, backends: Sequence[Backend]) -> None:
        """Make the maps hold exactly `backends` (in this order) behind `frontend`; idempotent."""
        self.update_many({frontend: backends})

    def update_many(self, services: Mapping[Frontend, Sequence[Backend]]) -> None:
        """update() for many frontends at once, one batch per phase (others are left alone)."""
        with self._lock:
            ops = _Ops()
            try:
                for fe, backends in services.items():
                    self._plan_update(fe, backends, ops)
            except Exception:
                self._load()  # nothing written yet: forget the half-made plan
                raise
            self._apply(ops)

    def delete(self, frontend: Frontend) -> bool:
        """Remove a frontend and the backends only it used; False if it was not there."""
        with self._lock:
            ops = _Ops()
            found = self._plan_delete(frontend, ops)
            self._apply(ops)
            return found

    def prune(self, keep: Iterable[Frontend]) -> list[Frontend]:
        """Remove every frontend not in `keep`, undecodable keys, and unreferenced backends."""
        with self._lock:
            wanted = set(keep)
            ops = _Ops()
            gone = sorted(fe for fe in self._svcs if fe not in wanted)
            for fe in gone:
                self._plan_delete(fe, ops)
            ops.service_deletes.extend(self._junk_keys)
            ops.unreferenced.update(bid for bid in self._backends if not self._refs[bid])
            self._apply(ops)
            self._junk_keys = []
            return gone

    # ---- planning: the state in memory changes here, the maps in _apply ----

    def _plan_update(self, fe: Frontend, backends: Sequence[Backend], ops: _Ops) -> None:
        proto = PROTO_NUMBERS[fe.proto]
        wanted: dict[bytes, Backend] = {}
        for b in backends:  # one slot per (address, port): the first one given wins
            wanted.setdefault(b.packed, b)
        if len(wanted) > MAX_BACKENDS:
            raise ValueError(f"{fe}: {len(wanted)} backends, at most {MAX_BACKENDS}")
        svc = self._svcs.setdefault(fe, _Service())
        for slot, b in enumerate(wanted.values(), 1):
            bid = self._backend_id(b, proto, ops)
            old = svc.slots.get(slot)
            if old != bid:
                ops.slot_writes[fe.key(slot)] = SERVICE_VALUE.pack(bid, 0, 0, 0)
                svc.slots[slot] = bid
                self._refs[bid] += 1
                if old is not None:
                    self._unref(old, ops)
        count = len(wanted)
        if not svc.service_id:
            svc.service_id = self._alloc_service_id(fe)
            svc.present = False
        if not svc.present or svc.count != count:
            ops.service_writes[fe.key(0)] = SERVICE_VALUE.pack(0, count, svc.service_id, 0)
            svc.count, svc.present = count, True
        for slot in sorted(s for s in svc.slots if s > count):
            ops.slot_deletes.append(fe.key(slot))
            self._unref(svc.slots.pop(slot), ops)

    def _plan_delete(self, fe: Frontend, ops: _Ops) -> bool:
        svc = self._svcs.pop(fe, None)
        if svc is None:
            return False
        if svc.present:
            ops.service_deletes.append(fe.key(0))
        for slot in sorted(svc.slots):
            ops.slot_deletes.append(fe.key(slot))
            self._unref(svc.slots[slot], ops)
        self._service_ids.discard(svc.service_id)
        return True

    def _backend_id(self, b: Backend, proto: int, ops: _Ops) -> int:
        ident = (b.packed, proto)
        bid = self._ids.get(ident)
        if bid is None:
            bid = self._alloc_backend_id()
            self._ids[ident] = bid
        value = b.value(proto)
        if self._backends.get(bid) != value:  # new, or its cluster id changed
            self._backends[bid] = value
            ops.backend_writes[bid] = value
        return bid

    def _unref(self, bid: int, ops: _Ops) -> None:
        self._refs[bid] -= 1
        if self._refs[bid] <= 0:
            ops.unreferenced.add(bid)

    def _alloc_backend_id(self) -> int:
        if self._next_backend_id <= MAX_BACKEND_ID:
            bid = self._next_backend_id
        else:  # 4 billion ids later: the lowest free one
            bid = next(i for i in range(1, MAX_BACKEND_ID + 1) if i not in self._backends)
        self._next_backend_id = bid + 1
        return bid

    def _alloc_service_id(self, fe: Frontend) -> int:
        if len(self._service_ids) >= MAX_SERVICE_ID:
            raise BpfMapFull(f"{fe}: no service id left ({MAX_SERVICE_ID} services)")
        sid = self._next_service_id
        while sid > MAX_SERVICE_ID or sid in self._service_ids:
            sid = 1 if sid >= MAX_SERVICE_ID else sid + 1
        self._service_ids.add(sid)
        self._next_service_id = sid + 1
        return sid

    # ---- applying ----

    def _apply(self, ops: _Ops) -> None:
        for bid in sorted(ops.unreferenced):
            if self._refs[bid] <= 0:
                ops.backend_deletes.append(bid)
                del self._refs[bid]
                raw = self._backends.pop(bid, None)
                if raw is not None and self._ids.get((raw[:6], raw[6])) == bid:
                    del self._ids[(raw[:6], raw[6])]
        try:
            _write(self.backends, {BACKEND_KEY.pack(b): v for b, v in ops.backend_writes.items()})
            _write(self.services, ops.slot_writes)
            _write(self.services, ops.service_writes)
            for key in ops.service_deletes + ops.slot_deletes:
                self.services.delete(key)
            for bid in ops.backend_deletes:
                self.backends.delete(BACKEND_KEY.pack(bid))
        except Exception:
            self._load()  # part of it may be written: the maps are the truth
            raise


def _write(m: MapLike, entries: dict[bytes, bytes]) -> None:
    if len(entries) == 1:
        ((key, value),) = entries.items()
        m.update(key, value)
    elif entries:
        m.update_batch(list(entries), list(entries.values()))
