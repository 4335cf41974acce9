"""The Consul boundary without a Consul: error mapping, the watch loop, typed values, and callers
that branch on the error's reason instead of its text."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from wiremesh.clustermesh import (
    ConsulError,
    ConsulOptions,
    ConsulReason,
    ConsulStore,
    ConsulUnavailable,
    Endpoint,
    KVOp,
    SessionExpired,
    TransactionFailed,
    TxnOpError,
)
from wiremesh.clustermesh.consul_errors import Reply, consul_error
from wiremesh.clustermesh.consul_values import parse_catalog_services, parse_health
from wiremesh.clustermesh.watch import RateLimit, follow

R = ConsulReason
U, E, S, T = ConsulUnavailable, ConsulError, SessionExpired, TransactionFailed

# --- the one mapping function: bodies as Consul 1.8.7 sends them --------------------------------

TXN_STALE = '{"Results":null,"Errors":[{"OpIndex":0,"What":"failed to set key \\"a\\", index is stale"}]}'
TXN_DENIED = '{"Results":null,"Errors":[{"OpIndex":1,"What":"Permission denied"}]}'


@pytest.mark.parametrize(("status", "body", "cls", "reason"), [
    (400, "Invalid index", E, R.BAD_REQUEST),
    (401, "ACL support disabled", E, R.ACL_DISABLED),
    (403, "Permission denied", E, R.PERMISSION_DENIED),
    (403, "ACL not found", E, R.ACL_NOT_FOUND),
    (404, "", E, R.NOT_FOUND),
    (409, TXN_STALE, T, R.CONFLICT),
    (409, TXN_DENIED, T, R.PERMISSION_DENIED),
    (409, "not json", E, R.CONFLICT),
    (412, "", E, R.CONFLICT),
    (413, "Request body(600000 bytes) too large, max size: 524288 bytes.", E, R.TOO_LARGE),
    (429, "", U, R.UNAVAILABLE),
    (500, "No cluster leader", U, R.NO_LEADER),
    (500, "No path to datacenter", U, R.NO_PATH_TO_DC),
    (500, "rpc error making call: EOF", U, R.UNAVAILABLE),
    (500, "rpc error making call: Permission denied", E, R.PERMISSION_DENIED),
    (500, "leadership lost while committing log", U, R.UNAVAILABLE),
    (500, "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]", E, R.SESSION_TTL),
    (500, "Session TTL 'abc' invalid: time: invalid duration \"abc\"", E, R.SESSION_TTL),
    (500, 'invalid session "00000000-0000-0000-0000-000000000000"', S, R.INVALID_SESSION),
    (500, 'Unknown check "nosuch"', E, R.NOT_FOUND),
    (500, "Invalid Policy: invalid Name. Only alphanumeric characters, '-' and '_' are allowed", E, R.BAD_REQUEST),
    (500, 'No such ACL policy with name "nope"', E, R.BAD_REQUEST),
    (502, "Bad Gateway", U, R.UNAVAILABLE),
    (503, "", U, R.UNAVAILABLE),
    (504, "", U, R.UNAVAILABLE),
    (418, "teapot", E, R.OTHER),
    (200, "<html>", E, R.BAD_RESPONSE),
])
def test_status_and_body_map_to_one_error_class_and_reason(status: int, body: str, cls: type[ConsulError],
                                                           reason: ConsulReason) -> None:
    e = consul_error("put k", Reply(status, body), "http://c:8500")
    assert type(e) is cls
    assert (e.status, e.reason) == (status, reason)
    assert str(e).startswith("put k: ")
    assert isinstance(e, ConsulUnavailable) == (reason in (R.UNREACHABLE, R.TIMEOUT, R.NO_LEADER, R.NO_PATH_TO_DC,
                                                           R.UNAVAILABLE))


def test_validation_500_keeps_consuls_message() -> None:
    e = consul_error("create ACL policy x", Reply(500, "Invalid Policy: A Policy with Name \"x\" already exists"))
    assert not isinstance(e, ConsulUnavailable)
    assert 'A Policy with Name "x" already exists' in str(e)


def test_rolled_back_transaction_lists_each_failed_operation() -> None:
    e = consul_error("transaction", Reply(409, TXN_DENIED))
    assert isinstance(e, TransactionFailed)
    assert e.errors == (TxnOpError(1, "Permission denied"),)
    assert "permission denied" in str(e) and e.hint is not None


@pytest.mark.parametrize(("exc", "cls", "reason"), [
    (requests.ConnectionError("Connection refused"), U, R.UNREACHABLE),
    (requests.exceptions.ConnectTimeout("connect timed out"), U, R.TIMEOUT),
    (requests.ReadTimeout("read timed out"), U, R.TIMEOUT),
    (requests.exceptions.ChunkedEncodingError("connection broken"), U, R.UNREACHABLE),
    (requests.exceptions.SSLError("certificate verify failed"), E, R.TLS),
    (ValueError("Expecting value: line 1 column 1"), E, R.BAD_RESPONSE),
    (KeyError("X-Consul-Index"), E, R.BAD_RESPONSE),
    (requests.exceptions.InvalidURL("bad"), E, R.OTHER),
])
def test_exceptions_map_to_reasons(exc: Exception, cls: type[ConsulError], reason: ConsulReason) -> None:
    e = consul_error("get k", exc, "http://c:8500")
    assert type(e) is cls and e.reason is reason and e.status is None
    assert str(e).startswith("get k: ")


def test_unreachable_names_the_address_and_hints() -> None:
    e = consul_error("status leader", requests.ConnectionError("refused"), "http://10.0.0.1:8500")
    assert str(e) == "status leader: Consul at http://10.0.0.1:8500 unreachable"
    assert e.hint is not None and "CONSUL_HTTP_ADDR" in e.hint


# --- the store over a fake transport: causes kept, what is retried --------------------------------


class FakeHTTP:
    """py-consul's HTTP client, answering from a script: each entry a Reply or an exception."""

    def __init__(self, *script: Reply | Exception) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, str, list[tuple[str, str]], Any]] = []

    def _answer(self, method: str, callback: Any, path: str, params: Any, data: Any = None) -> Any:
        self.calls.append((method, path, list(params or []), data))
        r = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(r, Exception):
            raise r
        return callback(SimpleNamespace(code=r.status, headers=r.headers, body=r.body))

    def get(self, callback: Any, path: str, params: Any = None, headers: Any = None) -> Any:
        return self._answer("get", callback, path, params)

    def put(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return self._answer("put", callback, path, params, data)

    def delete(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None) -> Any:
        return self._answer("delete", callback, path, params, data)


def store_with(http: FakeHTTP, **options: Any) -> ConsulStore:
    s = ConsulStore(ConsulOptions("http://c:8500", **options))
    s._http = lambda: http  # type: ignore[method-assign]
    return s


def test_transport_error_keeps_its_cause_and_is_retried() -> None:
    refused = requests.ConnectionError("refused")
    http = FakeHTTP(refused)
    with pytest.raises(ConsulUnavailable) as ei:
        store_with(http).get("k")
    assert ei.value.__cause__ is refused
    assert len(http.calls) == 4  # tenacity: 4 attempts for a short read


def test_refusal_is_not_retried() -> None:
    http = FakeHTTP(Reply(500, "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]"))
    with pytest.raises(ConsulError) as ei:
        store_with(http).session_create("s", 5)
    assert ei.value.reason is R.SESSION_TTL and len(http.calls) == 1


def test_unavailable_then_answer() -> None:
    http = FakeHTTP(Reply(500, "No cluster leader"), Reply(200, '"10.0.0.1:8300"'))
    assert store_with(http).leader() == "10.0.0.1:8300"
    assert len(http.calls) == 2


def test_transaction_is_sent_once_and_its_errors_come_back() -> None:
    http = FakeHTTP(Reply(409, TXN_STALE))
    with pytest.raises(TransactionFailed) as ei:
        store_with(http, datacenter="dc2").txn([KVOp.cas("a", "x", 5)])
    assert ei.value.reason is R.CONFLICT and ei.value.errors[0].op_index == 0
    assert http.calls == [("put", "/v1/txn", [("dc", "dc2")], '[{"KV": {"Verb": "cas", "Key": "a", "Index": 5, "Value": "eA=="}}]')]


def test_unreadable_answer_is_bad_response_with_its_cause() -> None:
    http = FakeHTTP(Reply(200, "{not json", {"X-Consul-Index": "5"}))
    with pytest.raises(ConsulError) as ei:
        store_with(http).list("p/")
    assert ei.value.reason is R.BAD_RESPONSE and isinstance(ei.value.__cause__, ValueError)


def test_missing_index_header_is_bad_response() -> None:
    with pytest.raises(ConsulError) as ei:
        store_with(FakeHTTP(Reply(200, "{}", {}))).catalog_services()
    assert ei.value.reason is R.BAD_RESPONSE


def test_put_with_a_lost_session_is_session_expired() -> None:
    http = FakeHTTP(Reply(500, 'invalid session "abc"'))
    with pytest.raises(SessionExpired):
        store_with(http).put("k", "v", acquire="abc")


def test_renew_of_a_gone_session_is_session_expired() -> None:
    with pytest.raises(SessionExpired):
        store_with(FakeHTTP(Reply(404, "Session id 'x' not found"))).session_renew("x")


def test_watch_endpoints_send_dc_index_and_wait() -> None:
    http = FakeHTTP(Reply(200, '{"web": ["v1"]}', {"X-Consul-Index": "7"}),
                    Reply(200, '{"web": ["v1"], "db": []}', {"X-Consul-Index": "9"}))
    stop = threading.Event()
    it = store_with(http).watch(Endpoint.catalog_services(), stop, wait_s=10, dc="west", min_interval_s=0)
    assert next(it) == (7, {"web": {"v1"}})
    assert next(it) == (9, {"web": {"v1"}, "db": set()})
    assert [c[2] for c in http.calls] == [[("dc", "west")], [("index", "7"), ("wait", "10s"), ("dc", "west")]]


# --- the watch loop: Consul's blocking-query rules ----------------------------------------------


class Script:
    """A fetch(index) that answers from a list and records the indexes asked for."""

    def __init__(self, answers: list[tuple[int, Any]], stop: threading.Event) -> None:
        self.answers, self.stop, self.asked = list(answers), stop, []  # type: list[int]

    def __call__(self, index: int) -> tuple[int, Any]:
        self.asked.append(index)
        answer = self.answers.pop(0)
        if not self.answers:
            self.stop.set()
        return answer


def run(answers: list[tuple[int, Any]]) -> tuple[list[tuple[int, Any]], list[int]]:
    stop = threading.Event()
    fetch = Script(answers, stop)
    got = list(follow(fetch, stop))
    return got, fetch.asked


def test_first_read_does_not_block_and_later_reads_block_on_the_last_index() -> None:
    got, asked = run([(5, "a"), (8, "b"), (9, "c")])
    assert got == [(5, "a"), (8, "b")]  # the last answer came with stop set: not delivered
    assert asked == [0, 5, 8]


def test_unchanged_index_is_not_delivered() -> None:
    got, asked = run([(5, "a"), (5, "a"), (5, "a"), (6, "b"), (7, "end")])
    assert got == [(5, "a"), (6, "b")]
    assert asked == [0, 5, 5, 5, 6]


def test_new_index_with_the_same_value_is_not_delivered() -> None:
    got, _ = run([(5, "a"), (6, "a"), (7, "b"), (8, "end")])
    assert got == [(5, "a"), (7, "b")]


def test_index_going_backwards_resets_and_never_sends_0() -> None:
    got, asked = run([(50, "a"), (10, "b"), (12, "b"), (13, "c"), (14, "end")])
    assert got == [(50, "a"), (10, "b"), (13, "c")]
    assert asked == [0, 50, 1, 12, 13]  # reset: the next read starts over (index 1, not 0, not 50)


def test_index_0_from_consul_is_never_sent_back() -> None:
    got, asked = run([(0, "a"), (0, "a"), (4, "b"), (5, "end")])
    assert got == [(0, "a"), (4, "b")]
    assert asked == [0, 1, 1, 4]


def test_stop_ends_the_loop_before_a_read() -> None:
    stop = threading.Event()
    stop.set()
    assert list(follow(lambda i: (1, "x"), stop)) == []


def test_errors_of_fetch_propagate() -> None:
    def fetch(index: int) -> tuple[int, str]:
        raise ConsulUnavailable("watch p/: gone")

    with pytest.raises(ConsulUnavailable):
        next(follow(fetch, threading.Event()))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_lets_two_through_then_paces() -> None:
    clock = Clock()
    limit = RateLimit(interval_s=1.0, burst=2, clock=clock, rand=lambda: 0.0)
    assert [limit.take(), limit.take()] == [0.0, 0.0]
    assert limit.take() == pytest.approx(1.0)
    clock.now += 5  # quiet for a while: the bucket is full again, not fuller
    assert [limit.take(), limit.take()] == [0.0, 0.0]
    assert limit.take() == pytest.approx(1.0)


def test_rate_limit_jitter_is_at_most_half_an_interval() -> None:
    limit = RateLimit(interval_s=1.0, burst=1, clock=Clock(), rand=lambda: 0.999)
    assert limit.take() == 0.0
    assert 1.0 < limit.take() < 1.5


def test_follow_waits_on_stop_when_limited_and_ends_if_stopped() -> None:
    waits: list[float] = []

    class Stopper:
        def is_set(self) -> bool:
            return False

        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0)
            return len(waits) > 1

    n = iter(range(1, 100))
    got = list(follow(lambda i: (next(n), i), Stopper(), RateLimit(1.0, burst=2, clock=Clock(), rand=lambda: 0)))
    assert len(got) == 3 and waits == [pytest.approx(1.0), pytest.approx(2.0)]


