"""Unit-test fixtures: no root, no network, no Consul, no kernel."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from wiremesh.clustermesh import ClusterConfig, NodeRecord, overlay_address
from wiremesh.keys import PrivateKey

# Environment variables the product reads as defaults; a developer's shell must not leak in.
_ENV = (
    "WIREMESH_CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_CACERT",
    "CONSUL_DATACENTER",
    "WIREMESH_OUTPUT",
    "WIREMESH_AGENT_CONFIG",
    "WIREMESH_LAB",
    "NO_COLOR",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    # Signing keys a command creates by default go to a temporary directory, not ~/.config.
    monkeypatch.setenv("WIREMESH_SIGNING_KEY_DIR", str(tmp_path_factory.mktemp("signing")))


@pytest.fixture
def cluster_config() -> ClusterConfig:
    return ClusterConfig(name="lab", id=1, pod_cidr="10.240.0.0/16")


@pytest.fixture
def make_node() -> Callable[..., NodeRecord]:
    """Build a valid NodeRecord; any field may be overridden."""

    def make(name: str, pod_cidr: str, *, cluster: str = "lab", public_key: str | None = None,
             endpoint: str | None = None, **kw: object) -> NodeRecord:
        pk = public_key or PrivateKey.generate().public_key().base64
        host = pod_cidr.split(".")[2] if "." in pod_cidr else "1"
        return NodeRecord(
            name=name,
            cluster=cluster,
            endpoint=endpoint or f"192.0.2.{int(host) % 250 + 1}:51820",
            public_key=pk,
            pod_cidr=pod_cidr,
            overlay_ip=overlay_address(pod_cidr),
            **kw,  # type: ignore[arg-type]
        )

    return make
