"""Compressed index ranges: the set {12, 40, 41, 42} as ``"12,40-42"``.

The lease book writes failed units this way into a campaign's status (``status.failedUnits``, DESIGN.md
§3), and people type the same syntax back (e.g. a unit list on the command line). Formatting is
vectorised with numpy so a million-unit campaign formats in milliseconds; ``max_chars`` keeps a status
field small however scattered the set is (a CR must stay well under etcd's ~1.5 MB object limit).

Syntax: comma-separated items, each ``N`` or ``A-B`` (inclusive, ``A <= B``), non-negative decimal
integers; spaces around items are allowed; the empty string is the empty set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt
from mlds_contract.errors import UserError

__all__ = ["RangeSyntaxError", "format_ranges", "iter_ranges", "parse_ranges", "to_ranges"]

_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class RangeSyntaxError(UserError, ValueError):
    """A range string that does not parse; the message quotes the offending item."""


def _runs(indices: Iterable[int] | npt.NDArray[np.integer]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """First and last index of each maximal run of consecutive indices, ascending."""
    arr = indices if isinstance(indices, np.ndarray) else np.fromiter(indices, dtype=np.int64)
    a = arr.astype(np.int64, copy=False).ravel()
    if a.size == 0:
        return a, a
    if not bool(np.all(a[1:] > a[:-1])):  # already sorted and distinct (np.flatnonzero's output): no sort
        a = np.sort(a)
        a = a[np.concatenate(([True], a[1:] != a[:-1]))]
    if a[0] < 0:
        raise ValueError(f"indices must be non-negative, got {int(a[0])}")
    breaks = np.flatnonzero(np.diff(a) != 1)
    starts = np.concatenate((a[:1], a[breaks + 1]))
    ends = np.concatenate((a[breaks], a[-1:]))
    return starts, ends


def to_ranges(indices: Iterable[int] | npt.NDArray[np.integer]) -> list[tuple[int, int]]:
    """Sorted, merged, inclusive ``(first, last)`` runs of the given non-negative indices (duplicates allowed)."""
    starts, ends = _runs(indices)
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def format_ranges(indices: Iterable[int] | npt.NDArray[np.integer], *, max_chars: int | None = None) -> str:
    """``"12,40-42"`` for {12, 40, 41, 42}; ``""`` for the empty set.

    With ``max_chars``, a longer result is cut after the last whole item that fits and ends with
    ``" (+N more)"`` (N indices left out), and is at most ``max_chars`` long (when that is room for
    the suffix at all). A cut string is for people; :func:`parse_ranges` rejects it.
    """
    starts, ends = _runs(indices)
    total = int((ends - starts + 1).sum())
    if max_chars is not None:
        # Every item takes at least two characters with its comma: more than max_chars items never fit,
        # so a million scattered indices cost no more than a short list.
        starts, ends = starts[: max_chars + 1], ends[: max_chars + 1]
    runs = list(zip(starts.tolist(), ends.tolist(), strict=True))
    parts = [str(s) if s == e else f"{s}-{e}" for s, e in runs]
    text = ",".join(parts)
    if max_chars is None or (len(text) <= max_chars and sum(e - s + 1 for s, e in runs) == total):
        return text
    # Cut: keep whole items while the text plus the suffix still fits.
    kept: list[str] = []
    shown = 0
    length = 0
    for part, (s, e) in zip(parts, runs, strict=True):
        suffix = f" (+{total - shown - (e - s + 1)} more)"
        extra = len(part) + (1 if kept else 0)
        if length + extra + len(suffix) > max_chars:
            break
        kept.append(part)
        length += extra
        shown += e - s + 1
    head = ",".join(kept)
    return f"{head} (+{total - shown} more)" if head else f"(+{total} more)"


def iter_ranges(text: str) -> Iterator[tuple[int, int]]:
    """The inclusive ``(first, last)`` items of a range string, in written order. Raises :class:`RangeSyntaxError`."""
    if not text.strip():
        return
    for item in text.split(","):
        m = _ITEM.match(item)
        if m is None:
            raise RangeSyntaxError(f"bad range item {item.strip()!r} in {text!r}: expected N or A-B")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise RangeSyntaxError(f"bad range item {item.strip()!r} in {text!r}: {first} is above {last}")
        yield first, last


def parse_ranges(text: str, *, total: int | None = None) -> list[int]:
    """The sorted, distinct indices of a range string; with ``total``, each must be below it.

    Raises :class:`RangeSyntaxError` (a :class:`~mlds_contract.errors.UserError`) with a readable message.
    """
    runs = list(iter_ranges(text))
    if total is not None:
        for _, last in runs:
            if last >= total:
                raise RangeSyntaxError(f"index {last} in {text!r} is outside 0..{total - 1}")
    if not runs:
        return []
    parts = [np.arange(first, last + 1, dtype=np.int64) for first, last in runs]
    out: list[int] = np.unique(np.concatenate(parts)).tolist()
    return out
