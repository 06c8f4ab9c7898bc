"""`mlds bench campaign`'s closing lines: the spread, capped attempts, the longest unit and the occupancy bound."""

from __future__ import annotations

from mlds_operator.bench.campaign import _Way, spread_lines


def row(unit: int, target: str, epochs: int, seconds: float) -> dict[str, object]:
    return {"unit": unit, "target": target, "epochs": epochs, "seconds": seconds}


def test_a_unit_whose_first_attempt_hit_the_cap_is_as_long_as_both_attempts_together() -> None:
    one = _Way("one at a time", 1, False)
    one.rows = [row(0, "A", 100, 10.0), row(1, "A", 300, 30.0), row(2, "B", 50, 5.0), row(3, "B", 60, 6.0)]
    one.capped = [row(2, "B", 2048, 204.8)]
    continuous = _Way("continuous S=2", 2, False)
    continuous.rows, continuous.capped = one.rows, one.capped

    lines = spread_lines([one, continuous], slots=2)

    assert lines[0] == "epochs to converge (min/median/max): A 100/300/300, B 50/60/60"
    assert lines[1].startswith("attempts that hit the epoch cap: 1 (unit 2 (B) 2,048 epochs)")
    # Unit 2 trains 2,048 + 50 epochs, the second attempt after the first: longer than any other unit.
    assert lines[2].startswith(
        "longest unit: unit 2 (B), 2,098 epochs over 2 attempts, one after the other, 209.8 s alone;"
    )
    total = 100 + 300 + 2048 + 50 + 60
    assert lines[3] == (
        f"best mean occupancy of any schedule with 2 slots: {total / (2 * 2098):.1%} "
        f"({total:,} epochs in all, {2098 / total:.0%} of them in the longest unit)"
    )


def test_without_capped_attempts_the_longest_network_bounds_the_campaign() -> None:
    continuous = _Way("continuous S=2", 2, False)
    continuous.rows = [row(0, "A", 10, 1.0), row(1, "A", 20, 2.0), row(2, "A", 30, 3.0), row(3, "A", 40, 4.0)]

    lines = spread_lines([continuous], slots=2)

    assert len(lines) == 3
    assert lines[1] == "longest network: unit 3 (A), 40 epochs; no schedule ends the campaign before it does"
    assert lines[2].startswith("best mean occupancy of any schedule with 2 slots: 100.0% (100 epochs in all")
    assert spread_lines([_Way("fixed stacks S=2", 2, True)], slots=2) == []  # a run that wrote no manifest
