"""clustermesh.services: service definitions, VIP checks and the backends each affinity selects."""

from __future__ import annotations

import json
from typing import Any

import pytest

from wiremesh.clustermesh import InvalidRecord
from wiremesh.clustermesh.services import (
    Backend,
    ClusterBackends,
    ServiceDef,
    ServicePort,
    allocate_vip,
    parse_services,
    select_backends,
)

PFX = "wiremesh/v1/clusters/east/services/"
CIDR = "10.96.0.0/16"


def raw(**kw: Any) -> bytes:
    d: dict[str, Any] = {"name": "web", "cluster": "east", "vip": "10.96.0.10", "ports": [{"port": 80}]}
    d.update(kw)
    return json.dumps({k: v for k, v in d.items() if v is not None}).encode()


def refused(value: bytes, name: str = "web") -> str:
    good, bad = parse_services({PFX + name: value}, "east", CIDR, PFX)
    assert not good
    ((_, reason),) = bad
    return reason


def test_a_definition_round_trips() -> None:
    svc = ServiceDef.from_json(raw(ports=[{"port": 53, "protocol": "udp", "target_port": 5353}, {"port": 80}],
                                   affinity="local", prefer=["west", "east"]))
    assert svc.ports == (ServicePort(53, "udp", 5353), ServicePort(80, "tcp", 0))
    assert svc.prefer == ("west", "east")
    assert ServiceDef.from_json(svc.to_json()) == svc


def test_unknown_fields_are_kept_and_a_newer_major_refused() -> None:
    svc = ServiceDef.from_json(raw(session_affinity="client-ip"))
    assert svc.extra == {"session_affinity": "client-ip"}
    assert "session_affinity" in svc.to_json()
    assert refused(raw(schema="2.0")).startswith("schema: schema version 2.0 is newer")


@pytest.mark.parametrize("value,field", [
    (raw(vip="10.97.0.1"), "vip: 10.97.0.1 is outside the cluster's service CIDR 10.96.0.0/16"),
    (raw(vip="not-an-ip"), "vip: 'not-an-ip' is not an IP address"),
    (raw(vip="10.96.0.0"), "vip: 10.96.0.0 is the network or broadcast address"),
    (raw(ports=[{"port": 0}]), "port: 0 is outside 1-65535"),
    (raw(ports=[{"port": 80, "protocol": "sctp"}]), "ports[0].protocol: 'sctp' is not one of tcp, udp"),
    (raw(ports=[{"port": 80}, {"port": 80}]), "ports: 80/tcp is listed twice"),
    (raw(ports=[]), "ports: at least one port is needed"),
    (raw(ports="80"), "ports: must be a list"),
    (raw(ports=[{"port": 80, "tls": True}]), "ports[0].tls: unknown field"),
    (raw(affinity="nearest"), "affinity: 'nearest' is not one of none, local, remote"),
    (raw(prefer=["west", "west"]), "prefer: at most 16 clusters, each once"),
    (raw(prefer="west"), "prefer: must be a list of cluster names"),
    (raw(name="Web"), "name: 'Web' is not a service name"),
    (raw(cluster="west"), "cluster: 'west' is not this cluster ('east')"),
    (b"x" * (1024 * 1024), "value: 1048576 bytes is over the 16384-byte limit"),
    (b"[1]", "value: must be a JSON object"),
])
def test_bad_definitions_are_refused_with_the_field_and_reason(value: bytes, field: str) -> None:
    assert refused(value).startswith(field)


def test_a_name_that_differs_from_its_key_is_refused() -> None:
    assert refused(raw(name="api"), name="web").startswith("name: 'api' does not match")


def test_a_vip_belongs_to_the_first_service_by_name() -> None:
    good, bad = parse_services({PFX + "b": raw(name="b"), PFX + "a": raw(name="a")}, "east", CIDR, PFX)
    assert list(good) == ["a"]
    assert bad == [(PFX + "b", "vip: 10.96.0.10 is already service 'a''s")]


def test_without_a_config_nothing_is_accepted() -> None:
    good, bad = parse_services({PFX + "web": raw()}, "east", None, PFX)
    assert not good and "no valid config" in bad[0][1]


def test_allocate_vip_skips_the_first_ten_and_taken_ones() -> None:
    assert allocate_vip("10.96.0.0/24", []) == "10.96.0.11"
    assert allocate_vip("10.96.0.0/24", ["10.96.0.11", "10.96.0.12"]) == "10.96.0.13"
    with pytest.raises(InvalidRecord, match="no free address"):
        allocate_vip("10.96.0.0/29", [])


def b(cluster: str, n: int) -> Backend:
    return Backend(cluster, f"10.{1 if cluster == 'east' else 2}.0.{n}", 8080)


E1, E2, W1, W2, N1 = b("east", 1), b("east", 2), b("west", 1), b("west", 2), b("north", 1)


def svc(affinity: str = "none", prefer: tuple[str, ...] = ()) -> ServiceDef:
    return ServiceDef("web", "east", "10.96.0.10", (ServicePort(80),), affinity, prefer)


def pool(**kw: tuple[Backend, ...]) -> dict[str, ClusterBackends]:
    return {c: ClusterBackends(bs) for c, bs in kw.items()}


def test_none_spreads_over_every_cluster() -> None:  # Cilium #46623 dropped the remote ones
    assert select_backends(svc("none"), "east", pool(east=(E1, E2), west=(W1, W2))) == (E1, E2, W1, W2)


def test_local_uses_remote_only_while_no_local_is_healthy_then_all_of_them() -> None:
    assert select_backends(svc("local"), "east", pool(east=(E1,), west=(W1, W2))) == (E1,)
    # every local one failed: all remote ones, from every remote cluster (Cilium #46633: only the first)
    assert select_backends(svc("local"), "east", pool(east=(), west=(W1, W2), north=(N1,))) == (N1, W1, W2)


def test_remote_is_the_mirror() -> None:
    assert select_backends(svc("remote"), "east", pool(east=(E1,), west=(W1,))) == (W1,)
    assert select_backends(svc("remote"), "east", pool(east=(E1, E2), west=())) == (E1, E2)


def test_prefer_orders_clusters_and_unlisted_ones_come_last() -> None:
    s = svc(prefer=("west", "east"))
    assert select_backends(s, "east", pool(east=(E1,), west=(W1,), north=(N1,))) == (W1,)
    assert select_backends(s, "east", pool(east=(E1,), west=(), north=(N1,))) == (E1,)
    assert select_backends(s, "east", pool(east=(), west=(), north=(N1,))) == (N1,)


def test_a_stale_cluster_gets_new_connections_only_if_it_is_all_there_is() -> None:
    by = {"east": ClusterBackends((E1,)), "west": ClusterBackends((W1,), stale=True)}
    assert select_backends(svc("none"), "east", by) == (E1,)
    by = {"east": ClusterBackends(()), "west": ClusterBackends((W1,), stale=True)}
    assert select_backends(svc("local"), "east", by) == (W1,)


def test_no_backend_anywhere_is_an_empty_frontend() -> None:
    assert select_backends(svc("local"), "east", pool(east=(), west=())) == ()