# --- typed values --------------------------------------------------------------------------


def health_entry(sid: str, address: str = "", port: Any = 80, node_addr: str = "10.0.0.9",
                 statuses: tuple[str, ...] = ("passing",)) -> dict[str, Any]:
    return {"Node": {"Node": "n1", "Address": node_addr, "Datacenter": "dc1"},
            "Service": {"ID": sid, "Service": "web", "Tags": ["v1"], "Address": address, "Meta": None, "Port": port},
            "Checks": [{"CheckID": f"c{i}", "Name": "", "Status": s} for i, s in enumerate(statuses)]}


def test_health_types_instances_and_skips_unusable_ones() -> None:
    h = parse_health("web", [health_entry("a", "10.0.0.1"), health_entry("b"), health_entry("c", "web.local"),
                             health_entry("d", port=99999), health_entry("e", statuses=("passing", "warning")),
                             health_entry("f", statuses=("maintenance",))])
    by_id = {i.service_id: i for i in h.instances}
    assert by_id["a"].address == ipaddress.ip_address("10.0.0.1") and by_id["a"].port == 80
    assert by_id["b"].address == ipaddress.ip_address("10.0.0.9")  # no service address: the node's
    assert by_id["a"].tags == ("v1",) and by_id["a"].datacenter == "dc1" and by_id["a"].status == "passing"
    assert by_id["e"].status == "warning" and by_id["f"].status == "critical"
    assert {(s.service_id, s.reason) for s in h.skipped} == {
        ("c", "address 'web.local' is not an IP address"), ("d", "port 99999 is not in 0-65535")}


