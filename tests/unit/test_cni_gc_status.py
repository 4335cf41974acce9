"""cni.plugin: the CNI 1.1 verbs GC and STATUS, without the kernel (the tunnels face's pod functions are replaced)."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path
from typing import Any

import pytest

import wiremesh.tunnels
from wiremesh.cni.plugin import (
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    IO_FAILURE,
    NOT_AVAILABLE,
    main,
    parse_valid_attachments,
    run,
)
from wiremesh.tunnels.podstate import Attachment, CniState
from wiremesh.tunnels import TunnelError

from .test_cni import NODE_STATE, Pods, assert_error, conf, patch_pods, write_node_state

CIDR = NODE_STATE["pod_cidr"]
KEY = "cni.dev/valid-attachments"


@pytest.fixture(autouse=True)
def pods(monkeypatch: pytest.MonkeyPatch) -> Pods:
    return patch_pods(monkeypatch)


def gc_env(**kw: str) -> dict[str, str]:
    """What a runtime gives GC: no attachment parameters."""
    return {"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin", **kw}


def gc_conf(state_dir: Path, valid: Any, key: str = KEY, **kw: Any) -> str:
    return json.dumps(conf(state_dir, **{"cniVersion": "1.1.0", key: valid, **kw}))


def listed(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"containerID": cid, "ifname": ifname} for cid, ifname in pairs]


PAIRS = [("c1", "eth0"), ("c1", "net1"), ("c2", "eth0"), ("c3", "eth0")]


def attach(state_dir: Path, pairs: list[tuple[str, str]] = PAIRS) -> dict[tuple[str, str], str]:
    """Attachments as ADD leaves them (a lease and a record each); returns their addresses."""
    state = CniState(state_dir)
    out = {}
    with state.locked():
        for cid, ifname in pairs:
            ip = state.allocate(CIDR, cid, ifname)
            state.save(Attachment(cid, ifname, f"/run/netns/{cid}", f"{ip}/32", "10.240.1.1", f"wmp-{cid}-{ifname}"))
            out[(cid, ifname)] = ip
    return out


def snapshot(state_dir: Path) -> dict[str, str]:
    """Every file under cni/ with its content: what GC must leave alone."""
    d = state_dir / "cni"
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def kept(state_dir: Path) -> tuple[set[tuple[str, str]], dict[str, str]]:
    state = CniState(state_dir)
    return {(a.container_id, a.ifname) for a in state.attachments()}, state.leases()


# --- GC ----------------------------------------------------------------------------------------


def test_gc_removes_exactly_the_attachments_not_listed(tmp_path: Path, pods: Pods) -> None:
    ips = attach(tmp_path)
    valid = [("c1", "eth0"), ("c3", "eth0")]  # c1/net1: same container, another interface: not valid
    assert run(gc_env(), gc_conf(tmp_path, listed(*valid))) == (0, None)
    assert pods.calls == [("del", "c1", "net1"), ("del", "c2", "eth0")]
    records, leases = kept(tmp_path)
    assert records == set(valid)
    assert leases == {ips[p]: f"{p[0]}/{p[1]}" for p in valid}


def test_gc_is_idempotent(tmp_path: Path, pods: Pods) -> None:
    attach(tmp_path)
    stdin = gc_conf(tmp_path, listed(("c2", "eth0")))
    assert run(gc_env(), stdin) == (0, None)
    after_first, calls = snapshot(tmp_path), len(pods.calls)
    assert run(gc_env(), stdin) == (0, None)
    assert snapshot(tmp_path) == after_first
    assert len(pods.calls) == calls  # nothing left to remove


def test_gc_with_an_empty_list_removes_every_attachment(tmp_path: Path, pods: Pods) -> None:
    attach(tmp_path)
    assert run(gc_env(), gc_conf(tmp_path, [])) == (0, None)
    assert sorted(c[1:] for c in pods.calls) == sorted(PAIRS)
    assert kept(tmp_path) == (set(), {})


def test_gc_keeps_everything_when_all_are_listed(tmp_path: Path, pods: Pods) -> None:
    attach(tmp_path)
    before = snapshot(tmp_path)
    assert run(gc_env(), gc_conf(tmp_path, listed(*PAIRS, ("not-here", "eth0")))) == (0, None)
    assert snapshot(tmp_path) == before and pods.calls == []


def test_gc_removes_a_lease_without_a_record(tmp_path: Path, pods: Pods) -> None:
    # An ADD killed between leasing the address and recording the attachment.
    state = CniState(tmp_path)
    with state.locked():
        state.allocate(CIDR, "half", "eth0")
    assert run(gc_env(), gc_conf(tmp_path, [])) == (0, None)
    assert pods.calls == [("del", "half", "eth0")]
    assert state.leases() == {}


def test_gc_removes_a_record_without_a_lease(tmp_path: Path, pods: Pods) -> None:
    attach(tmp_path, [("c1", "eth0")])
    state = CniState(tmp_path)
    state.release("c1", "eth0")
    assert run(gc_env(), gc_conf(tmp_path, [])) == (0, None)
    assert pods.calls == [("del", "c1", "eth0")] and state.attachments() == []


def test_gc_leaves_files_it_cannot_read_as_an_attachment(tmp_path: Path, pods: Pods) -> None:
    attach(tmp_path, [("c1", "eth0")])
    state = CniState(tmp_path)
    (state.attachments_dir / "broken.json").write_text("{")
    (state.ipam / "10.240.1.200").write_text("no-slash-here")
    assert run(gc_env(), gc_conf(tmp_path, [])) == (0, None)
    assert pods.calls == [("del", "c1", "eth0")]
    assert (state.attachments_dir / "broken.json").read_text() == "{"
    assert (state.ipam / "10.240.1.200").read_text() == "no-slash-here"
    assert (state.ipam / "last").exists()


def test_gc_on_a_fresh_state_dir(tmp_path: Path, pods: Pods) -> None:
    assert run(gc_env(), gc_conf(tmp_path / "new", [])) == (0, None)
    assert pods.calls == []


@pytest.mark.parametrize("keys", [("cni.dev/attachments",), (KEY, "cni.dev/attachments")])
def test_gc_reads_the_name_of_the_1_1_0_spec_text(tmp_path: Path, pods: Pods, keys: tuple[str, ...]) -> None:
    # libcni sends the list under both names; the spec text at its 1.1.0 tag named only the second.
    attach(tmp_path)
    c = conf(tmp_path, cniVersion="1.1.0", **{k: listed(("c1", "eth0")) for k in keys})
    assert run(gc_env(), json.dumps(c)) == (0, None)
    assert kept(tmp_path)[0] == {("c1", "eth0")}


def test_gc_keeps_what_either_name_lists(tmp_path: Path) -> None:
    c = conf(tmp_path, cniVersion="1.1.0", **{KEY: listed(("c1", "eth0")), "cni.dev/attachments": listed(("c2", "eth0"))})
    assert parse_valid_attachments(c) == {("c1", "eth0"), ("c2", "eth0")}


def test_gc_ignores_attachment_parameters_and_extra_entry_fields(tmp_path: Path, pods: Pods) -> None:
    attach(tmp_path)
    e = gc_env(CNI_CONTAINERID="c2", CNI_IFNAME="eth0", CNI_NETNS="/run/netns/c2")
    valid = [{"containerID": cid, "ifname": ifname, "podName": "x"} for cid, ifname in PAIRS]
    assert run(e, gc_conf(tmp_path, valid)) == (0, None)
    assert pods.calls == []


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_gc_needs_cni_1_1_0(tmp_path: Path, pods: Pods, version: str) -> None:
    attach(tmp_path)
    before = snapshot(tmp_path)
    out = assert_error(run(gc_env(), gc_conf(tmp_path, [], cniVersion=version)), INCOMPATIBLE_VERSION, version)
    assert "1.1.0" in out["msg"]
    assert snapshot(tmp_path) == before and pods.calls == []


@pytest.mark.parametrize("how", ["absent", "empty"])
def test_gc_needs_cni_path(tmp_path: Path, how: str) -> None:
    e = gc_env()
    if how == "absent":
        del e["CNI_PATH"]
    else:
        e["CNI_PATH"] = ""
    out = assert_error(run(e, gc_conf(tmp_path, [])), INVALID_ENV, "1.1.0")
    assert "CNI_PATH" in out["msg"]


def test_gc_without_the_list_removes_nothing(tmp_path: Path, pods: Pods) -> None:
    attach(tmp_path)
    before = snapshot(tmp_path)
    out = assert_error(run(gc_env(), json.dumps(conf(tmp_path, cniVersion="1.1.0"))), INVALID_CONFIG, "1.1.0")
    assert KEY in out["msg"]
    assert snapshot(tmp_path) == before and pods.calls == []


@pytest.mark.parametrize("valid, field, says", [
    (None, KEY, "must be a list, not null"),
    ({}, KEY, "must be a list, not an object"),
    ("c1/eth0", KEY, "must be a list, not a string"),
    (7, KEY, "must be a list, not a number"),
    (True, KEY, "must be a list, not a boolean"),
    ([1], f"{KEY}[0]", "must be an object"),
    ([None], f"{KEY}[0]", "must be an object with containerID and ifname, not null"),
    ([["c1", "eth0"]], f"{KEY}[0]", "not a list"),
    ([{"ifname": "eth0"}], f"{KEY}[0].containerID", "is required"),
    ([{"containerID": "c1"}], f"{KEY}[0].ifname", "is required"),
    ([{"containerID": 7, "ifname": "eth0"}], f"{KEY}[0].containerID", "must be a string, not a number"),
    ([{"containerID": None, "ifname": "eth0"}], f"{KEY}[0].containerID", "must be a string, not null"),
    ([{"containerID": True, "ifname": "eth0"}], f"{KEY}[0].containerID", "must be a string, not a boolean"),
    ([{"containerID": {"id": "c1"}, "ifname": "eth0"}], f"{KEY}[0].containerID", "not an object"),
    ([{"containerID": "c1", "ifname": ["eth0"]}], f"{KEY}[0].ifname", "must be a string, not a list"),
    ([{"containerID": "c1", "ifname": 0}], f"{KEY}[0].ifname", "must be a string, not a number"),
    ([{"containerID": "", "ifname": "eth0"}], f"{KEY}[0].containerID", "is not a valid container id"),
    ([{"containerID": "../etc", "ifname": "eth0"}], f"{KEY}[0].containerID", "is not a valid container id"),
    ([{"containerID": "c1/eth0", "ifname": "eth0"}], f"{KEY}[0].containerID", "is not a valid container id"),
    ([{"containerID": "c1", "ifname": ""}], f"{KEY}[0].ifname", "is not a valid interface name"),
    ([{"containerID": "c1", "ifname": "e" * 16}], f"{KEY}[0].ifname", "is not a valid interface name"),
    ([{"containerID": "c1", "ifname": "eth/0"}], f"{KEY}[0].ifname", "is not a valid interface name"),
    ([{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": 1}], f"{KEY}[1].ifname",
     "must be a string"),
])
def test_gc_refuses_a_malformed_list_and_removes_nothing(tmp_path: Path, pods: Pods, valid: Any, field: str,
                                                         says: str) -> None:
    attach(tmp_path)
    before = snapshot(tmp_path)
    out = assert_error(run(gc_env(), gc_conf(tmp_path, valid)), INVALID_CONFIG, "1.1.0")
    assert out["msg"].startswith(f"{field} ") and says in out["msg"], out["msg"]
    assert snapshot(tmp_path) == before and pods.calls == []


def test_gc_refuses_a_malformed_list_under_the_old_name(tmp_path: Path, pods: Pods) -> None:
    attach(tmp_path)
    c = conf(tmp_path, cniVersion="1.1.0", **{KEY: listed(*PAIRS), "cni.dev/attachments": [{"containerID": 1}]})
    out = assert_error(run(gc_env(), json.dumps(c)), INVALID_CONFIG, "1.1.0")
    assert out["msg"].startswith("cni.dev/attachments[0].containerID ")
    assert pods.calls == []


def test_gc_list_nested_deeper_than_the_parser_goes_is_a_decode_failure(tmp_path: Path, pods: Pods) -> None:
    stdin = gc_conf(tmp_path, "X").replace('"X"', "[" * 100_000 + "]" * 100_000)
    assert_error(run(gc_env(), stdin), 6)
    assert pods.calls == []


def test_gc_error_quotes_only_the_start_of_a_huge_value(tmp_path: Path) -> None:
    out = assert_error(run(gc_env(), gc_conf(tmp_path, listed(("-" + "x" * 100_000, "eth0")))), INVALID_CONFIG, "1.1.0")
    assert len(out["msg"]) < 200


def test_gc_goes_on_after_a_failure_and_reports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ips = attach(tmp_path)
    tried = []

    def del_pod_interface(container_id: str, ifname: str) -> bool:
        tried.append((container_id, ifname))
        if container_id == "c1":
            raise TunnelError("wmp-c1: delete: Operation not permitted", errno.EPERM)
        return True

    monkeypatch.setattr(wiremesh.tunnels, "del_pod_interface", del_pod_interface)
    out = assert_error(run(gc_env(), gc_conf(tmp_path, listed(("c3", "eth0")))), INTERNAL, "1.1.0")
    assert tried == [("c1", "eth0"), ("c1", "net1"), ("c2", "eth0")]
    assert "removed 1 of 3" in out["msg"] and "container c1 interface eth0" in out["msg"]
    assert "Operation not permitted" in out["details"] and "c1 interface net1" in out["details"]
    # What could not be unplugged keeps its address (its route may still point at the old veth).
    records, leases = kept(tmp_path)
    assert records == {("c1", "eth0"), ("c1", "net1"), ("c3", "eth0")}
    assert set(leases) == {ips[("c1", "eth0")], ips[("c1", "net1")], ips[("c3", "eth0")]}


def test_gc_state_dir_that_is_a_file_is_an_io_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_error(run(gc_env(), gc_conf(blocker, [])), IO_FAILURE, "1.1.0")


def test_main_gc_prints_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    attach(tmp_path)
    for k, v in gc_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("sys.stdin", io.StringIO(gc_conf(tmp_path, [])))
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    assert capsys.readouterr().out == ""


# --- STATUS ------------------------------------------------------------------------------------


def status(state_dir: Path, version: str = "1.1.0") -> tuple[int, dict[str, Any] | None]:
    return run({"CNI_COMMAND": "STATUS"}, json.dumps(conf(state_dir, cniVersion=version)))


def test_status_ready_once_the_agent_wrote_its_state(tmp_path: Path, pods: Pods) -> None:
    out = assert_error(status(tmp_path), NOT_AVAILABLE, "1.1.0")
    assert f"{tmp_path}/state.json does not exist" in out["msg"]
    write_node_state(tmp_path)
    assert status(tmp_path) == (0, None)
    assert pods.calls == []


def test_status_of_a_missing_state_dir(tmp_path: Path) -> None:
    out = assert_error(status(tmp_path / "nope"), NOT_AVAILABLE, "1.1.0")
    assert f"{tmp_path}/nope/state.json does not exist" in out["msg"]
    assert not (tmp_path / "nope").exists()  # STATUS only looks


@pytest.mark.parametrize("content, why", [
    ("", "is not JSON"),
    ("{", "is not JSON"),
    ("[]", "is not a JSON object"),
    ('"10.240.1.0/24"', "is not a JSON object"),
    ('{"pod_mtu": 1420}', "has no pod_cidr"),
    ('{"pod_cidr": null}', "has no pod_cidr"),
    ('{"pod_cidr": 7}', "has no pod_cidr"),
    ('{"pod_cidr": "nonsense"}', "pod_cidr 'nonsense' is not a network CIDR"),
    ('{"pod_cidr": "10.240.1.5/24"}', "is not a network CIDR"),
    ('{"pod_cidr": "10.240.1.0/24", "pod_mtu": "big"}', "pod_mtu 'big' is not a positive integer"),
    ('{"pod_cidr": "10.240.1.0/24", "pod_mtu": [1]}', "pod_mtu '[1]' is not a positive integer"),
    ('{"pod_cidr": "fd00:1::/64"}', "IPv6"),
])
def test_status_of_an_unusable_state_file(tmp_path: Path, content: str, why: str) -> None:
    (tmp_path / "state.json").write_text(content)
    out = assert_error(status(tmp_path), NOT_AVAILABLE, "1.1.0")
    assert f"{tmp_path}/state.json" in out["msg"] and why in out["msg"], out["msg"]


def test_status_of_an_unreadable_state_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()
    out = assert_error(status(tmp_path), NOT_AVAILABLE, "1.1.0")
    assert f"{tmp_path}/state.json cannot be read" in out["msg"]


def test_status_when_every_address_is_leased(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"pod_cidr": "10.240.1.0/29"}))
    state = CniState(tmp_path)
    with state.locked():
        for i in range(5):
            state.allocate("10.240.1.0/29", f"c{i}", "eth0")
    out = assert_error(status(tmp_path), NOT_AVAILABLE, "1.1.0")
    assert "10.240.1.0/29" in out["msg"] and "leased" in out["msg"]
    state.release("c3", "eth0")
    assert status(tmp_path) == (0, None)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_status_needs_cni_1_1_0(tmp_path: Path, version: str) -> None:
    write_node_state(tmp_path)
    assert_error(status(tmp_path, version), INCOMPATIBLE_VERSION, version)


def test_status_takes_its_config_like_every_command(tmp_path: Path) -> None:
    assert_error(run({"CNI_COMMAND": "STATUS"}, "{"), 6)
    out = assert_error(run({"CNI_COMMAND": "STATUS"}, gc_conf(tmp_path, [], ipam={"type": "host-local"})), 2)
    assert "ipam" in out["msg"]
