"""tunnels.peer_changes: the smallest set of peer changes from actual (by key) to desired (by node)."""

from __future__ import annotations

from wiremesh.keys import PrivateKey
from wiremesh.tunnels import PeerChange, PeerConfig, PeerStatus, as_status, peer_changes


def _key(seed: int) -> str:
    return PrivateKey(bytes([seed]) * 32).public_key().base64


A, B, C, D = _key(1), _key(2), _key(3), _key(4)
NA, NB, NC = "lab/a", "lab/b", "lab/c"  # the nodes holding A, B and C


def want(key: str, endpoint: str | None = "192.0.2.1:51820", ips: set[str] | None = None, keepalive: int = 0) -> PeerConfig:
    return PeerConfig(public_key=key, endpoint=endpoint, allowed_ips=frozenset(ips or {"10.240.1.0/24"}),
                      persistent_keepalive=keepalive)


def have(key: str, endpoint: str | None = "192.0.2.1:51820", ips: set[str] | None = None, keepalive: int = 0) -> PeerStatus:
    return PeerStatus(public_key=key, endpoint=endpoint, allowed_ips=frozenset(ips or {"10.240.1.0/24"}),
                      persistent_keepalive=keepalive, latest_handshake=1700000000.0, rx_bytes=10, tx_bytes=20)


def test_new_peer_added_with_everything() -> None:
    changes = peer_changes({}, {NA: want(A, ips={"10.240.1.0/24", "fd00:1::/64"}, keepalive=25)}, prune=False)
    assert changes == [PeerChange(public_key=A, endpoint="192.0.2.1:51820",
                                  allowed_ips=frozenset({"10.240.1.0/24", "fd00:1::/64"}),
                                  persistent_keepalive=25, update_only=False, remove=False, replaces=None, name=NA)]


def test_new_peer_without_keepalive_does_not_send_it() -> None:
    (ch,) = peer_changes({}, {NA: want(A)}, prune=False)
    assert ch.persistent_keepalive is None
    assert ch.endpoint == "192.0.2.1:51820" and ch.allowed_ips == frozenset({"10.240.1.0/24"})


def test_unchanged_peer_needs_no_change() -> None:
    assert peer_changes({A: have(A)}, {NA: want(A)}, prune=False) == []
    assert peer_changes({A: have(A)}, {NA: want(A)}, prune=True) == []
    assert peer_changes({A: have(A)}, {NA: want(A)}, prune=True, applied={NA: want(A)}) == []


def test_endpoint_changed_in_the_record_since_applied() -> None:
    changes = peer_changes({A: have(A)}, {NA: want(A, endpoint="192.0.2.99:51820")}, prune=True,
                           applied={NA: want(A)})
    assert changes == [PeerChange(public_key=A, endpoint="192.0.2.99:51820", update_only=True, name=NA)]
    (ch,) = changes
    assert ch.allowed_ips is None and ch.persistent_keepalive is None and not ch.remove and ch.replaces is None


def test_desired_without_endpoint_keeps_the_roamed_one() -> None:
    assert peer_changes({A: have(A, endpoint="198.51.100.7:40000")}, {NA: want(A, endpoint=None)}, prune=True) == []
    assert peer_changes({A: have(A, endpoint="198.51.100.7:40000")}, {NA: want(A, endpoint=None)}, prune=True,
                        applied={NA: want(A)}) == []


def test_allowed_ips_changed_sends_only_the_replacement_set() -> None:
    changes = peer_changes({A: have(A)}, {NA: want(A, ips={"10.240.1.0/24", "10.250.0.0/16"})}, prune=False)
    assert changes == [PeerChange(public_key=A, allowed_ips=frozenset({"10.240.1.0/24", "10.250.0.0/16"}),
                                  update_only=True, name=NA)]
    assert changes[0].endpoint is None


def test_keepalive_changed_sends_only_keepalive() -> None:
    changes = peer_changes({A: have(A, keepalive=25)}, {NA: want(A, keepalive=0)}, prune=False)
    assert changes == [PeerChange(public_key=A, persistent_keepalive=0, update_only=True, name=NA)]


