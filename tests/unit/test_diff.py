"""tunnels.peer_changes: the smallest set of peer changes from actual to desired."""

from __future__ import annotations

from wiremesh.keys import PrivateKey
from wiremesh.tunnels import PeerChange, PeerConfig, PeerStatus, peer_changes


def _key(seed: int) -> str:
    return PrivateKey(bytes([seed]) * 32).public_key().base64


A, B, C = _key(1), _key(2), _key(3)


def want(key: str, endpoint: str | None = "192.0.2.1:51820", ips: set[str] | None = None, keepalive: int = 0) -> PeerConfig:
    return PeerConfig(public_key=key, endpoint=endpoint, allowed_ips=frozenset(ips or {"10.240.1.0/24"}),
                      persistent_keepalive=keepalive)


def have(key: str, endpoint: str | None = "192.0.2.1:51820", ips: set[str] | None = None, keepalive: int = 0) -> PeerStatus:
    return PeerStatus(public_key=key, endpoint=endpoint, allowed_ips=frozenset(ips or {"10.240.1.0/24"}),
                      persistent_keepalive=keepalive, latest_handshake=1700000000.0, rx_bytes=10, tx_bytes=20)


def test_new_peer_added_with_everything() -> None:
    changes = peer_changes({}, {A: want(A, ips={"10.240.1.0/24", "fd00:1::/64"}, keepalive=25)}, prune=False)
    assert changes == [PeerChange(public_key=A, endpoint="192.0.2.1:51820",
                                  allowed_ips=frozenset({"10.240.1.0/24", "fd00:1::/64"}),
                                  persistent_keepalive=25, update_only=False, remove=False)]


def test_new_peer_without_keepalive_does_not_send_it() -> None:
    (ch,) = peer_changes({}, {A: want(A)}, prune=False)
    assert ch.persistent_keepalive is None
    assert ch.endpoint == "192.0.2.1:51820" and ch.allowed_ips == frozenset({"10.240.1.0/24"})


def test_unchanged_peer_needs_no_change() -> None:
    assert peer_changes({A: have(A)}, {A: want(A)}, prune=False) == []
    assert peer_changes({A: have(A)}, {A: want(A)}, prune=True) == []


def test_only_endpoint_changed() -> None:
    changes = peer_changes({A: have(A)}, {A: want(A, endpoint="192.0.2.99:51820")}, prune=True)
    assert changes == [PeerChange(public_key=A, endpoint="192.0.2.99:51820", update_only=True)]
    (ch,) = changes
    assert ch.allowed_ips is None and ch.persistent_keepalive is None and not ch.remove


def test_desired_without_endpoint_keeps_the_roamed_one() -> None:
    assert peer_changes({A: have(A, endpoint="198.51.100.7:40000")}, {A: want(A, endpoint=None)}, prune=True) == []


def test_allowed_ips_changed_sends_only_the_replacement_set() -> None:
    changes = peer_changes({A: have(A)}, {A: want(A, ips={"10.240.1.0/24", "10.250.0.0/16"})}, prune=False)
    assert changes == [PeerChange(public_key=A, allowed_ips=frozenset({"10.240.1.0/24", "10.250.0.0/16"}),
                                  update_only=True)]
    assert changes[0].endpoint is None


def test_keepalive_changed_sends_only_keepalive() -> None:
    changes = peer_changes({A: have(A, keepalive=25)}, {A: want(A, keepalive=0)}, prune=False)
    assert changes == [PeerChange(public_key=A, persistent_keepalive=0, update_only=True)]


def test_several_fields_changed_in_one_change() -> None:
    (ch,) = peer_changes({A: have(A)}, {A: want(A, endpoint="192.0.2.2:1", ips={"10.9.0.0/24"})}, prune=False)
    assert ch.update_only and ch.endpoint == "192.0.2.2:1" and ch.allowed_ips == frozenset({"10.9.0.0/24"})


def test_prune_false_never_removes() -> None:
    actual = {A: have(A), B: have(B), C: have(C)}
    assert peer_changes(actual, {A: want(A)}, prune=False) == []
    assert peer_changes(actual, {}, prune=False) == []


def test_prune_true_removes_only_extras() -> None:
    actual = {A: have(A), B: have(B), C: have(C)}
    changes = peer_changes(actual, {A: want(A)}, prune=True)
    assert changes == [PeerChange(public_key=k, remove=True) for k in sorted([B, C])]


def test_mixed_add_update_remove_is_deterministic() -> None:
    actual = {A: have(A), C: have(C)}
    desired = {A: want(A, endpoint="192.0.2.50:51820"), B: want(B)}
    changes = peer_changes(actual, desired, prune=True)
    by_key = {c.public_key: c for c in changes}
    assert by_key[A].update_only and by_key[A].endpoint == "192.0.2.50:51820"
    assert not by_key[B].update_only and by_key[B].allowed_ips == frozenset({"10.240.1.0/24"})
    assert by_key[C].remove
    assert changes == peer_changes(dict(reversed(list(actual.items()))), dict(reversed(list(desired.items()))), prune=True)
    # Additions and updates first, removals last.
    assert [c.remove for c in changes] == [False, False, True]
