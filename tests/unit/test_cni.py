"""cni.plugin: the CNI protocol (commands, config, environment, error codes) without the kernel.

Every function of tunnels.pods is replaced: ADD is driven only as far as its error paths, and DEL
and CHECK run against a fake pod interface, so no test needs root or touches netlink.
"""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path
from typing import Any

import pytest

import wiremesh.tunnels
from wiremesh.cni.plugin import (
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_CONFIG,
    INVALID_ENV,
    IO_FAILURE,
    SUPPORTED,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    UNSUPPORTED_FIELD,
    CniError,
    main,
    parse_config,
    parse_env,
    run,
)
from wiremesh.tunnels.podstate import Attachment, CniState
from wiremesh.tunnels import TunnelError

CID = "c0ffee1234"
NODE_STATE = {"pod_cidr": "10.240.1.0/24", "pod_mtu": 1420}


class Pods:
    """Stands in for tunnels.pods: records calls; anything not set up explicitly fails the test."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.problems: list[str] = []
        self.error: TunnelError | None = None  # raised by every call when set
        self.add_error: TunnelError | None = None  # what add_pod_interface raises (else the test fails)

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if self.error is not None:
            raise self.error

    def del_pod_interface(self, container_id: str, ifname: str) -> bool:
        self._call("del", container_id, ifname)
        return False  # already gone

    def check_pod_interface(self, netns: str, container_id: str, ifname: str, address: str, gateway: str) -> list[str]:
        self._call("check", netns, container_id, ifname, address, gateway)
        return list(self.problems)

    def add_pod_interface(self, *args: Any) -> Any:
        self._call("add", *args)
        if self.add_error is not None:
            raise self.add_error
        raise AssertionError("a unit test reached ADD's kernel path")

    def set_pod_mtu(self, *args: Any) -> bool:
        raise AssertionError("set_pod_mtu called from the CNI plugin")


def patch_pods(monkeypatch: pytest.MonkeyPatch) -> Pods:
    # The plugin imports these inside its functions, from the tunnels face: patch the face's attributes.
    p = Pods()
    for name in ("del_pod_interface", "check_pod_interface", "add_pod_interface", "set_pod_mtu"):
        monkeypatch.setattr(wiremesh.tunnels, name, getattr(p, name))
    return p


@pytest.fixture(autouse=True)
def pods(monkeypatch: pytest.MonkeyPatch) -> Pods:
    return patch_pods(monkeypatch)


def conf(state_dir: Path, **kw: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"cniVersion": "1.0.0", "name": "wiremesh", "type": "wiremesh-cni", "stateDir": str(state_dir)}
    c.update(kw)
    return c


def env(command: str, netns: Path | str | None, **kw: str) -> dict[str, str]:
    e = {"CNI_COMMAND": command, "CNI_CONTAINERID": CID, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
    if netns is not None:
        e["CNI_NETNS"] = str(netns)
    e.update(kw)
    return e


def write_node_state(state_dir: Path) -> None:
    (state_dir / "state.json").write_text(json.dumps(NODE_STATE))


def fake_netns(tmp_path: Path) -> Path:
    """A path that exists where the plugin only checks for existence (a real netns needs root)."""
    p = tmp_path / "netns-pod1"
    p.touch()
    return p


def assert_error(result: tuple[int, dict[str, Any] | None], code: int, version: str = "1.0.0") -> dict[str, Any]:
    rc, out = result
    assert rc != 0
    assert out is not None
    assert {"cniVersion", "code", "msg"} <= set(out)
    assert (out["cniVersion"], out["code"]) == (version, code), out
    assert isinstance(out["msg"], str) and out["msg"]
    return out


# --- VERSION and the command -------------------------------------------------------------------


@pytest.mark.parametrize("stdin", ["", '{"cniVersion": "1.0.0"}'])
def test_version(stdin: str) -> None:
    rc, out = run({"CNI_COMMAND": "VERSION"}, stdin)
    assert rc == 0
    assert out is not None
    assert out["cniVersion"] == "1.1.0"
    assert {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} == set(out["supportedVersions"]) == set(SUPPORTED)


@pytest.mark.parametrize("command", ["", "add", "gc", "status", "UPGRADE", "INIT", "FINALIZE"])
def test_unknown_command_is_invalid_env(tmp_path: Path, command: str) -> None:
    e = env(command, tmp_path)
    assert_error(run(e, json.dumps(conf(tmp_path))), INVALID_ENV)


def test_missing_command_is_invalid_env(tmp_path: Path) -> None:
    e = env("ADD", tmp_path)
    del e["CNI_COMMAND"]
    assert_error(run(e, json.dumps(conf(tmp_path))), INVALID_ENV)


# --- network config ----------------------------------------------------------------------------


@pytest.mark.parametrize("stdin", ["", "not json", "{", "[1, 2]", '"wiremesh"', "null"])
def test_undecodable_config(tmp_path: Path, stdin: str) -> None:
    assert_error(run(env("ADD", tmp_path), stdin), DECODE_FAILURE)


@pytest.mark.parametrize("field", ["cniVersion", "name", "type"])
@pytest.mark.parametrize("bad", [None, "", 1])
def test_required_fields(tmp_path: Path, field: str, bad: Any) -> None:
    c = conf(tmp_path)
    if bad is None:
        del c[field]
    else:
        c[field] = bad
    out = assert_error(run(env("ADD", tmp_path), json.dumps(c)), INVALID_CONFIG)
    assert field in out["msg"]


@pytest.mark.parametrize("version", ["9.9.9", "0.2.0", "0.1.0", "1.2.0", "1.0"])
def test_unsupported_cni_version(tmp_path: Path, version: str) -> None:
    out = assert_error(run(env("ADD", tmp_path), json.dumps(conf(tmp_path, cniVersion=version))), INCOMPATIBLE_VERSION)
    assert version in out["msg"]


@pytest.mark.parametrize("field", ["ipam", "bridge", "isGateway"])
def test_unknown_field_is_unsupported(tmp_path: Path, field: str) -> None:
    c = conf(tmp_path, **{field: {"type": "host-local"}})
    out = assert_error(run(env("ADD", tmp_path), json.dumps(c)), UNSUPPORTED_FIELD)
    assert field in out["msg"]


@pytest.mark.parametrize("mtu", [0, 575, 9001, -1, "1400", 1400.0, True, None])
def test_bad_mtu(tmp_path: Path, mtu: Any) -> None:
    assert_error(run(env("ADD", tmp_path), json.dumps(conf(tmp_path, mtu=mtu))), INVALID_CONFIG)


@pytest.mark.parametrize("state_dir", ["relative/dir", "", 7])
def test_state_dir_must_be_absolute(tmp_path: Path, state_dir: Any) -> None:
    assert_error(run(env("ADD", tmp_path), json.dumps(conf(tmp_path, stateDir=state_dir))), INVALID_CONFIG)


@pytest.mark.parametrize("name", ["-wiremesh", "wire mesh", "wire/mesh", ".hidden"])
def test_bad_network_name(tmp_path: Path, name: str) -> None:
    assert_error(run(env("ADD", tmp_path), json.dumps(conf(tmp_path, name=name))), INVALID_CONFIG)


def test_parse_config_accepts_spec_fields(tmp_path: Path) -> None:
    c = conf(tmp_path, cniVersion="0.4.0", mtu=1400, args={"cni": {}}, capabilities={"portMappings": True},
             runtimeConfig={}, dns={"nameservers": ["10.96.0.10"]}, disableCheck=False)
    assert parse_config(json.dumps(c)) == c


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_parse_config_accepts_1_1_fields(tmp_path: Path, version: str) -> None:
    c = conf(tmp_path, cniVersion=version, cniVersions=["1.0.0", "1.1.0"], disableGC=False,
             **{"cni.dev/valid-attachments": [], "cni.dev/attachments": []})
    assert parse_config(json.dumps(c)) == c


@pytest.mark.parametrize("mtu", [576, 1370, 9000])
def test_parse_config_mtu_range(tmp_path: Path, mtu: int) -> None:
    assert parse_config(json.dumps(conf(tmp_path, mtu=mtu)))["mtu"] == mtu


# --- environment -------------------------------------------------------------------------------


@pytest.mark.parametrize("command, missing", [
    ("ADD", "CNI_CONTAINERID"), ("ADD", "CNI_IFNAME"), ("ADD", "CNI_NETNS"), ("ADD", "CNI_PATH"),
    ("DEL", "CNI_CONTAINERID"), ("DEL", "CNI_IFNAME"), ("DEL", "CNI_PATH"),
    ("CHECK", "CNI_CONTAINERID"), ("CHECK", "CNI_IFNAME"), ("CHECK", "CNI_NETNS"), ("CHECK", "CNI_PATH"),
])
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_missing_env(tmp_path: Path, command: str, missing: str, how: str) -> None:
    e = env(command, tmp_path)
    if how == "absent":
        del e[missing]
    else:
        e[missing] = ""
    c = conf(tmp_path, prevResult={"cniVersion": "1.0.0", "ips": []})
    out = assert_error(run(e, json.dumps(c)), INVALID_ENV)
    assert missing in out["msg"]


@pytest.mark.parametrize("cid", ["a/b", "../etc", "-abc", "abc def", "abc;rm", ".abc"])
def test_invalid_container_id(tmp_path: Path, cid: str) -> None:
    out = assert_error(run(env("ADD", tmp_path, CNI_CONTAINERID=cid), json.dumps(conf(tmp_path))), INVALID_ENV)
    assert "CNI_CONTAINERID" in out["msg"]


@pytest.mark.parametrize("ifname", ["eth0123456789012", "a" * 16, "eth/0", "eth:0", "eth 0", ".", ".."])
@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_invalid_ifname(tmp_path: Path, ifname: str, command: str) -> None:
    out = assert_error(run(env(command, tmp_path, CNI_IFNAME=ifname), json.dumps(conf(tmp_path))), INVALID_ENV)
    assert "CNI_IFNAME" in out["msg"]


def test_fifteen_character_ifname_is_fine() -> None:
    e = parse_env({"CNI_CONTAINERID": CID, "CNI_IFNAME": "e" * 15, "CNI_PATH": "/opt/cni/bin"}, "DEL")
    assert e["CNI_IFNAME"] == "e" * 15


def test_parse_env_keeps_only_what_the_command_needs() -> None:
    e = parse_env({"CNI_CONTAINERID": CID, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": "X=1",
                   "HOME": "/root"}, "DEL")
    assert e == {"CNI_CONTAINERID": CID, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}


@pytest.mark.parametrize("version", ["0.4.0", "1.1.0"])
def test_error_echoes_the_config_version(tmp_path: Path, version: str) -> None:
    e = env("ADD", tmp_path)
    del e["CNI_IFNAME"]
    assert_error(run(e, json.dumps(conf(tmp_path, cniVersion=version))), INVALID_ENV, version=version)


def test_cni_error_carries_code_and_details() -> None:
    with pytest.raises(CniError) as exc:
        parse_config(json.dumps({"cniVersion": "9.9.9", "name": "n", "type": "t"}))
    assert exc.value.code == INCOMPATIBLE_VERSION
    assert "1.0.0" in exc.value.details


# --- ADD (error paths only) --------------------------------------------------------------------


def test_add_before_the_agent_leased_a_cidr_is_try_again_later(tmp_path: Path, pods: Pods) -> None:
    out = assert_error(run(env("ADD", fake_netns(tmp_path)), json.dumps(conf(tmp_path))), TRY_AGAIN_LATER)
    assert "state.json" in out["msg"]
    assert pods.calls == []


def test_add_with_unreadable_node_state_is_try_again_later(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    out = assert_error(run(env("ADD", fake_netns(tmp_path)), json.dumps(conf(tmp_path))), TRY_AGAIN_LATER)
    assert "state.json is not JSON" in out["msg"]


def test_add_into_a_missing_netns_is_unknown_container(tmp_path: Path, pods: Pods) -> None:
    write_node_state(tmp_path)
    missing = tmp_path / "no-such-netns"
    out = assert_error(run(env("ADD", missing), json.dumps(conf(tmp_path))), UNKNOWN_CONTAINER)
    assert str(missing) in out["msg"]
    assert pods.calls == []
    assert CniState(tmp_path).attachments() == []


def test_failed_add_gives_the_address_back(tmp_path: Path, pods: Pods) -> None:
    write_node_state(tmp_path)
    pods.add_error = TunnelError("create veth: Operation not permitted", errno.EPERM)
    out = assert_error(run(env("ADD", fake_netns(tmp_path)), json.dumps(conf(tmp_path))), INTERNAL)
    assert "Operation not permitted" in out["msg"]
    (add,) = [c for c in pods.calls if c[0] == "add"]
    assert add[1:] == (str(tmp_path / "netns-pod1"), CID, "eth0", "10.240.1.2/32", "10.240.1.1", 1420)
    assert ("del", CID, "eth0") in pods.calls  # cleaned up
    state = CniState(tmp_path)
    assert state.attachments() == [] and state.load(CID, "eth0") is None
    assert [p.name for p in state.ipam.iterdir() if p.name != "last"] == []


def test_add_uses_the_config_mtu_over_the_node_mtu(tmp_path: Path, pods: Pods) -> None:
    write_node_state(tmp_path)
    pods.add_error = TunnelError("create veth: File exists", errno.EEXIST)
    assert_error(run(env("ADD", fake_netns(tmp_path)), json.dumps(conf(tmp_path, mtu=1300))), INTERNAL)
    (add,) = [c for c in pods.calls if c[0] == "add"]
    assert add[-1] == 1300


# --- DEL ---------------------------------------------------------------------------------------


def test_del_of_unknown_container_succeeds_silently(tmp_path: Path, pods: Pods) -> None:
    assert run(env("DEL", None), json.dumps(conf(tmp_path))) == (0, None)
    assert pods.calls == [("del", CID, "eth0")]


def test_del_with_a_netns_that_is_gone_succeeds(tmp_path: Path) -> None:
    assert run(env("DEL", tmp_path / "gone"), json.dumps(conf(tmp_path))) == (0, None)


def test_del_twice_succeeds(tmp_path: Path) -> None:
    for _ in range(2):
        assert run(env("DEL", None), json.dumps(conf(tmp_path))) == (0, None)


def test_del_releases_the_lease_and_forgets_the_attachment(tmp_path: Path) -> None:
    state = CniState(tmp_path)
    with state.locked():
        ip = state.allocate("10.240.1.0/24", CID, "eth0")
        state.save(Attachment(CID, "eth0", "/var/run/netns/p", f"{ip}/32", "10.240.1.1", "wmp0"))
        other = state.allocate("10.240.1.0/24", "other", "eth0")

    assert run(env("DEL", None), json.dumps(conf(tmp_path))) == (0, None)

    assert state.load(CID, "eth0") is None
    assert not (state.ipam / ip).exists()
    assert (state.ipam / other).read_text() == "other/eth0"  # someone else's lease is kept


def test_del_kernel_failure_is_a_cni_error(tmp_path: Path, pods: Pods) -> None:
    pods.error = TunnelError("delete wmp0: Operation not permitted", errno.EPERM)
    out = assert_error(run(env("DEL", None), json.dumps(conf(tmp_path))), INTERNAL)
    assert "Operation not permitted" in out["msg"]


# --- CHECK -------------------------------------------------------------------------------------


def _attach(state_dir: Path, netns: Path) -> Attachment:
    state = CniState(state_dir)
    with state.locked():
        ip = state.allocate("10.240.1.0/24", CID, "eth0")
        a = Attachment(CID, "eth0", str(netns), f"{ip}/32", "10.240.1.1", "wmp0")
        state.save(a)
    return a


def _prev(address: str) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "ips": [{"address": address, "gateway": "10.240.1.1", "interface": 1}]}


def test_check_without_prev_result_is_invalid_config(tmp_path: Path, pods: Pods) -> None:
    out = assert_error(run(env("CHECK", fake_netns(tmp_path)), json.dumps(conf(tmp_path))), INVALID_CONFIG)
    assert "prevResult" in out["msg"]
    assert pods.calls == []


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_needs_cni_0_4_0(tmp_path: Path, version: str) -> None:
    c = conf(tmp_path, cniVersion=version, prevResult=_prev("10.240.1.2/32"))
    assert_error(run(env("CHECK", fake_netns(tmp_path)), json.dumps(c)), INCOMPATIBLE_VERSION, version=version)


def test_check_of_missing_netns_is_unknown_container(tmp_path: Path) -> None:
    c = conf(tmp_path, prevResult=_prev("10.240.1.2/32"))
    assert_error(run(env("CHECK", tmp_path / "gone"), json.dumps(c)), UNKNOWN_CONTAINER)


def test_check_of_unknown_attachment_is_unknown_container(tmp_path: Path) -> None:
    c = conf(tmp_path, prevResult=_prev("10.240.1.2/32"))
    assert_error(run(env("CHECK", fake_netns(tmp_path)), json.dumps(c)), UNKNOWN_CONTAINER)


def test_check_of_a_healthy_attachment(tmp_path: Path, pods: Pods) -> None:
    netns = fake_netns(tmp_path)
    a = _attach(tmp_path, netns)
    c = conf(tmp_path, cniVersion="0.4.0", prevResult=_prev(a.address))
    assert run(env("CHECK", netns), json.dumps(c)) == (0, None)
    assert pods.calls == [("check", str(netns), CID, "eth0", a.address, "10.240.1.1")]


def test_check_reports_problems(tmp_path: Path, pods: Pods) -> None:
    netns = fake_netns(tmp_path)
    a = _attach(tmp_path, netns)
    pods.problems = ["eth0 is down", "node-side veth wmp0 is missing"]
    out = assert_error(run(env("CHECK", netns), json.dumps(conf(tmp_path, prevResult=_prev(a.address)))), INTERNAL)
    assert "eth0 is down" in out["msg"] and "wmp0 is missing" in out["msg"]


def test_check_with_prev_result_of_another_address(tmp_path: Path, pods: Pods) -> None:
    netns = fake_netns(tmp_path)
    _attach(tmp_path, netns)
    out = assert_error(run(env("CHECK", netns), json.dumps(conf(tmp_path, prevResult=_prev("10.240.1.99/32")))),
                       INTERNAL)
    assert "prevResult" in out["msg"]
    assert pods.calls == []


def test_check_kernel_failure_is_a_cni_error(tmp_path: Path, pods: Pods) -> None:
    netns = fake_netns(tmp_path)
    a = _attach(tmp_path, netns)
    pods.error = TunnelError(f"network namespace {netns}: Invalid argument", errno.EINVAL)
    assert_error(run(env("CHECK", netns), json.dumps(conf(tmp_path, prevResult=_prev(a.address)))), INTERNAL)


# --- I/O and main() ----------------------------------------------------------------------------


def test_state_dir_that_is_a_file_is_an_io_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_error(run(env("DEL", None), json.dumps(conf(blocker))), IO_FAILURE)


def test_main_version_ignores_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CNI_COMMAND", "VERSION")
    monkeypatch.setattr("sys.stdin", io.StringIO("not json"))
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert "1.0.0" in out["supportedVersions"] and "1.1.0" in out["supportedVersions"]


def test_main_error_is_json_on_stdout_and_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CNI_COMMAND", "ADD")
    monkeypatch.setattr("sys.stdin", io.StringIO("not json"))
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    out = json.loads(capsys.readouterr().out)
    assert out["code"] == DECODE_FAILURE and out["cniVersion"] == "1.0.0" and out["msg"]


def test_main_del_prints_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in env("DEL", None).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(conf(tmp_path))))
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    assert capsys.readouterr().out == ""