def test_several_fields_changed_in_one_change() -> None:
    (ch,) = peer_changes({A: have(A)}, {NA: want(A, endpoint="192.0.2.2:1", ips={"10.9.0.0/24"})}, prune=False,
                         applied={NA: want(A)})
    assert ch.update_only and ch.endpoint == "192.0.2.2:1" and ch.allowed_ips == frozenset({"10.9.0.0/24"})
    assert ch.name == NA


def test_prune_false_never_removes() -> None:
    actual = {A: have(A), B: have(B, ips={"10.240.2.0/24"}), C: have(C, ips={"10.240.3.0/24"})}
    assert peer_changes(actual, {NA: want(A)}, prune=False) == []
    assert peer_changes(actual, {}, prune=False) == []


def test_prune_true_removes_only_extras() -> None:
    actual = {A: have(A), B: have(B, ips={"10.240.2.0/24"}), C: have(C, ips={"10.240.3.0/24"})}
    changes = peer_changes(actual, {NA: want(A)}, prune=True)
    assert changes == [PeerChange(public_key=k, remove=True) for k in sorted([B, C])]


def test_removal_is_named_after_the_node_that_held_the_key() -> None:
    changes = peer_changes({A: have(A), B: have(B, ips={"10.240.2.0/24"})}, {NA: want(A)}, prune=True,
                           applied={NA: want(A), NB: want(B, ips={"10.240.2.0/24"})})
    assert changes == [PeerChange(public_key=B, remove=True, name=NB)]


def test_mixed_add_update_remove_is_deterministic() -> None:
    actual = {A: have(A), C: have(C, ips={"10.240.3.0/24"})}
    desired = {NA: want(A, endpoint="192.0.2.50:51820"), NB: want(B, ips={"10.240.2.0/24"})}
    applied = {NA: want(A), NC: want(C, ips={"10.240.3.0/24"})}
    changes = peer_changes(actual, desired, prune=True, applied=applied)
    by_key = {c.public_key: c for c in changes}
    assert by_key[A].update_only and by_key[A].endpoint == "192.0.2.50:51820"
    assert not by_key[B].update_only and by_key[B].allowed_ips == frozenset({"10.240.2.0/24"})
    assert by_key[C].remove
    assert changes == peer_changes(dict(reversed(list(actual.items()))), dict(reversed(list(desired.items()))),
                                   prune=True, applied=dict(reversed(list(applied.items()))))
    # Additions and updates first (by node), removals last.
    assert [c.remove for c in changes] == [False, False, True]
    assert [c.name for c in changes] == [NA, NB, NC]


# --- a key change: one change that replaces the old key -------------------------------------------


def test_key_change_with_memory_replaces_the_old_key() -> None:
    for prune in (False, True):
        changes = peer_changes({A: have(A)}, {NA: want(D)}, prune=prune, applied={NA: want(A)})
        assert changes == [PeerChange(public_key=D, endpoint="192.0.2.1:51820",
                                      allowed_ips=frozenset({"10.240.1.0/24"}), replaces=A, name=NA)]


def test_key_change_with_memory_carries_other_changes_too() -> None:
    changes = peer_changes({A: have(A)}, {NA: want(D, endpoint="192.0.2.9:1", ips={"10.240.1.0/24", "10.9.0.0/16"})},
                           prune=True, applied={NA: want(A)})
    assert changes == [PeerChange(public_key=D, endpoint="192.0.2.9:1",
                                  allowed_ips=frozenset({"10.240.1.0/24", "10.9.0.0/16"}), replaces=A, name=NA)]


def test_key_change_without_memory_finds_the_peer_holding_the_same_allowed_ips() -> None:
    # A restarted agent: the device still holds the node under its old key.
    actual = {A: have(A, endpoint="198.51.100.7:40000"), B: have(B, ips={"10.240.2.0/24"})}
    for prune in (False, True):
        changes = peer_changes(actual, {NA: want(D), NB: want(B, ips={"10.240.2.0/24"})}, prune=prune)
        assert changes == [PeerChange(public_key=D, endpoint="192.0.2.1:51820",
                                      allowed_ips=frozenset({"10.240.1.0/24"}), replaces=A, name=NA)]


