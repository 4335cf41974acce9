"""Property-based tests (hypothesis) of every parser of outside input: near-valid and random inputs.

Each property holds for whatever comes in: a valid object or the module's own error naming a
field, never another exception; no secret of the input in a message; a valid record
round-trips through to_json/from_json and keeps its unknown fields. The checks are those of the
coverage-guided fuzzer (tests/fuzz/, scripts/fuzz.py): here hypothesis makes the inputs.

Reproducible: the examples are derandomized (the same ones every run, ~15 s in all). For a
longer, random run:  HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/unit/test_fuzz_properties.py
(50 times the examples; HYPOTHESIS_SEED=N picks the seed).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import string
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extras: pip install -e .[test]")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzz import cni, files, seeds, targets  # noqa: E402
from tests.fuzz.oracles import PRIVATE_NAME, Bug, no_leak  # noqa: E402
from tests.fuzz.seeds import Deep, dumps_json  # noqa: E402
from wiremesh.clustermesh import ClusterConfig, InvalidRecord, NodeRecord, keep_unknown, layout  # noqa: E402
from wiremesh.clustermesh.consul_values import KVItem  # noqa: E402
from wiremesh.clustermesh.rotation import Rotation, RotationReady  # noqa: E402
from wiremesh.clustermesh.services import ServiceDef, ServicePort  # noqa: E402
from wiremesh.keys import PublicKey  # noqa: E402

_BASE = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("wiremesh-fuzz", derandomize=True, **_BASE)  # type: ignore[arg-type]
settings.register_profile("long", derandomize=False, **_BASE)  # type: ignore[arg-type]
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "wiremesh-fuzz")
_SCALE = 50 if PROFILE == "long" else 1


def fuzz(examples: int) -> settings:
    """This module's settings: its profile (derandomized unless HYPOTHESIS_PROFILE=long), `examples` of them."""
    return settings(settings.get_profile("long" if PROFILE == "long" else "wiremesh-fuzz"),
                    max_examples=examples * _SCALE)


@pytest.fixture(autouse=True)
def _scratch(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file-reading targets write under this test's temporary directory, nowhere else."""
    monkeypatch.setattr(files, "SCRATCH", tmp_path_factory.mktemp("fuzz"))


# --- strategies ---------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
           | st.sampled_from([v for v in seeds.ODD if not isinstance(v, (list, dict))]))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=10)
deep = st.sampled_from([2, 999, 1001, 5000]).map(Deep)  # past Python's recursion limit, or just short of it
field_names = st.sampled_from(seeds.NAMES) | st.text(max_size=16)


@st.composite
def near_valid(draw: st.DrawFn, seed: Any, key_fields: tuple[str, ...] = ()) -> Any:
    """`seed` with one change somewhere in its tree: a value of the wrong type or out of range, a
    near-miss string, a field gone, extra or leaking fields, a schema version, deep nesting."""
    doc = copy.deepcopy(seed)
    parent: Any = doc
    while True:  # walk down to the container to change
        keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
        if not keys:
            break
        k = draw(st.sampled_from(keys))
        if not isinstance(parent[k], (dict, list)) or not parent[k] or draw(st.booleans()):
            break
        parent = parent[k]
    keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
    if not keys:
        return doc
    name = draw(st.sampled_from(keys))
    op = draw(st.sampled_from(["junk", "odd", "drop", "extra", "schema", "tweak", "deep", "secret"]))
    here = parent[name]
    if op == "junk":
        parent[name] = draw(junk)
    elif op == "odd":
        parent[name] = draw(st.sampled_from(seeds.ODD))
    elif op == "drop":
        del parent[name]
    elif op == "extra" and isinstance(parent, dict):
        parent.update(draw(st.dictionaries(field_names, junk, min_size=1, max_size=3)))
    elif op == "schema" and isinstance(parent, dict):
        parent["schema"] = draw(st.sampled_from(seeds.SCHEMAS) | junk)
    elif op == "tweak" and isinstance(here, str):
        i = draw(st.integers(0, len(here)))
        parent[name] = here[:i] + draw(st.text(max_size=3)) + here[i + draw(st.integers(0, 2)):]
    elif op == "tweak" and isinstance(here, int) and not isinstance(here, bool):
        parent[name] = here + draw(st.sampled_from([-1, 1, -here - 1, 2**31, 2**53, 2**64]))
    elif op == "deep":
        parent[name] = draw(deep)
    elif op == "secret" and isinstance(parent, dict):
        target = draw(st.sampled_from([*key_fields, "private_key", "PrivateKey", "wg-privkey"]))
        parent[target] = draw(st.sampled_from([seeds.SECRET_B64, seeds.SECRET_HEX]))
    else:
        parent[name] = draw(junk)
    return doc