@pytest.mark.parametrize("body", [{"Node": {}}, [{"Node": {"Node": 1}, "Service": {"ID": "x"}}], "x"])
def test_health_of_the_wrong_shape_raises(body: Any) -> None:
    with pytest.raises((KeyError, TypeError)):
        parse_health("web", body)


def test_catalog_services_are_typed() -> None:
    assert parse_catalog_services({"web": ["b", "a"], "consul": []}) == {"web": {"a", "b"}, "consul": set()}
    with pytest.raises(TypeError):
        parse_catalog_services({"web": [1]})


def test_health_endpoint_asks_for_passing_only_by_default() -> None:
    assert Endpoint.health_service("web").params == (("passing", "1"),)
    assert Endpoint.health_service("web", passing=False).params == ()


def test_kv_ops_as_consul_takes_them() -> None:
    assert KVOp.cas("k", "v", 0).to_json() == {"KV": {"Verb": "cas", "Key": "k", "Index": 0, "Value": "dg=="}}
    assert KVOp.delete("k").to_json() == {"KV": {"Verb": "delete", "Key": "k"}}
    assert KVOp.set("k", b"\x00").to_json() == {"KV": {"Verb": "set", "Key": "k", "Value": "AA=="}}


# --- callers branch on the reason, never on the text -----------------------------------------


