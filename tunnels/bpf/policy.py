"""The network policy datapath of one node: its tc programs on pod veths, its maps, its pins.

Maps are pinned by name under the node's pin directory (the same one as the service LB's:
/sys/fs/bpf/wiremesh/<node>/wm_pol_*). A restarted agent loads the object again with that pin
root: libbpf reuses the pinned maps (what they hold keeps enforcing), and attaching its fresh
programs replaces the old ones in place on every veth (tc.F_REPLACE): no moment without a
program, never an empty map (no allow-all gap, no deny-all gap).

`sync(maps)` writes the difference between what the maps hold and `maps` (a PolicyMaps the
plan computed): new and changed entries first (an identity's own entries before the fallback,
rules before the ipcache that points at them), removed ones after, so a new flow meets the old
or the new verdict, not a mix that allows what neither allows.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import libbpf, tc
from .build import POLICY_OBJECT, build_object, needs_build
from .errors import BpfUnavailable
from .policy_model import (
    ANY_IDENTITY,
    ENDPOINT_KEY,
    ENDPOINT_VALUE,
    IPCACHE_KEY,
    IPCACHE_VALUE,
    RULE_KEY,
    RULE_VALUE_SIZE,
    PolicyMaps,
    decode_endpoint,
    decode_ipcache,
    decode_rule,
    encode_endpoint,
    encode_ipcache,
    encode_rule,
)
from .system import BPFFS, mount_bpffs

log = logging.getLogger("wiremesh.tunnels.bpf")

FROM_POD, TO_POD = "wm_pol_from_pod", "wm_pol_to_pod"
MAPS = ("wm_pol_ipcache", "wm_pol_endpoints", "wm_pol_rules", "wm_pol_ct", "wm_pol_counts", "wm_pol_events")


@dataclass(frozen=True, slots=True)
class SyncReport:
    written: int
    deleted: int


class PolicyDatapath:
    """Load (or adopt) the policy programs and maps of one node; attach them to pod veths."""

    def __init__(self, pin_dir: str | Path) -> None:
        self.pin_dir = Path(pin_dir)
        self._obj: int | None = None
        self._maps: dict[str, libbpf.BpfMap] = {}
        self._progs: dict[str, int] = {}

    def load_or_adopt(self) -> PolicyDatapath:
        if os.geteuid() != 0:
            raise BpfUnavailable("network policy needs root (CAP_BPF, CAP_NET_ADMIN)")
        self.close()
        if self.pin_dir.is_relative_to(BPFFS):
            mount_bpffs(BPFFS)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        path = build_object(obj=POLICY_OBJECT) if needs_build(POLICY_OBJECT) else POLICY_OBJECT
        obj = libbpf.open_object(path, self.pin_dir)
        try:
            libbpf.load_object(obj, f"{path} (maps pinned in {self.pin_dir})")
            self._maps = {name: libbpf.BpfMap.of(obj, name) for name in MAPS[:3]}
            counts = libbpf.BpfMap.of(obj, "wm_pol_counts")
            counts.value_size = 8 * possible_cpus()  # a per-CPU map: one u64 per possible CPU
            self._maps["wm_pol_counts"] = counts
            self._progs = {name: libbpf.program_fd(libbpf.find_program(obj, name)) for name in (FROM_POD, TO_POD)}
        except BaseException:
            libbpf.close_object(obj)
            raise
        self._obj = obj
        return self

    def close(self) -> None:
        """Let go of the object (programs stay attached, maps stay pinned)."""
        if self._obj is not None:
            libbpf.close_object(self._obj)
            self._obj = None
            self._maps, self._progs = {}, {}

    def __enter__(self) -> PolicyDatapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- veths ----

    def attach(self, ifindex: int) -> None:
        """Enforce on the pod behind host-side veth `ifindex` (its maps' entry says what)."""
        tc.attach(ifindex, tc.INGRESS, self._progs[FROM_POD], FROM_POD)
        tc.attach(ifindex, tc.EGRESS, self._progs[TO_POD], TO_POD)

    @staticmethod
    def detach(ifindex: int) -> None:
        tc.detach(ifindex, tc.INGRESS)
        tc.detach(ifindex, tc.EGRESS)

    @staticmethod
    def attached(ifindex: int) -> bool:
        return bool(tc.attached(ifindex, tc.INGRESS) and tc.attached(ifindex, tc.EGRESS))

    # ---- maps ----

    def read(self) -> PolicyMaps:
        m = self._maps
        return PolicyMaps(
            ipcache=dict(decode_ipcache(k, v) for k, v in m["wm_pol_ipcache"].items()),
            endpoints=dict(decode_endpoint(k, v) for k, v in m["wm_pol_endpoints"].items()),
            rules=dict(decode_rule(k, v) for k, v in m["wm_pol_rules"].items()),
        )

    def counts(self) -> dict[int, int]:
        """Packets decided per rule id since the maps were made (summed over CPUs; 0: default deny)."""
        m = self._maps.get("wm_pol_counts")
        if m is None:
            return {}
        out = {}
        for k, v in m.items():
            out[int.from_bytes(k, sys.byteorder)] = sum(int.from_bytes(v[i:i + 8], sys.byteorder)
                                                        for i in range(0, len(v), 8))
        return out

    def sync(self, want: PolicyMaps) -> SyncReport:
        """Make the maps hold `want` (see the module's docstring for the order)."""
        have = self.read()
        written = deleted = 0
        # Up: an identity's own entries, then the ANY_IDENTITY fallbacks (a fallback that turns
        # to allow must find the denied identities' entries there already), then the ipcache
        # (an address's new identity must find its entries), then the endpoints that use them.
        changed = [(k, e) for k, e in want.rules.items() if have.rules.get(k) != e]
        for fallback in (False, True):
            written += _write(self._maps["wm_pol_rules"], (encode_rule(k, e) for k, e in changed
                                                           if (k.identity == ANY_IDENTITY) == fallback))
        written += _write(self._maps["wm_pol_ipcache"], (encode_ipcache(n, i) for n, i in want.ipcache.items()
                                                         if have.ipcache.get(n) != i))
        written += _write(self._maps["wm_pol_endpoints"], (encode_endpoint(i, *v) for i, v in want.endpoints.items()
                                                           if have.endpoints.get(i) != v))
        # Down: endpoints first, then what nothing uses any more.
        for i in set(have.endpoints) - set(want.endpoints):
            deleted += self._maps["wm_pol_endpoints"].delete(ENDPOINT_KEY.pack(i))
        for k in set(have.rules) - set(want.rules):
            deleted += self._maps["wm_pol_rules"].delete(RULE_KEY.pack(k.endpoint, k.identity, k.proto, k.direction, 0))
        for n in set(have.ipcache) - set(want.ipcache):
            deleted += self._maps["wm_pol_ipcache"].delete(IPCACHE_KEY.pack(n.prefixlen, n.network_address.packed))
        return SyncReport(written, deleted)


def possible_cpus() -> int:
    """The kernel's possible CPUs (per-CPU map values hold one slot each), e.g. "0-3" -> 4."""
    n = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def remove_pins(pin_dir: str | Path) -> list[str]:
    """Unpin the policy maps of a node (its programs go with the veths; the maps with their last
    pin and program). Returns the pins removed."""
    out = []
    for name in MAPS:
        p = Path(pin_dir) / name
        if p.exists():
            p.unlink()
            out.append(name)
    return out


def _write(m: libbpf.BpfMap, entries: Iterable[tuple[bytes, bytes]]) -> int:
    pairs = list(entries)
    if not pairs:
        return 0
    if m.name == "wm_pol_ipcache":  # an LPM trie takes no batch updates
        for k, v in pairs:
            m.update(k, v)
    else:
        m.update_batch([k for k, _ in pairs], [v for _, v in pairs])
    return len(pairs)


# sizes checked against the compiled object at import of the tests (tests/integration/test_policy_datapath.py)
SIZES = {"wm_pol_ipcache": (IPCACHE_KEY.size, IPCACHE_VALUE.size), "wm_pol_endpoints": (ENDPOINT_KEY.size, ENDPOINT_VALUE.size),
         "wm_pol_rules": (RULE_KEY.size, RULE_VALUE_SIZE)}