RECORDS = [(ClusterConfig, seeds.CLUSTER_CONFIG), (NodeRecord, seeds.NODE_RECORD), (ServiceDef, seeds.SERVICE),
           (Rotation, seeds.ROTATION), (RotationReady, seeds.READY)]
_IDS = [cls.__name__ for cls, _ in RECORDS]
_LIMIT = 16 * 1024


def _padded(size: int) -> bytes:
    """A valid NodeRecord padded with an unknown field to exactly `size` bytes."""
    base = json.dumps({**seeds.NODE_RECORD, "pad": ""})
    return base.replace('"pad": ""', '"pad": "' + "x" * (size - len(base)) + '"').encode()


raw_records = (st.binary(max_size=300) | junk.map(lambda v: json.dumps(v).encode())
               | st.integers(_LIMIT - 4, _LIMIT + 4).map(_padded) | st.binary(min_size=_LIMIT + 1, max_size=_LIMIT + 64))


# --- records ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, seed", RECORDS, ids=_IDS)
@fuzz(150)
@given(data=st.data())
def test_near_valid_record_is_a_record_or_invalid_record_naming_a_field(cls: Any, seed: dict[str, Any],
                                                                          data: st.DataObject) -> None:
    doc = data.draw(near_valid(seed, ("public_key", "next_public_key")))
    raw = dumps_json(doc)
    targets.check_record(cls, raw.encode(), doc)
    targets.check_record(cls, raw, doc)


@pytest.mark.parametrize("cls", [cls for cls, _ in RECORDS], ids=_IDS)
@fuzz(60)
@given(raw=raw_records)
def test_arbitrary_bytes_under_and_over_16_kib(cls: Any, raw: bytes) -> None:
    targets.check_record(cls, raw)
    targets.check_record(cls, raw.decode("utf-8", "surrogateescape"))


def test_the_size_limit_is_exact() -> None:
    assert NodeRecord.from_json(_padded(_LIMIT)).extra["pad"]
    with pytest.raises(InvalidRecord, match="over the 16384-byte limit") as e:
        NodeRecord.from_json(_padded(_LIMIT + 1))
    assert e.value.field == "value"


names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
public_keys = st.binary(min_size=32, max_size=32).map(lambda b: PublicKey(b).base64)
unknown = st.dictionaries(st.text(string.ascii_lowercase + "_-", min_size=1, max_size=12).filter(
    lambda n: not PRIVATE_NAME.search(n) and n != "schema"), junk, max_size=3)


@st.composite
def node_records(draw: st.DrawFn) -> NodeRecord:
    pod = ipaddress.ip_network((draw(st.integers(0, 2**24 - 1)) << 8, 24))
    ip = draw(st.ip_addresses().filter(lambda a: not (a.is_unspecified or a.is_multicast)))
    key = draw(public_keys)
    next_key = draw(st.none() | public_keys.filter(lambda k: k != key))
    return NodeRecord(
        name=draw(names), cluster=draw(names), public_key=key, pod_cidr=str(pod),
        endpoint=f"[{ip}]:{draw(st.integers(1, 65535))}" if ip.version == 6 else f"{ip}:{draw(st.integers(1, 65535))}",
        overlay_ip=str(pod.network_address + 1), key_epoch=draw(st.integers(0, 2**53)),
        vtep_mac=draw(st.sampled_from(["", "02:00:00:00:00:01"])), agent_version=draw(st.text(max_size=64)),
        next_public_key=next_key or "", switch_at=draw(st.integers(1, 2**53)) if next_key else 0,
        schema=draw(st.sampled_from(["1.0", "1.3"])), extra=draw(unknown))


