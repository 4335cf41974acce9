"""`wiremesh keys rotate`: ask nodes for new WireGuard keys, and follow the rotations to their end.

The CLI only writes requests (`rotations/<node>` in state requested, signed with the cluster's
signing key when the operator has it: cli.rotate_request) and reads progress; the node's agent
runs the rotation and advances the record (requested -> staged -> switched ->
done | failed | abandoned). A request is created with check-and-set and never written over an
active rotation: two commands asking for the same node at once make one rotation, and the
second follows the first's.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import click

from wiremesh.clustermesh import (
    ClusterConfig,
    ClusterNotFound,
    ClusterSnapshot,
    ControlMemo,
    ConsulStore,
    ConsulUnavailable,
    InvalidRecord,
    Rotation,
    check_node_name,
    layout,
    parse_cluster,
    parse_rotations,
)
from wiremesh.errors import WiremeshError
from wiremesh.keys import SigningKey

from .operator_key import SIGNING_KEY_OPTION, operator_key
from .output import Ctx, emit, info
from .rotate_request import request_rotation, verifier
from .target import CONFIG_OPTION, target

if TYPE_CHECKING:
    from rich.console import Console

# A blocking query's wait: a change wakes the watch at once; this only bounds how late the
# --timeout is noticed.
_WATCH_WAIT_S = 2


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- following ------------------------------------------------------------------------------


@dataclass
class Tracked:
    node: str
    rotation: Rotation | None = None  # None: not asked yet
    joined: bool = False
    ended: bool = False
    note: str = ""  # why its end was not seen, if it was not


class Rollout:
    """Rotations asked for at most `parallel` at a time, the next one when one ends."""

    def __init__(self, store: ConsulStore, cluster: str, nodes: Sequence[str], parallel: int,
                 signer: SigningKey | None = None, verify: Callable[[str, bytes, Rotation], None] | None = None) -> None:
        self.store, self.cluster, self.parallel, self.signer, self.verify = store, cluster, parallel, signer, verify
        self.tracked = {n: Tracked(n) for n in nodes}
        self._queue = list(nodes)

    @property
    def in_flight(self) -> list[Tracked]:
        return [t for t in self.tracked.values() if t.rotation is not None and not t.ended]

    @property
    def finished(self) -> bool:
        return not self._queue and not self.in_flight

    def submit_more(self) -> list[Tracked]:
        """Ask the next nodes while fewer than `parallel` rotate; a node whose request fails stays queued."""
        started = []
        while self._queue and len(self.in_flight) < self.parallel:
            req = request_rotation(self.store, self.cluster, self._queue[0], _now_ms(), self.signer, self.verify)
            t = self.tracked[self._queue.pop(0)]
            t.rotation, t.joined = req.rotation, req.joined
            started.append(t)
        return started

    def observe(self, rotations: Mapping[str, Rotation], refused: Mapping[str, str]) -> list[Tracked]:
        """Take the rotation records now in Consul; return the tracked ones that ended."""
        ended = []
        for t in self.in_flight:
            assert t.rotation is not None
            now = rotations.get(t.node)
            why = refused.get(layout.rotation_key(self.cluster, t.node))
            if why is not None:
                t.note = f"its record became unreadable: {why}"
            elif now is None:
                t.note = "its record was removed before it ended"
            elif now.id != t.rotation.id:
                t.note = f"its record was replaced by rotation {now.id} before its end was seen"
            else:
                t.rotation = now
            t.ended = bool(t.note) or not t.rotation.active
            if t.ended:
                ended.append(t)
        return ended


class _Deadline:
    """A watch's stop signal that sets itself at a moment of time.monotonic()."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def is_set(self) -> bool:
        return time.monotonic() >= self.at

    def wait(self, timeout: float | None = None) -> bool:
        left = self.at - time.monotonic()
        time.sleep(max(0.0, left if timeout is None else min(left, timeout)))
        return self.is_set()


def result(t: Tracked, now_ms: int, timed_out: bool = False) -> dict[str, Any]:
    """One node's outcome, as `--output json` prints it."""
    r = t.rotation
    if r is None:
        return {"node": t.node, "id": None, "state": "not started", "epoch_from": None, "epoch_to": None,
                "confirmed": [], "lagging": [], "error": "not started before the timeout", "seconds": 0.0,
                "already_rotating": False, "timed_out": True}
    end = now_ms if r.active else r.updated_at
    error = t.note or r.error
    if timed_out:
        error = f"timed out in state {r.state}" + (f" ({error})" if error else "")
    return {"node": t.node, "id": r.id, "state": r.state, "epoch_from": r.epoch_from, "epoch_to": r.epoch_to,
            "confirmed": list(r.confirmed), "lagging": list(r.lagging), "error": error,
            "seconds": round(max(0, end - r.requested_at) / 1000, 1), "already_rotating": t.joined,
            "timed_out": timed_out}


def _succeeded(res: Mapping[str, Any]) -> bool:
    return bool(res["state"] == "done" and not res["error"])


