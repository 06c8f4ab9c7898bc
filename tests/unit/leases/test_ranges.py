"""Compressed index ranges ("12,40-42"): what the status shows and what people type back."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlds_contract.errors import UserError
from mlds_operator.leases.ranges import RangeSyntaxError, format_ranges, iter_ranges, parse_ranges, to_ranges


@pytest.mark.parametrize(
    ("indices", "text"),
    [
        pytest.param([], "", id="nothing"),
        pytest.param([7], "7", id="one index"),
        pytest.param([12, 40, 41, 42], "12,40-42", id="the status example"),
        pytest.param([3, 4], "3-4", id="two neighbours form a range"),
        pytest.param([42, 40, 12, 41, 40], "12,40-42", id="unsorted with duplicates"),
        pytest.param(range(1_000_000), "0-999999", id="a million in one range"),
        pytest.param(np.array([5, 1, 2, 3], dtype=np.int32), "1-3,5", id="a numpy array"),
    ],
)
def test_indices_format_as_ranges(indices: list[int], text: str) -> None:
    assert format_ranges(indices) == text


@pytest.mark.parametrize(
    ("text", "indices"),
    [
        pytest.param("", [], id="empty"),
        pytest.param("  ", [], id="blank"),
        pytest.param("12,40-42", [12, 40, 41, 42], id="the status example"),
        pytest.param(" 12 , 40 - 42 ", [12, 40, 41, 42], id="spaces around items"),
        pytest.param("5,1-3,2", [1, 2, 3, 5], id="overlaps and any order give a sorted set"),
        pytest.param("0-0", [0], id="a one-index range"),
    ],
)
def test_ranges_parse_to_sorted_indices(text: str, indices: list[int]) -> None:
    assert parse_ranges(text) == indices


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("1,,2", "bad range item '' in '1,,2'", id="an empty item"),
        pytest.param("5-3", "5 is above 3", id="a descending range"),
        pytest.param("-3", "bad range item '-3'", id="a negative index"),
        pytest.param("1-2-3", "expected N or A-B", id="two dashes"),
        pytest.param("a", "bad range item 'a'", id="not a number"),
        pytest.param("12,40-42 (+3 more)", "bad range item", id="a cut display string"),
    ],
)
def test_bad_range_strings_are_refused_readably(text: str, message: str) -> None:
    with pytest.raises(RangeSyntaxError, match=re.escape(message)):
        parse_ranges(text)


def test_a_range_syntax_error_is_a_user_error_and_a_value_error() -> None:
    with pytest.raises(UserError):
        parse_ranges("x")
    with pytest.raises(ValueError, match="bad range"):
        parse_ranges("x")


def test_indices_can_be_checked_against_the_campaign_size() -> None:
    assert parse_ranges("0-9", total=10) == list(range(10))
    with pytest.raises(RangeSyntaxError, match=r"index 10 in '5-10' is outside 0..9"):
        parse_ranges("5-10", total=10)


def test_iter_ranges_yields_items_as_written_without_expanding_them() -> None:
    assert list(iter_ranges("9,0-999999999")) == [(9, 9), (0, 999_999_999)]


def test_negative_indices_cannot_be_formatted() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        to_ranges([-1, 2])


@pytest.mark.parametrize("max_chars", [20, 25, 40, 100])
def test_a_long_list_is_cut_at_a_whole_item_within_max_chars(max_chars: int) -> None:
    every_other = list(range(0, 2000, 2))  # 1,000 single indices
    text = format_ranges(every_other, max_chars=max_chars)
    assert len(text) <= max_chars
    head, _, tail = text.partition(" (+")
    shown = parse_ranges(head)
    assert shown == every_other[: len(shown)]
    assert tail == f"{1000 - len(shown)} more)"


def test_a_short_list_is_not_cut() -> None:
    assert format_ranges([1, 2, 3, 9], max_chars=7) == "1-3,9"


def test_when_not_even_one_item_fits_only_the_count_is_shown() -> None:
    assert format_ranges([1234567, 7654321], max_chars=12) == "(+2 more)"


@given(st.sets(st.integers(0, 10_000), max_size=200))
def test_format_and_parse_are_inverse(indices: set[int]) -> None:
    text = format_ranges(indices)
    assert parse_ranges(text) == sorted(indices)
    runs = to_ranges(indices)
    assert all(a <= b for a, b in runs)
    assert all(b1 + 1 < a2 for (_, b1), (a2, _) in itertools.pairwise(runs)), "runs are maximal"