@st.composite
def cluster_configs(draw: st.DrawFn) -> ClusterConfig:
    prefix = draw(st.integers(8, 28))
    pod = ipaddress.ip_network((draw(st.integers(0, 2**32 - 1)) >> (32 - prefix) << (32 - prefix), prefix))
    try:
        return ClusterConfig(
            name=draw(names), id=draw(st.integers(1, 255)), pod_cidr=str(pod),
            node_prefix_len=draw(st.integers(prefix + 1, 30)), service_cidr=draw(st.sampled_from(
                ["10.96.0.0/16", "192.168.0.0/24", "fd00:96::/112"])), routing=draw(st.sampled_from(["wireguard", "vxlan"])),
            vni=draw(st.integers(1, 2**24 - 1)), wg_port=draw(st.integers(1, 65535)),
            mtu=draw(st.sampled_from([0, 1280, 1420, 9000])), rotate_every=draw(st.sampled_from([0, 3600, 86400])),
            extra=draw(unknown))
    except InvalidRecord:  # a service CIDR that overlaps the pod CIDR: not a valid config to start from
        assume(False)
        raise


@st.composite
def services(draw: st.DrawFn) -> ServiceDef:
    ports = draw(st.lists(st.builds(ServicePort, st.integers(1, 65535), st.sampled_from(["tcp", "udp"]),
                                    st.integers(0, 65535)), min_size=1, max_size=16,
                          unique_by=lambda p: (p.port, p.protocol)))
    return ServiceDef(draw(names), draw(names), str(ipaddress.IPv4Address(draw(st.integers(1, 2**32 - 2)))),
                      tuple(ports), draw(st.sampled_from(["none", "local", "remote"])),
                      tuple(draw(st.lists(names, max_size=4, unique=True))), extra=draw(unknown))


valid_records = (node_records() | cluster_configs() | services()
                 | st.builds(Rotation, names, st.from_regex(r"[0-9a-f]{8,32}", fullmatch=True),
                             st.sampled_from(["requested", "staged", "switched", "done", "failed", "abandoned"]),
                             st.integers(0, 2**53), confirmed=st.lists(names, max_size=3).map(tuple),
                             error=st.text(max_size=500), extra=unknown)
                 | st.builds(RotationReady, public_keys, st.integers(1, 2**53), extra=unknown))


@fuzz(150)
@given(rec=valid_records)
def test_valid_records_round_trip_with_their_unknown_fields(rec: Any) -> None:
    again = type(rec).from_json(rec.to_json())
    assert again == rec
    assert again.schema == rec.schema
    assert again.to_json() == rec.to_json()  # the unknown fields too (NaN among them: compared as text)
    assert set(again.extra) == set(rec.extra)


@pytest.mark.parametrize("cls, seed", RECORDS, ids=_IDS)
@fuzz(40)
@given(extra=unknown.filter(bool))
def test_unknown_fields_are_kept_and_written_back(cls: Any, seed: dict[str, Any], extra: dict[str, Any]) -> None:
    extra = {k: v for k, v in extra.items() if k not in seed}
    rec = cls.from_json(dumps_json({**seed, **extra}))
    assert json.loads(dumps_json(dict(rec.extra))) == json.loads(dumps_json(extra))
    rebuilt = keep_unknown(cls.from_json(dumps_json(seed)), rec)
    assert set(json.loads(rebuilt.to_json())) >= set(extra)


@pytest.mark.parametrize("cls, seed", RECORDS, ids=_IDS)
@fuzz(30)
@given(name=st.builds("{}{}{}".format, st.text(max_size=4), st.sampled_from(["private_key", "PrivateKey", "privkey",
                                                                           "private-key"]), st.text(max_size=4)),
       secret=st.sampled_from([seeds.SECRET_B64, seeds.SECRET_HEX]))
