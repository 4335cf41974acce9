"""Revocation at scale in a live signed lab (issue 17, item 4): thousands of revoked serials in
chunks of their own, a node revoked with the real CLI is refused by every other agent while the
config stays small, a bad chunk is refused naming its field while the last good list stays, and
expired serials are pruned. Waiting is on real state: `wg show` in the nodes and the agents' logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wiremesh.clustermesh import MAX_RECORD_BYTES, layout, node_serials, overlay_address, revoke, update_config
from wiremesh.keys import read_signing_key
from wiremesh.clustermesh.revocation import CHUNK_ENTRIES, PRUNE_AFTER_S, chunk_key
from wiremesh.lab import Lab

from .conftest import new_lab_name
from .helpers import ping_ok, record_key, wait_until, wg_peers

C = "lab"
DECOYS = 5000


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(new_lab_name())
    try:
        lab.up(3)
        yield lab
    finally:
        lab.down()
        lab.close()


def run_cli(lab: Lab, *args: str) -> tuple[int, str]:
    p = lab.run("hub", "wiremesh", "--consul", lab.consul_address(C), *args)
    return p.returncode, p.stdout + p.stderr


def skipped(lab: Lab, node: str, key: str) -> list[str]:
    log = (Path(lab.node(node).dir) / "agent.log").read_text().splitlines()
    return [line for line in log if "skipping invalid record" in line and f"{key}:" in line]


def pod_cidr(lab: Lab, node: str) -> str:
    return str(json.loads(Path(lab.node(node).dir, "state.json").read_text())["pod_cidr"])


def revoked_items(lab: Lab) -> dict[str, bytes]:
    _, items = lab.consul(lambda s: s.list(layout.revoked_prefix(C)))
    return {k: v.value for k, v in items.items()}


def test_thousands_of_revocations_refuse_a_revoked_node_and_keep_the_config_small(lab: Lab) -> None:
    config_key = layout.config_key(C)
    original = lab.consul(lambda s: s.get(config_key))
    assert original is not None
    legacy = secrets.token_hex(16)  # a serial in the config's own list, as earlier versions wrote it
    # (signed by the cluster's key like every change of its signing settings: clustermesh.anchor)
    key = read_signing_key(lab.dir / f"signing-{C}.key")
    lab.consul(lambda s: update_config(s, C, lambda c: dataclasses.replace(c, revoked=(legacy,)), [key]))
    node3 = record_key(lab, "node3")
    try:
        decoys = [secrets.token_hex(16) for _ in range(DECOYS)]
        done = lab.consul(lambda s: revoke(s, C, decoys, not_after=int(time.time()) + 3600, sign=[key]))
        assert len(done.added) == DECOYS and done.migrated == [legacy], done
        for n in ("node1", "node2"):
            assert node3 in wg_peers(lab, n), f"{n} refused node3 before it was revoked"

        code, out = run_cli(lab, "node", "revoke", "--cluster", C, "--node", "node3", "--signing-key",
                            str(lab.dir / f"signing-{C}.key"))
        assert code == 0, out
        serials = lab.consul(lambda s: node_serials(s, C, "node3"))
        assert serials and f"revoked {serials[0]}" in out and f"({DECOYS + 2} listed)" in out, out
        for n in ("node1", "node2"):
            wait_until(lambda n=n: node3 not in wg_peers(lab, n), 30, what=f"{n} to drop revoked node3")
            assert [line.split("skipping invalid record ", 1)[1] for line in skipped(lab, n, layout.node_key(C, "node3"))] == [
                f"{layout.node_key(C, 'node3')}: certificate: serial {serials[0]} is revoked"]
        assert ping_ok(lab, "node1", overlay_address(pod_cidr(lab, "node2")))

        # The config holds no serial and stays small; every chunk is under the record limit.
        config = lab.consul(lambda s: s.get(config_key))
        assert config is not None and "revoked" not in json.loads(config.value) and len(config.value) < 1024
        chunks = revoked_items(lab)
        assert len(chunks) == math.ceil((DECOYS + 2) / CHUNK_ENTRIES)
        assert max(map(len, chunks.values())) <= MAX_RECORD_BYTES
        p = lab.run("hub", "wiremesh", "--consul", lab.consul_address(C), "-o", "json", "node", "revoked", "--cluster", C)
        assert p.returncode == 0, p.stderr
        listed = {e["serial"]: e["not_after"] for e in json.loads(p.stdout)["revoked"]}
        assert len(listed) == DECOYS + 2 and serials[0] in listed and legacy in listed

        # A chunk turned bad: refused naming the field, and node3 stays refused (the last good list).
        key = next(k for k, v in chunks.items() if serials[0] in json.loads(v)["revoked"])
        bad = json.loads(chunks[key])
        bad["revoked"][serials[0]] = "never"
        assert lab.consul(lambda s: s.put(key, json.dumps(bad)))
        for n in ("node1", "node2"):
            wait_until(lambda n=n: skipped(lab, n, key), 30, what=f"{n} to refuse the bad chunk")
            assert f"revoked.{serials[0]}: 'never'" not in skipped(lab, n, key)[0]  # the value is not echoed
            assert f"{key}: revoked.{serials[0]}: a str is not a certificate expiry" in skipped(lab, n, key)[0]
            assert node3 not in wg_peers(lab, n)
            assert len(skipped(lab, n, layout.node_key(C, "node3"))) == 1  # logged once
        assert lab.consul(lambda s: s.put(key, chunks[key]))

        # Expired serials are pruned by the CLI; the rest stays.
        expired = {secrets.token_hex(16): int(time.time()) - PRUNE_AFTER_S - 60 for _ in range(10)}
        assert lab.consul(lambda s: s.put(chunk_key(C, 63), json.dumps({"revoked": expired})))
        code, out = run_cli(lab, "node", "revoked", "--cluster", C, "--prune")
        assert code == 0 and "pruned 10 expired serial(s)" in out and f"{DECOYS + 2} revoked serial(s)" in out, out
        assert chunk_key(C, 63) not in revoked_items(lab)
    finally:
        lab.consul(lambda s: s.delete(layout.revoked_prefix(C), recurse=True))
        lab.consul(lambda s: s.put(config_key, original.value))
    for n in ("node1", "node2"):
        wait_until(lambda n=n: node3 in wg_peers(lab, n), 30, what=f"{n} to take node3 back")