def test_without_memory_other_allowed_ips_are_not_a_replacement() -> None:
    actual = {A: have(A, ips={"10.240.7.0/24"})}
    assert peer_changes(actual, {NA: want(D)}, prune=False) == [
        PeerChange(public_key=D, endpoint="192.0.2.1:51820", allowed_ips=frozenset({"10.240.1.0/24"}), name=NA)]
    changes = peer_changes(actual, {NA: want(D)}, prune=True)
    assert [(c.public_key, c.replaces, c.remove) for c in changes] == [(D, None, False), (A, None, True)]


def test_old_key_now_held_by_another_node_is_not_replaced() -> None:
    # a's old key A is desired for node c now: it must stay (and is c's), d is added beside it.
    actual = {A: have(A)}
    desired = {NA: want(D), NC: want(A)}
    changes = peer_changes(actual, desired, prune=True, applied={NA: want(A)})
    assert all(c.replaces is None and not c.remove for c in changes)
    assert [c.public_key for c in changes] == [D]


def test_old_key_is_claimed_only_once() -> None:
    # Two nodes with the same allowed IPs (a conflict the planner normally prevents): one stray
    # key is handed to one of them only, never removed twice.
    actual = {A: have(A)}
    changes = peer_changes(actual, {NA: want(C), NB: want(D)}, prune=True)
    assert sorted(c.replaces or "" for c in changes) == ["", A]
    assert not any(c.remove for c in changes)


def test_old_key_already_gone_is_not_replaced() -> None:
    (ch,) = peer_changes({}, {NA: want(D)}, prune=True, applied={NA: want(A)})
    assert ch.replaces is None and ch.public_key == D and not ch.update_only


# --- endpoints: written for new peers or when the record moved; roaming kept -------------------------


def test_roamed_endpoint_is_kept_while_the_record_is_unchanged() -> None:
    actual = {A: have(A, endpoint="203.0.113.7:40000")}
    assert peer_changes(actual, {NA: want(A)}, prune=True, applied={NA: want(A)}) == []


def test_record_endpoint_change_is_written_even_over_a_roamed_one() -> None:
    actual = {A: have(A, endpoint="203.0.113.7:40000")}
    changes = peer_changes(actual, {NA: want(A, endpoint="198.51.100.1:51820")}, prune=True,
                           applied={NA: want(A)})
    assert changes == [PeerChange(public_key=A, endpoint="198.51.100.1:51820", update_only=True, name=NA)]


def test_record_moved_to_where_the_peer_already_roamed_needs_no_write() -> None:
    actual = {A: have(A, endpoint="198.51.100.1:51820")}
    assert peer_changes(actual, {NA: want(A, endpoint="198.51.100.1:51820")}, prune=True,
                        applied={NA: want(A)}) == []


def test_without_memory_a_peer_with_an_endpoint_keeps_it() -> None:
    actual = {A: have(A, endpoint="203.0.113.7:40000")}
    assert peer_changes(actual, {NA: want(A)}, prune=True) == []


def test_without_memory_a_peer_without_endpoint_gets_the_records() -> None:
    actual = {A: have(A, endpoint=None)}
    assert peer_changes(actual, {NA: want(A)}, prune=True) == [
        PeerChange(public_key=A, endpoint="192.0.2.1:51820", update_only=True, name=NA)]


def test_new_peer_always_gets_the_records_endpoint() -> None:
    (ch,) = peer_changes({}, {NA: want(A)}, prune=True, applied={NA: want(A)})
    assert ch.endpoint == "192.0.2.1:51820" and not ch.update_only


# --- as_status: what the device holds, as this process last programmed it --------------------------


def test_as_status_is_by_public_key() -> None:
    applied = {NA: want(A, keepalive=25), NB: want(B, endpoint=None, ips={"10.240.2.0/24"})}
    assert as_status(applied) == {
        A: PeerStatus(public_key=A, endpoint="192.0.2.1:51820", allowed_ips=frozenset({"10.240.1.0/24"}),
                      persistent_keepalive=25),
        B: PeerStatus(public_key=B, endpoint=None, allowed_ips=frozenset({"10.240.2.0/24"})),
    }
    assert peer_changes(as_status(applied), applied, prune=True, applied=applied) == []