def test_a_leaked_private_key_refuses_the_record_without_showing_it(cls: Any, seed: dict[str, Any], name: str,
                                                                     secret: str) -> None:
    assume(name not in seed and name != "schema")
    with pytest.raises(InvalidRecord) as e:
        cls.from_json(json.dumps({**seed, name: secret}), "k")
    assert e.value.field == name[:64]
    assert secret[:16] not in str(e.value)


# --- snapshots and Consul's answers -------------------------------------------------------------

_CP = layout.cluster_prefix("lab")
kv_keys = st.sampled_from([layout.config_key("lab"), layout.node_key("lab", "node1"), layout.node_key("lab", "node2"),
                           layout.ipam_key("lab", "10.240.1.0/24"), layout.ipam_key("lab", "10.240.2.0/24"),
                           layout.service_key("lab", "web"), layout.rotation_key("lab", "node1"),
                           _CP + "rotations/node2/ready/lab/node1", _CP + "nodes/",
                           _CP + "ipam/x_y", _CP + "other"]) | st.text(max_size=20).map(_CP.__add__)
kv_values = (near_valid(seeds.NODE_RECORD, ("public_key",)) | near_valid(seeds.CLUSTER_CONFIG) | near_valid(
    seeds.SERVICE) | near_valid(seeds.ROTATION) | st.sampled_from([seeds.NODE_RECORD, seeds.CLUSTER_CONFIG])).map(
    lambda d: dumps_json(d).encode()) | st.sampled_from([b"node1", b"node2", b"", b"\xff"]) | st.binary(max_size=64)


@fuzz(150)
@given(items=st.dictionaries(kv_keys, st.tuples(kv_values, st.integers(1, 5)), max_size=8))
def test_parse_cluster_over_random_kv_sets(items: dict[str, tuple[bytes, int]]) -> None:
    targets.check_snapshot({k: KVItem(k, v, i) for k, (v, i) in items.items()})


consul_bodies = ((near_valid(seeds.KV_ITEMS) | near_valid(seeds.HEALTH) | near_valid(seeds.CATALOG) | junk)
                 .map(lambda d: dumps_json(d).encode()) | st.binary(max_size=200))


@fuzz(200)
@given(body=consul_bodies)
def test_consul_answers_raise_only_the_shape_errors_the_store_reports(body: bytes) -> None:
    targets.check_consul(body)


# --- the UAPI reply -----------------------------------------------------------------------------

uapi_lines = st.lists(st.tuples(st.sampled_from(["private_key", "listen_port", "public_key", "preshared_key",
                                                 "endpoint", "allowed_ip", "rx_bytes", "last_handshake_time_sec",
                                                 "errno", "fwmark", "x"]),
                                st.sampled_from(["=", "", "=="]),
                                st.sampled_from([seeds.SECRET_HEX, seeds.PUB.hex, "0", "-22", "18446744073709551616",
                                                 "1e3", "١"]) | st.text(max_size=70)), max_size=12)


@fuzz(250)
@given(lines=uapi_lines, text=st.none() | st.text(max_size=200))
def test_uapi_reply_is_a_device_or_a_tunnel_error(lines: list[tuple[str, str, str]], text: str | None) -> None:
    targets.check_uapi(text if text is not None else "\n".join(k + sep + v for k, sep, v in lines) + "\n\n")


# --- agent.toml, topology and answers files -----------------------------------------------------


@fuzz(200)
@given(doc=near_valid(seeds.AGENT_TOML, ("token",)).map(files.tomlish), as_text=st.booleans())
def test_agent_toml_is_a_config_or_a_config_error_naming_a_field(doc: dict[str, Any], as_text: bool) -> None:
    files.check_config(doc, as_text=as_text)


