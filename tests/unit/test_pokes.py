"""agent.pokes: one end of a new tunnel starts the handshake at once, the other only if that did
not work (crossing initiations cost 5 s)."""

from __future__ import annotations

from wiremesh.agent.pokes import DEFER_S, Pokes

LOW, MID, HIGH = "A" * 43 + "=", "M" * 43 + "=", "Z" * 43 + "="


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_lower_key_pokes_at_once_the_higher_waits() -> None:
    clock = Clock()
    p = Pokes(clock)
    assert p.added([("n-low", LOW), ("n-high", HIGH)], MID) == ["n-high"]
    assert p.next_due() == 100.0 + DEFER_S
    reads: list[int] = []

    def hs() -> dict[str, float]:
        reads.append(1)
        return {}

    assert p.due(hs, {"n-low": LOW}) == [] and not reads  # not due yet: the device is not read
    clock.t += DEFER_S
    assert p.due(hs, {"n-low": LOW}) == ["n-low"] and reads == [1]
    assert p.next_due() is None and p.due(hs, {"n-low": LOW}) == []


def test_a_handshake_meanwhile_or_a_new_key_cancels_the_deferred_poke() -> None:
    clock = Clock()
    p = Pokes(clock)
    assert p.added([("a", LOW), ("b", LOW.replace("A", "B", 1))], HIGH) == []
    clock.t += DEFER_S
    # a: its handshake came (the other end's poke worked); b: planned with another key by now.
    assert p.due(lambda: {LOW: 1_800_000_000.0}, {"a": LOW, "b": MID}) == []
    assert p.next_due() is None


def test_both_ends_decide_alike() -> None:
    one, two = Pokes(Clock()), Pokes(Clock())
    at_once = [bool(one.added([("two", HIGH)], LOW)), bool(two.added([("one", LOW)], HIGH))]
    assert at_once == [True, False]  # exactly one initiation goes out at once
