"""The kernel WireGuard backend, where the running kernel has the module."""

from __future__ import annotations

import subprocess

import pytest

from wiremesh.tunnels import kernel_module_available, open_device

from .conftest import new_lab_name


def test_auto_picks_the_backend_the_kernel_supports() -> None:
    dev = open_device("wmk0", "auto")
    assert dev.backend == ("kernel" if kernel_module_available() else "userspace")


@pytest.mark.skipif(not kernel_module_available(),
                    reason="this kernel has no WireGuard module (/sys/module/wireguard is absent); "
                           "the netlink translation is unit-tested in tests/unit/test_kernel.py")
def test_kernel_device_in_a_namespace() -> None:
    ns = new_lab_name()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        code = (
            "from keys import PrivateKey; from tunnels import open_device, PeerChange\n"
            "d = open_device('wmk0', 'kernel'); d.create(); k = PrivateKey.generate()\n"
            "d.configure(k, 51999); p = PrivateKey.generate().public_key().base64\n"
            "d.apply([PeerChange(p, endpoint='192.0.2.1:51820', allowed_ips=frozenset({'10.9.0.0/24'}))])\n"
            "s = d.show(); assert s.public_key == k.public_key().base64 and s.listen_port == 51999\n"
            "assert s.peers[p].allowed_ips == {'10.9.0.0/24'} and s.peers[p].endpoint == '192.0.2.1:51820'\n"
            "d.apply([PeerChange(p, remove=True)]); assert not d.show().peers; d.destroy(); d.destroy()\n"
        )
        import sys

        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