@fuzz(60)
@given(raw=st.binary(max_size=300) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogateescape")))
def test_agent_toml_of_random_bytes(raw: bytes) -> None:
    files.check_config(raw=raw)


@fuzz(100)
@given(doc=near_valid(seeds.TOPOLOGY), as_text=st.booleans(), clusters=st.none() | st.integers(0, 11),
       nodes=st.none() | st.integers(-1, 51))
def test_topology_is_clusters_or_a_lab_error_naming_the_file(doc: Any, as_text: bool, clusters: int | None,
                                                            nodes: int | None) -> None:
    files.check_topology(doc, files.yaml_text(doc) if as_text else None, clusters, nodes)


@fuzz(100)
@given(doc=near_valid(seeds.ANSWERS, ("token",)), as_text=st.booleans())
def test_answers_are_answers_or_a_setup_error_naming_the_answer(doc: Any, as_text: bool) -> None:
    files.check_answers(doc, files.yaml_text(doc) if as_text else None)


@fuzz(60)
@given(raw=st.binary(max_size=300))
def test_topology_and_answers_files_of_random_bytes(raw: bytes) -> None:
    files.check_topology(raw=raw)
    files.check_answers(raw=raw)


# --- the CNI plugin -----------------------------------------------------------------------------

env_values = st.sampled_from(["c0ffee", "eth0", "/opt/cni/bin", "", "a/b", "..", "e" * 16, "-x"]) | st.text(max_size=20)


@fuzz(150)
@given(command=st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "add"]),
       env=st.dictionaries(st.sampled_from(["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_PATH", "CNI_ARGS"]),
                           env_values),
       conf=near_valid(seeds.CNI_CONFIG).map(lambda d: dumps_json(d).encode("utf-8", "surrogateescape"))
       | st.binary(max_size=100),
       node_state=st.sampled_from(cni.NODE_STATES), kernel_fails=st.booleans())
def test_cni_answers_a_result_or_error_json_with_the_spec_exit_code(command: str, env: dict[str, str], conf: bytes,
                                                                    node_state: str | None, kernel_fails: bool) -> None:
    netns = cni.prepare(node_state)
    env = {"CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0", "CNI_NETNS": str(netns), "CNI_PATH": "/x",
           **env, "CNI_COMMAND": command}
    cni.PODS.fail = kernel_fails
    cni.check_cni(env, conf)


# --- certificates -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["version", "cluster", "node", "identity_key", "pod_cidr", "not_before",
                                        "not_after", "serial", "signature", "unknown"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=48)
                       | st.sampled_from([seeds.PUB.base64, "10.240.1.0/24", "10.240.2.0/24", "ab" * 16, "lab"]),
                       max_size=4))
def test_certificate_is_a_certificate_or_an_error_naming_a_field(change: dict[str, Any]) -> None:
    """A near-valid certificate (fields replaced): a certificate that verifies only if unchanged, or
    the keys module's CertificateError naming a field, never the signing key in a message."""
    from tests.fuzz import certs

    certs.check_certificate({**certs.CERT.to_dict(), **change})


# --- the fuzzer's own targets, driven by hypothesis ---------------------------------------------


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
@fuzz(40)
@given(data=st.binary(max_size=400))
def test_fuzz_target_on_random_bytes(name: str, data: bytes) -> None:
    targets.TARGETS[name](data)


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_fuzz_target_seeds_pass(name: str) -> None:
    for data in targets.seed_inputs(name):
        targets.TARGETS[name](data)


def test_the_oracles_catch_a_leak() -> None:
    """The check itself: a message showing 16 characters of a secret is a bug, unless the input
    also had them in the open."""
    with pytest.raises(Bug, match="secret"):
        no_leak(f"bad value {seeds.SECRET_HEX[:20]}", [seeds.SECRET_HEX], "")
    no_leak(f"bad value {seeds.SECRET_HEX[:20]}", [seeds.SECRET_HEX], f"name = {seeds.SECRET_HEX[:20]}")
    no_leak(f"bad value {seeds.SECRET_HEX[:15]}", [seeds.SECRET_HEX], "")
