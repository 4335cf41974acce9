"""The service LB's byte layouts: struct sizes as in lb.bpf.c and libbpf 1.1's headers, key and
value encoding, frontend and backend validation. No root, no kernel."""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from pathlib import Path

import pytest

from wiremesh.tunnels.bpf import Backend, Frontend, build_object, pin_dir_for
from wiremesh.tunnels.bpf import build as bpf_build
from wiremesh.tunnels.bpf.errors import BpfMapError, BpfMapFull, BpfUnavailable
from wiremesh.tunnels.bpf.libbpf import MapBatchOpts, ObjectOpenOpts, error_for
from wiremesh.tunnels.bpf.model import (
    BACKEND_VALUE,
    REVNAT_KEY,
    REVNAT_VALUE,
    SERVICE_KEY,
    SERVICE_VALUE,
    decode_backend,
    decode_service_key,
    decode_service_value,
)


def test_struct_sizes_match_the_c_structs() -> None:
    # struct lb4_key, lb4_service, lb4_backend, ipv4_revnat_tuple, ipv4_revnat_entry
    assert (SERVICE_KEY.size, SERVICE_VALUE.size, BACKEND_VALUE.size) == (12, 12, 12)
    assert (REVNAT_KEY.size, REVNAT_VALUE.size) == (16, 8)


def test_libbpf_option_structs_match_libbpf_1_1() -> None:
    # offsetof/sizeof measured with clang against /usr/include/bpf/libbpf.h and bpf.h (1.1.2)
    assert ctypes.sizeof(ObjectOpenOpts) == 80
    assert ObjectOpenOpts.sz.offset == 0
    assert ObjectOpenOpts.pin_root_path.offset == 24
    assert ObjectOpenOpts.kconfig.offset == 40
    assert ObjectOpenOpts.kernel_log_level.offset == 72
    assert ctypes.sizeof(MapBatchOpts) == 24 and MapBatchOpts.sz.offset == 0


def test_service_key_is_network_order_address_and_port() -> None:
    key = Frontend("10.96.0.10", 80, "tcp").key(3)
    assert key == bytes([10, 96, 0, 10, 0, 80]) + struct.pack("=H", 3) + bytes([6, 0, 0, 0])
    assert Frontend("10.96.0.10", 53, "udp").key(0)[8] == 17
    assert decode_service_key(key) == (Frontend("10.96.0.10", 80, "tcp"), 3)


def test_service_value_holds_backend_id_or_count_and_id() -> None:
    raw = SERVICE_VALUE.pack(0, 4, 7, 0)
    assert raw == struct.pack("=IHH", 0, 4, 7) + bytes(4)
    assert decode_service_value(raw) == (0, 4, 7)


def test_backend_value_round_trip() -> None:
    b = Backend("192.0.2.7", 8443, cluster_id=2)
    raw = b.value(6)
    assert raw == bytes([192, 0, 2, 7, 0x20, 0xFB, 6, 2, 0, 0, 0, 0])
    assert decode_backend(raw) == (b, 6)
    assert decode_backend(bytes(12)) == (None, 0)


def test_undecodable_service_key() -> None:
    assert decode_service_key(SERVICE_KEY.pack(bytes(4), bytes(2), 0, 6)) == (None, 0)  # port 0
    assert decode_service_key(SERVICE_KEY.pack(bytes(4), b"\x00\x50", 0, 1)) == (None, 0)  # ICMP


def test_frontend_and_backend_validation() -> None:
    fe = Frontend("10.96.0.10", 80)
    assert fe.vip == ipaddress.IPv4Address("10.96.0.10") and fe.proto == "tcp" and str(fe) == "10.96.0.10:80/tcp"
    assert fe == Frontend(ipaddress.IPv4Address("10.96.0.10"), 80, "tcp") and hash(fe) == hash(Frontend("10.96.0.10", 80))
    for bad in [("fd00::1", 80, "tcp"), ("10.96.0.300", 80, "tcp"), ("10.96.0.10", 0, "tcp"),
                ("10.96.0.10", 65536, "tcp"), ("10.96.0.10", 80, "sctp"), ("10.96.0.10", True, "tcp")]:
        with pytest.raises(ValueError):
            Frontend(*bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cluster id"):
        Backend("10.0.0.1", 80, cluster_id=256)
    with pytest.raises(ValueError, match="IPv4"):
        Backend("::1", 80)
    assert Backend("10.0.0.1", 80, 1) != Backend("10.0.0.1", 80, 2)


def test_errno_becomes_an_error_by_cause() -> None:
    assert isinstance(error_for(1, "x"), BpfUnavailable)  # EPERM
    full = error_for(7, "update", BpfMapError)  # E2BIG
    assert isinstance(full, BpfMapFull) and full.errno == 7
    assert type(error_for(22, "update", BpfMapError)) is BpfMapError and "Invalid argument" in str(error_for(22, "x"))


def test_pin_dir_names() -> None:
    assert pin_dir_for("c1-n1") == Path("/sys/fs/bpf/wiremesh/c1-n1")
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError):
            pin_dir_for(bad)


def test_build_names_clang_when_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bpf_build, "OBJECT", tmp_path / "lb.bpf.o")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(BpfUnavailable, match="clang not found"):
        build_object(force=True)
