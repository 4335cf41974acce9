"""tunnels.podstate: host-local style address leases and attachments under the agent's state dir."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from wiremesh.tunnels import Attachment, CniState, NodeInfo
from wiremesh.tunnels.podstate import NodeStateUnavailable, NoFreeAddress

CIDR = "10.240.1.0/24"


@pytest.fixture
def state(tmp_path: Path) -> CniState:
    s = CniState(tmp_path)
    with s.locked():  # creates cni/ipam and cni/attachments, as every plugin command does
        pass
    return s


def leases(state: CniState) -> dict[str, str]:
    return {p.name: p.read_text() for p in state.ipam.iterdir() if p.name != "last"}


def attachment(cid: str = "c1", ifname: str = "eth0", address: str = "10.240.1.2/32") -> Attachment:
    return Attachment(cid, ifname, f"/var/run/netns/{cid}", address, "10.240.1.1", f"wmp-{cid}")


# --- allocate ----------------------------------------------------------------------------------


def test_allocate_gives_distinct_usable_addresses(state: CniState) -> None:
    net = ipaddress.ip_network(CIDR)
    got = [state.allocate(CIDR, f"c{i}", "eth0") for i in range(20)]
    assert len(set(got)) == 20
    reserved = {str(net.network_address), str(net.network_address + 1), str(net.broadcast_address)}
    assert not set(got) & reserved
    assert all(ipaddress.ip_address(ip) in net for ip in got)
    assert leases(state) == {ip: f"c{i}/eth0" for i, ip in enumerate(got)}


def test_small_cidr_is_used_up_exactly(state: CniState) -> None:
    # A /29 has hosts .1-.6; .1 is the node's overlay (and the pods' gateway) address.
    got = {state.allocate("10.240.1.0/29", f"c{i}", "eth0") for i in range(5)}
    assert got == {f"10.240.1.{n}" for n in range(2, 7)}
    with pytest.raises(NoFreeAddress):
        state.allocate("10.240.1.0/29", "c5", "eth0")


def test_same_attachment_gets_the_same_address(state: CniState) -> None:
    a = state.allocate(CIDR, "c1", "eth0")
    state.allocate(CIDR, "c2", "eth0")
    assert state.allocate(CIDR, "c1", "eth0") == a
    assert len(leases(state)) == 2


def test_other_interface_of_the_same_container_gets_another_address(state: CniState) -> None:
    assert state.allocate(CIDR, "c1", "eth0") != state.allocate(CIDR, "c1", "net1")


def test_release_frees_only_that_attachment(state: CniState) -> None:
    a = state.allocate(CIDR, "c1", "eth0")
    b = state.allocate(CIDR, "c2", "eth0")
    assert state.release("c1", "eth0") == [a]
    assert leases(state) == {b: "c2/eth0"}
    assert state.release("c1", "eth0") == []  # already gone is fine


def test_release_on_a_fresh_state_dir(tmp_path: Path) -> None:
    assert CniState(tmp_path / "new").release("c1", "eth0") == []


def test_released_address_is_not_reused_at_once(state: CniState) -> None:
    a = state.allocate(CIDR, "c1", "eth0")
    b = state.allocate(CIDR, "c2", "eth0")
    state.release("c1", "eth0")
    state.release("c2", "eth0")
    # A new pod does not get an address a dead pod had a moment ago (stale ARP, conntrack).
    assert state.allocate(CIDR, "c3", "eth0") not in (a, b)


def test_allocation_goes_round(state: CniState) -> None:
    got = [state.allocate("10.240.1.0/29", f"c{i}", "eth0") for i in range(5)]
    state.release("c0", "eth0")
    state.release("c2", "eth0")
    # Going on after the last address given (.6), round to the start: .2 before .4.
    assert state.allocate("10.240.1.0/29", "c5", "eth0") == got[0]
    assert state.allocate("10.240.1.0/29", "c6", "eth0") == got[2]


def test_a_lease_taken_meanwhile_is_skipped(state: CniState) -> None:
    # Another ADD holding 10.240.1.2 (an O_EXCL file) is never given out twice.
    (state.ipam / "10.240.1.2").write_text("someone/eth0")
    assert state.allocate(CIDR, "c1", "eth0") == "10.240.1.3"
    assert (state.ipam / "10.240.1.2").read_text() == "someone/eth0"


@pytest.mark.parametrize("last", ["garbage", "10.99.0.7", ""])
def test_unusable_last_starts_from_the_beginning(state: CniState, last: str) -> None:
    (state.ipam / "last").write_text(last)
    assert state.allocate(CIDR, "c1", "eth0") == "10.240.1.2"


def test_exhaustion_message_names_the_cidr(state: CniState) -> None:
    for i in range(5):
        state.allocate("10.240.1.0/29", f"c{i}", "eth0")
    with pytest.raises(NoFreeAddress, match="10.240.1.0/29"):
        state.allocate("10.240.1.0/29", "late", "eth0")


def test_leases_name_their_owner(state: CniState) -> None:
    a = state.allocate(CIDR, "c1", "eth0")
    b = state.allocate(CIDR, "c2", "net1")
    assert state.leases() == {a: "c1/eth0", b: "c2/net1"}  # "last" is not a lease
    assert CniState(state.state_dir / "new").leases() == {}


def test_free_addresses(state: CniState) -> None:
    assert state.free_addresses("10.240.1.0/29") == 5  # .2-.6
    state.allocate("10.240.1.0/29", "c1", "eth0")
    state.allocate("10.240.1.0/29", "c2", "eth0")
    (state.ipam / "10.99.0.2").write_text("old/eth0")  # a lease from a CIDR the node had before
    assert state.free_addresses("10.240.1.0/29") == 3
    for i in range(3, 6):
        state.allocate("10.240.1.0/29", f"c{i}", "eth0")
    assert state.free_addresses("10.240.1.0/29") == 0
    assert CniState(state.state_dir / "new").free_addresses(CIDR) == 253


# --- attachments -------------------------------------------------------------------------------


def test_save_load_forget_round_trip(state: CniState) -> None:
    a = attachment()
    state.save(a)
    assert state.load("c1", "eth0") == a
    assert state.load("c1", "net1") is None
    state.forget("c1", "eth0")
    assert state.load("c1", "eth0") is None
    state.forget("c1", "eth0")  # already gone is fine


def test_save_replaces(state: CniState) -> None:
    state.save(attachment(address="10.240.1.2/32"))
    state.save(attachment(address="10.240.1.9/32"))
    assert state.load("c1", "eth0") == attachment(address="10.240.1.9/32")
    assert len(state.attachments()) == 1
    assert not list(state.attachments_dir.glob("*.tmp"))


def test_attachments_lists_every_saved_one(state: CniState) -> None:
    saved = {attachment("c1"), attachment("c2", address="10.240.1.3/32"), attachment("c1", "net1", "10.240.1.4/32")}
    for a in saved:
        state.save(a)
    assert set(state.attachments()) == saved
    state.forget("c2", "eth0")
    assert set(state.attachments()) == saved - {attachment("c2", address="10.240.1.3/32")}


def test_corrupt_attachment_is_skipped(state: CniState) -> None:
    state.save(attachment("c1"))
    (state.attachments_dir / "broken.json").write_text("{")
    (state.attachments_dir / "alien.json").write_text(json.dumps({"container_id": "x"}))
    assert state.attachments() == [attachment("c1")]


def test_no_attachments_on_a_fresh_state_dir(tmp_path: Path) -> None:
    s = CniState(tmp_path / "new")
    assert s.attachments() == []
    assert s.load("c1", "eth0") is None


def test_attachment_id_is_stable_per_container_and_interface() -> None:
    a = CniState.attachment_id("c1", "eth0")
    assert a == CniState.attachment_id("c1", "eth0")
    assert a != CniState.attachment_id("c1", "eth1")
    assert a != CniState.attachment_id("c2", "eth0")
    assert len(a) == 32 and all(ch in "0123456789abcdef" for ch in a)


def test_held_is_every_record_and_every_lease(state: CniState) -> None:
    state.save(attachment("c1"))  # a record and a lease
    state.allocate(CIDR, "c1", "eth0")
    state.save(attachment("c2", address="10.240.1.3/32"))  # a record alone
    state.allocate(CIDR, "c3", "net1")  # a lease alone
    (state.ipam / "10.240.1.50").write_text("garbage")  # neither
    (state.ipam / "10.240.1.51").write_text("/eth0")
    (state.attachments_dir / "broken.json").write_text("{")
    assert state.held() == {("c1", "eth0"), ("c2", "eth0"), ("c3", "net1")}


def test_locked_creates_private_dirs(tmp_path: Path) -> None:
    s = CniState(tmp_path / "state")
    with s.locked():
        assert s.ipam.is_dir() and s.attachments_dir.is_dir()
    assert (s.ipam.stat().st_mode & 0o777) == 0o700
    assert (s.dir / "lock").exists()


# --- node_info ---------------------------------------------------------------------------------


def test_node_info_reads_state_json(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"pod_cidr": CIDR, "pod_mtu": 1370, "config": {}}))
    assert CniState(tmp_path).node_info() == NodeInfo(CIDR, "10.240.1.1", 1370)


def test_node_info_without_pod_mtu(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"pod_cidr": CIDR, "pod_mtu": None}))
    assert CniState(tmp_path).node_info() == NodeInfo(CIDR, "10.240.1.1", None)


def test_node_info_without_state_json(tmp_path: Path) -> None:
    assert CniState(tmp_path).node_info() is None


@pytest.mark.parametrize("content", ["", "{", "[]", '{"pod_cidr": null}', '{"pod_cidr": "nonsense"}',
                                     '{"pod_mtu": 1420}', '{"pod_cidr": "10.240.1.0/24", "pod_mtu": "big"}'])
def test_node_info_of_unusable_state_json(tmp_path: Path, content: str) -> None:
    (tmp_path / "state.json").write_text(content)
    assert CniState(tmp_path).node_info() is None


@pytest.mark.parametrize("content, why", [
    ("{", "is not JSON"),
    ("[]", "is not a JSON object"),
    ('{"pod_cidr": 10}', "has no pod_cidr"),
    ('{"pod_cidr": "10.240.1.1/24"}', "pod_cidr '10.240.1.1/24' is not a network CIDR"),
    ('{"pod_cidr": "10.240.1.0/24", "pod_mtu": {}}', "is not a positive integer"),
])
def test_read_node_info_says_why(tmp_path: Path, content: str, why: str) -> None:
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(NodeStateUnavailable, match=f"^{tmp_path}/state.json.*{why}"):
        CniState(tmp_path).read_node_info()


def test_read_node_info_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NodeStateUnavailable, match="state.json does not exist"):
        CniState(tmp_path).read_node_info()