def describe(res: Mapping[str, Any]) -> str:
    """One line for a person: what became of a node's rotation."""
    node, state = res["node"], res["state"]
    if state == "not started":
        return f"{node}: not started: its turn had not come when the timeout passed"
    peers = len(res["confirmed"])
    took = f" ({res['seconds']:g} s)"
    if _succeeded(res):
        epoch = f", key epoch {res['epoch_from']} -> {res['epoch_to']}" if res["epoch_to"] else ""
        return f"{node}: done{epoch}, {peers} peer{'s' if peers != 1 else ''} confirmed{took}"
    what = "timed out" if res["timed_out"] else state
    detail = res["error"].removeprefix("timed out ") if res["timed_out"] else res["error"]
    line = f"{node}: {what}" + (f": {detail}" if detail else "")
    if res["lagging"]:
        line += f"; lagging peers: {', '.join(res['lagging'])}"
    else:
        line += f"; {peers} peer{'s' if peers != 1 else ''} confirmed"
    return line + took


class _Reporter(Protocol):
    def started(self, t: Tracked) -> None: ...
    def progress(self, rollout: Rollout) -> None: ...
    def ended(self, res: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


def _started_line(t: Tracked) -> str:
    assert t.rotation is not None
    if t.joined:
        return f"{t.node}: already rotating (rotation {t.rotation.id}, {t.rotation.state}): following it"
    return f"{t.node}: rotation {t.rotation.id} requested"


class _Lines:
    """Not a terminal: one line per node as it is asked and as it ends, to stderr."""

    def started(self, t: Tracked) -> None:
        info(_started_line(t))

    def progress(self, rollout: Rollout) -> None:
        pass

    def ended(self, res: Mapping[str, Any]) -> None:
        info(describe(res))

    def close(self) -> None:
        pass


class _Bar:
    """A terminal: a bar of nodes done of all, and one of peers confirmed per rotation in flight."""

    def __init__(self, console: "Console", total: int, peers: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

        self.bars = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console)
        self.nodes = self.bars.add_task("nodes rotated", total=total)
        self.flights: dict[str, TaskID] = {}
        self.peers = peers  # the cluster's other nodes; cross-cluster peers raise a bar's total
        self.bars.start()

    def started(self, t: Tracked) -> None:
        self.bars.console.print(_started_line(t), markup=False, highlight=False)

    def progress_of(self, t: Tracked) -> None:
        assert t.rotation is not None
        confirmed = len(t.rotation.confirmed)
        task = self.flights.get(t.node)
        if task is None:
            task = self.flights[t.node] = self.bars.add_task("", total=self.peers)
        self.bars.update(task, description=f"  {t.node} {t.rotation.state}: peers confirmed",
                             total=max(self.peers, confirmed), completed=confirmed)

    def progress(self, rollout: Rollout) -> None:
        for t in rollout.in_flight:
            self.progress_of(t)
        self.bars.refresh()

    def ended(self, res: Mapping[str, Any]) -> None:
        task = self.flights.pop(res["node"], None)
        if task is not None:
            self.bars.remove_task(task)
        self.bars.advance(self.nodes)
        self.bars.console.print(describe(res), markup=False, highlight=False)

    def close(self) -> None:
        self.bars.stop()


def _terminal_console() -> "Console | None":
    """A rich console on stderr if stderr is a terminal (progress bars only there)."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console

    return Console(stderr=True, no_color="NO_COLOR" in os.environ)


def follow(store: ConsulStore, cluster: str, rollout: Rollout, reporter: _Reporter, deadline: _Deadline,
           config: ClusterConfig | None = None) -> None:
    """Watch the cluster's rotation records until every rotation of `rollout` ended or `deadline`,
    asking the next nodes as earlier ones end. A Consul outage pauses it (the agents' rotations
    go on, or pause, by themselves). In a cluster requiring signed records (`config`), a record
    its agents would refuse is one the rotation's end cannot be read from."""
    prefix = layout.rotations_prefix(cluster)
    warned = False
    memo = ControlMemo()
    while not rollout.finished and not deadline.is_set():
        try:
            for _, items in store.watch(prefix, deadline, wait_s=_WATCH_WAIT_S):
                verify = verifier(config, memo)
                parsed, refused = parse_rotations(cluster, {k: v.value for k, v in items.items()}, verify,
                                                  memo.rotations if verify else None)
                for t in rollout.observe(parsed.rotations, dict(refused)):
                    reporter.ended(result(t, _now_ms()))
                for t in rollout.submit_more():
                    reporter.started(t)
                reporter.progress(rollout)
                if rollout.finished:
                    return
        except ConsulUnavailable as e:
            if not warned:
                info(f"warning: {e}; still waiting for the rotations")
                warned = True
            deadline.wait(1.0)


def snapshot(store: ConsulStore, cluster: str) -> ClusterSnapshot:
    """The cluster's validated records; ClusterNotFound if it has no config."""
    index, items = store.list(layout.cluster_prefix(cluster))
    if layout.config_key(cluster) not in items:
        raise ClusterNotFound(f"cluster {cluster!r}: no config at {layout.config_key(cluster)}")
    return parse_cluster(cluster, index, items)


def _unknown_nodes(snap: ClusterSnapshot, unknown: Sequence[str]) -> WiremeshError:
    rejected = {r.key: r.reason for r in snap.rejected}
    named = []
    for n in unknown:
        why = rejected.get(layout.node_key(snap.cluster, n))
        named.append(f"{n} (its record is invalid: {why})" if why else n)
    err = WiremeshError(f"not {'a node' if len(unknown) == 1 else 'nodes'} of cluster {snap.cluster}: "
                        f"{', '.join(named)}; no rotation was asked for")
    err.hint = (f"its nodes (those whose agent runs): {', '.join(sorted(snap.nodes)) or 'none'}")
    return err


def _error_line(msg: str) -> None:
    color = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    click.echo((click.style("error:", fg="red", bold=True) if color else "error:") + f" {msg}", err=True)


CLUSTER_OPTION = click.option("--cluster", "cluster_name", default=None,
                              help="The nodes' cluster (default: the agent.toml's).")


@click.command("rotate")
@click.argument("nodes", nargs=-1, metavar="[NODE]...")
@CLUSTER_OPTION
@SIGNING_KEY_OPTION
@click.option("--all", "all_nodes", is_flag=True, help="Every node of the cluster whose agent runs.")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="At most N nodes rotating at once; the next starts when one ends.")
@click.option("--wait", is_flag=True, help="Wait until every rotation ends (implied when N is less than the nodes).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              metavar="SECONDS", help="How long to wait for all of them.")
@CONFIG_OPTION
@click.pass_obj
def rotate(ctx: Ctx, nodes: tuple[str, ...], cluster_name: str | None, signing_key_path: Path | None, all_nodes: bool,
           parallel: int, wait: bool, timeout: float, config_path: Path | None) -> None:
    """Give NODEs new WireGuard keys while traffic flows.

    Each node's agent makes its next key (the private key never leaves the node), announces it so
    that its peers prepare, switches, and waits for each live peer's handshake on it. Asking for a
    node that is rotating already follows that rotation instead of starting another. Requests are
    signed with the cluster's signing key when it is at hand (--signing-key; required where the
    cluster requires signed records).

    \b
    Exit status with --wait: 0 when every rotation is done; 1 when any failed, was
    abandoned or had not ended by --timeout (one line each, naming the peers that lagged).
    """
    if all_nodes and nodes:
        raise click.UsageError("give NODE names or --all, not both")
    if not all_nodes and not nodes:
        raise click.UsageError("which nodes? give NODE names, or --all")
    for n in nodes:
        try:
            check_node_name(n, "NODE")
        except InvalidRecord as e:
            raise click.BadParameter(e.reason, param_hint="NODE") from None
    store, cluster = target(ctx, cluster_name, config_path)
    snap = snapshot(store, cluster)
    chosen = sorted(snap.nodes) if all_nodes else list(dict.fromkeys(nodes))
    if not chosen:
        raise WiremeshError(f"cluster {cluster} has no node whose agent runs: nothing to rotate")
    unknown = [n for n in chosen if n not in snap.nodes]
    if unknown:
        raise _unknown_nodes(snap, unknown)
    wait = wait or parallel < len(chosen)
    signer = operator_key(snap.config, signing_key_path, "rotation requests")

    rollout = Rollout(store, cluster, chosen, parallel, signer, verifier(snap.config, ControlMemo()))
    console = _terminal_console() if wait else None
    reporter: _Reporter = _Bar(console, len(chosen), len(snap.nodes) - 1) if console is not None else _Lines()
    deadline = _Deadline(timeout)
    try:
        for t in rollout.submit_more():
            reporter.started(t)
        if wait:
            follow(store, cluster, rollout, reporter, deadline, snap.config)
    except KeyboardInterrupt:
        info("interrupted: the rotations asked for go on in the agents; `wiremesh keys status` shows them")
        raise click.Abort() from None
    finally:
        reporter.close()

    now = _now_ms()
    results = [result(t, now, timed_out=wait and not t.ended) for t in rollout.tracked.values()]
    emit(ctx, {"cluster": cluster, "rotations": results},
         ["node", "rotation", "state", "key epoch", "confirmed", "lagging", "seconds"],
         [[r["node"], r["id"] or "-", ("timed out, " if r["timed_out"] and r["id"] else "") + r["state"],
           f"{r['epoch_from']} -> {r['epoch_to']}" if r["epoch_to"] else "-", len(r["confirmed"]),
           ", ".join(r["lagging"]) or "-", r["seconds"]] for r in results])
    if wait:
        failed = [r for r in results if not _succeeded(r)]
        for r in failed:
            _error_line(describe(r))
        if failed:
            raise click.exceptions.Exit(1)