class SessionStore:
    """A store whose session_create refuses a short TTL once, with the given error."""

    def __init__(self, refusal: ConsulError) -> None:
        self.refusal, self.ttls = refusal, []  # type: ConsulError, list[int]

    def get(self, key: str) -> None:
        return None

    def session_create(self, name: str, ttl_s: int, behavior: str = "delete", node: str | None = None) -> str:
        self.ttls.append(ttl_s)
        if len(self.ttls) == 1:
            raise self.refusal
        return "0123456789abcdef"


@pytest.fixture
def registration(tmp_path: Path) -> Iterator[Any]:
    from wiremesh.agent.metrics import AgentMetrics
    from wiremesh.agent.registration import Registration

    def make(store: SessionStore) -> Registration:
        cfg = SimpleNamespace(cluster="lab", node="n1", session_ttl=10, state_dir=tmp_path, consul=ConsulOptions())
        return Registration(store, cfg, lambda: None, AgentMetrics(), threading.Event())  # type: ignore[arg-type]

    yield make


def test_registration_falls_back_to_consuls_minimum_ttl_on_a_session_ttl_refusal(registration: Any) -> None:
    store = SessionStore(ConsulError("create session: whatever words", 500, R.SESSION_TTL))
    reg = registration(store)
    assert reg.ensure_session() == "0123456789abcdef"
    assert store.ttls == [5, 10] and reg.consul_ttl == 10


def test_registration_does_not_read_the_message(registration: Any) -> None:
    store = SessionStore(ConsulError("create session: Invalid Session TTL", 500, R.BAD_REQUEST))
    with pytest.raises(ConsulError):
        registration(store).ensure_session()
    assert store.ttls == [5]


class AclStore:
    """ACL calls of a Consul without ACLs."""

    def acl_policy_list(self) -> list[Any]:
        raise consul_error("list ACL policies", Reply(401, "ACL support disabled"))


def test_acl_disabled_is_told_by_the_reason() -> None:
    from wiremesh.clustermesh.acl import ensure_agent_token

    with pytest.raises(ConsulError) as ei:
        ensure_agent_token(AclStore(), "lab", "n1")  # type: ignore[arg-type]
    assert ei.value.reason is R.ACL_DISABLED and "ACLs are not enabled" in str(ei.value)
