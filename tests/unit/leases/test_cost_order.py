"""Cost-aware grants (issue 14): the most expensive targets' units are handed out first, learned as they finish.

A campaign is blocks of consecutive units (one block per target); the book starts from reference costs
and re-orders as finished attempts report their epochs and training seconds.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlds_operator.leases.book import LeaseBook


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def granted(book: LeaseBook, k: int, worker: str = "w") -> tuple[int, ...]:
    view = book.grant(worker, "cpu", k)
    return () if view is None else view.units


def test_the_most_expensive_target_is_granted_first_lowest_index_within_it() -> None:
    book = LeaseBook(12, clock=Clock(), block=4, costs=[70, 1300, 175])
    assert granted(book, 2) == (4, 5)
    assert granted(book, 3) == (6, 7, 8)  # EightBit's block runs out; Parity's comes next
    assert granted(book, 8) == (0, 1, 2, 3, 9, 10, 11)


def test_costs_within_an_octave_keep_index_order() -> None:
    book = LeaseBook(6, clock=Clock(), block=2, costs=[70, 76, 119])  # SingleDirect, SingleInvert, SimpleXOR
    assert granted(book, 6) == tuple(range(6))


def test_finished_units_teach_the_book_which_target_is_slow() -> None:
    book = LeaseBook(400, clock=Clock(), block=100, costs=[100, 100, 100, 100])  # all in one octave
    first = granted(book, 40)
    assert first == tuple(range(40))  # equal reference costs: index order
    for unit in first:  # block 0 turns out cheap; block 3 (reported by a few finished units) slow
        book.complete(unit, worker="w", pool="cpu", attempt=0, converged=True)
        book.observe_cost(unit, epochs=60, seconds=6.0)
    for unit in granted(book, 2):
        book.complete(unit, worker="w", pool="cpu", attempt=0, converged=True)
    book.observe_cost(300, epochs=2000, seconds=400.0)
    expected = book.expected_costs()
    assert expected is not None
    assert expected[3] > expected[1] > expected[0]
    assert granted(book, 3)[0] >= 300  # the slow target first from now on


def test_a_unit_that_comes_back_from_an_expensive_target_goes_out_again_before_cheap_ones() -> None:
    clock = Clock()
    book = LeaseBook(20, clock=clock, block=10, costs=[1, 10], lease_seconds=100)
    lost = book.grant("a", "cpu", 2)
    assert lost is not None
    assert lost.units == (10, 11)
    assert granted(book, 8, "b") == tuple(range(12, 20))
    assert book.fail(10, worker="a", pool="cpu", attempt=0, retry=True).value == "accepted"
    assert granted(book, 2, "c") == (0, 10)  # unit 10 first, then the cheap target's lowest


@settings(max_examples=60, deadline=None)
@given(
    blocks=st.lists(st.floats(0, 5000, allow_nan=False), min_size=1, max_size=6),
    block=st.integers(1, 7),
    ks=st.lists(st.integers(1, 9), min_size=1, max_size=40),
    returns=st.lists(st.integers(0, 60), max_size=10),
)
def test_every_unit_is_granted_and_none_twice_while_it_is_held(
    blocks: list[float], block: int, ks: list[int], returns: list[int]
) -> None:
    total = len(blocks) * block - (block - 1 if block > 1 else 0) // 2  # a short last block too
    book = LeaseBook(total, clock=Clock(), block=block, costs=blocks)
    held: set[int] = set()
    for i, k in enumerate(ks * 3):
        for unit in granted(book, k, f"w{i}"):
            assert unit not in held
            held.add(unit)
        if returns and i < len(returns) and held:
            unit = sorted(held)[returns[i] % len(held)]
            holder = book.unit(unit).leases[0]
            lease = book.lease(holder)
            assert lease is not None
            book.fail(unit, worker=lease.worker, pool="cpu", attempt=0, retry=True)
            held.discard(unit)
    while units := granted(book, 5, "last"):
        assert not held & set(units)
        held |= set(units)
    assert held == set(range(total))


def test_costs_must_fit_the_blocks() -> None:
    with pytest.raises(ValueError, match="one per block"):
        LeaseBook(10, block=4, costs=[1.0, 2.0])
