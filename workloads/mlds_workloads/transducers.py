"""ds3: random Mealy transducers, one per target, unique within a campaign (docs/workloads.md §6).

A transducer has 8 input symbols, 8 output symbols and n states (n uniform in 2..8), start state 0,
with uniformly random transition and output tables. A candidate is kept only if every state is
reachable from the start, it is minimal (no two equivalent states, checked by partition refinement)
and its output depends on its state for some input. It is then canonicalised (states relabelled in the
order a breadth-first search from the start visits them, inputs tried 0..7) and identified by the
SHA-256 of its canonical tables.

Automaton k of a campaign is the first acceptable candidate drawn from (campaign seed, k, attempt
0, 1, ...) whose hash differs from automata 0..k-1. Automata are therefore generated in order and kept
in an in-process book per campaign seed (a worker asking for automaton 9,999 builds 0..9,998 once;
see the report for timings).

Encoding for the 9-in/8-out GRU: ``x_t = [reset_t, onehot(a_t)]`` with ``reset_t = 1`` only at t = 0,
``y_t = onehot(output_t)``. :func:`transducer_data` is what ``target_data`` calls for ds3.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from mlds_contract.plan import derive_seed

from ._random import Stream
from .data import SequenceData
from .machines import SEQUENCE_LENGTH

__all__ = [
    "INPUTS",
    "MAX_STATES",
    "MIN_STATES",
    "OUTPUTS",
    "SIZES",
    "Mealy",
    "automata",
    "automaton",
    "transducer_data",
]

INPUTS = 8
OUTPUTS = 8
MIN_STATES, MAX_STATES = 2, 8
#: (training, evaluation) sequences per automaton.
SIZES = (256, 64)
_GENERATOR = "mlds-transducers/1"  # bump when the automata or data a seed produces change
_HASH_PREFIX = b"mlds-mealy/1"  # versioned, so a change of table encoding cannot collide with old hashes


@dataclass(frozen=True)
class Mealy:
    """A Mealy machine with start state 0: ``transitions[s][a]`` is the next state and ``outputs[s][a]``
    the output symbol when input ``a`` arrives in state ``s``."""

    transitions: tuple[tuple[int, ...], ...]
    outputs: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, transitions: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> Mealy:
        """Build from nested lists (or arrays), checking the table shapes and ranges."""
        delta = tuple(tuple(int(v) for v in row) for row in transitions)
        lam = tuple(tuple(int(v) for v in row) for row in outputs)
        n = len(delta)
        if n == 0 or len(lam) != n or any(len(row) != len(delta[0]) for row in delta + lam):
            raise ValueError("transition and output tables must both be n x inputs")
        if any(not 0 <= v < n for row in delta for v in row):
            raise ValueError("a transition leads outside the states")
        return cls(delta, lam)

    @property
    def states(self) -> int:
        return len(self.transitions)

    def run(self, inputs: Sequence[int]) -> list[int]:
        """The output symbols for an input sequence, from the start state (pure Python; the oracle)."""
        state, out = 0, []
        for a in inputs:
            out.append(self.outputs[state][a])
            state = self.transitions[state][a]
        return out

    def reachable(self) -> list[int]:
        """States reachable from the start, in breadth-first order (inputs tried in order)."""
        order, seen, queue = [], {0}, deque([0])
        while queue:
            s = queue.popleft()
            order.append(s)
            for nxt in self.transitions[s]:
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        return order

    def equivalence_classes(self) -> list[int]:
        """Moore-style partition refinement for Mealy machines: block number of each state.

        Start from "same output row", then split blocks by the blocks of their successors until nothing
        splits. Two states end in the same block iff no input sequence tells them apart.
        """
        block = self._renumber([self.outputs[s] for s in range(self.states)])
        while True:
            refined = self._renumber([(block[s], *(block[t] for t in self.transitions[s])) for s in range(self.states)])
            if max(refined) == max(block):  # refinement only splits: same count means stable
                return refined
            block = refined

    @staticmethod
    def _renumber(signatures: Sequence[tuple[int, ...]]) -> list[int]:
        ids: dict[tuple[int, ...], int] = {}
        return [ids.setdefault(sig, len(ids)) for sig in signatures]

    def is_minimal(self) -> bool:
        return len(set(self.equivalence_classes())) == self.states

    def output_depends_on_state(self) -> bool:
        """True when for some input the output differs between two states (the network needs memory)."""
        return any(len({row[a] for row in self.outputs}) > 1 for a in range(len(self.outputs[0])))

    def canonical(self) -> Mealy:
        """The same machine with states relabelled in breadth-first order from the start (reachable part)."""
        order = self.reachable()
        label = {old: new for new, old in enumerate(order)}
        return Mealy(
            tuple(tuple(label[t] for t in self.transitions[s]) for s in order),
            tuple(self.outputs[s] for s in order),
        )

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical tables: prefix, n, inputs, then the transition rows and the output
        rows, one byte per entry."""
        c = self.canonical()
        body = bytes([c.states, len(c.transitions[0])])
        body += bytes(v for row in c.transitions for v in row) + bytes(v for row in c.outputs for v in row)
        return hashlib.sha256(_HASH_PREFIX + b"\0" + body).hexdigest()

    def table(self) -> dict[str, Any]:
        """JSON-able description (for data files and results)."""
        return {
            "states": self.states,
            "start": 0,
            "transitions": [list(r) for r in self.transitions],
            "outputs": [list(r) for r in self.outputs],
        }


def _candidate(campaign_seed: int, k: int, attempt: int) -> Mealy:
    stream = Stream(derive_seed("ds3-automaton", campaign_seed, k, attempt))
    n = MIN_STATES + int(stream.below(MAX_STATES - MIN_STATES + 1, (1,))[0])
    return Mealy.of(stream.below(n, (n, INPUTS)).tolist(), stream.below(OUTPUTS, (n, INPUTS)).tolist())


def _acceptable(m: Mealy) -> bool:
    return len(m.reachable()) == m.states and m.is_minimal() and m.output_depends_on_state()


@dataclass(frozen=True)
class _Entry:
    machine: Mealy  # canonical
    sha256: str
    attempt: int  # the candidate attempt that produced it


class _Book:
    """The automata of one campaign seed, generated in order; grows on demand. Thread-safe."""

    def __init__(self, campaign_seed: int) -> None:
        self.campaign_seed = campaign_seed
        self.entries: list[_Entry] = []
        self.hashes: set[str] = set()
        self.lock = threading.Lock()

    def get(self, k: int) -> _Entry:
        with self.lock:
            while len(self.entries) <= k:
                self._extend()
            return self.entries[k]

    def _extend(self) -> None:
        k = len(self.entries)
        attempt = 0
        while True:
            m = _candidate(self.campaign_seed, k, attempt)
            if _acceptable(m):
                canonical = m.canonical()
                digest = canonical.sha256()
                if digest not in self.hashes:
                    self.entries.append(_Entry(canonical, digest, attempt))
                    self.hashes.add(digest)
                    return
            attempt += 1


_books: dict[int, _Book] = {}
_books_lock = threading.Lock()


def _book(campaign_seed: int) -> _Book:
    with _books_lock:
        return _books.setdefault(campaign_seed, _Book(campaign_seed))


def automaton(campaign_seed: int, k: int) -> Mealy:
    """Automaton ``k`` of the campaign with this seed (canonical form)."""
    if k < 0:
        raise ValueError(f"automaton index must be >= 0, got {k}")
    return _book(campaign_seed).get(k).machine


def automata(campaign_seed: int, count: int) -> list[Mealy]:
    """Automata 0 .. count-1 of the campaign with this seed."""
    book = _book(campaign_seed)
    if count > 0:
        book.get(count - 1)
    return [e.machine for e in book.entries[:count]]


def _onehot(symbols: npt.NDArray[np.int64], width: int) -> npt.NDArray[np.float32]:
    return np.eye(width, dtype=np.float32)[symbols]


def _sequences(m: Mealy, stream: Stream, count: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    inputs = stream.below(INPUTS, (count, SEQUENCE_LENGTH))
    delta = np.array(m.transitions, dtype=np.int64)
    lam = np.array(m.outputs, dtype=np.int64)
    state = np.zeros(count, dtype=np.int64)
    outputs = np.empty_like(inputs)
    for t in range(SEQUENCE_LENGTH):  # T steps, all sequences at once
        outputs[:, t] = lam[state, inputs[:, t]]
        state = delta[state, inputs[:, t]]
    reset = np.zeros((count, SEQUENCE_LENGTH, 1), dtype=np.float32)
    reset[:, 0, 0] = 1.0
    return np.concatenate([reset, _onehot(inputs, INPUTS)], axis=-1), _onehot(outputs, OUTPUTS)


def transducer_data(campaign_seed: int, k: int, data_seed: int) -> SequenceData:
    """Training and evaluation sequences of automaton ``k``: input symbols uniform, from ``data_seed``
    (train from sub-stream ``(seed, 0)``, eval from ``(seed, 1)``)."""
    entry = _book(campaign_seed).get(k)
    train_x, train_y = _sequences(entry.machine, Stream(data_seed, 0), SIZES[0])
    eval_x, eval_y = _sequences(entry.machine, Stream(data_seed, 1), SIZES[1])
    meta: dict[str, Any] = {
        "generator": _GENERATOR,
        "workload": "ds3",
        "campaign_seed": campaign_seed,
        "automaton": k,
        "sha256": entry.sha256,
        "candidate_attempt": entry.attempt,
        **entry.machine.table(),
        "sequence_length": SEQUENCE_LENGTH,
        "train_sequences": SIZES[0],
        "eval_sequences": SIZES[1],
        "input_encoding": "x_t = [reset_t, onehot(a_t)], reset_t = 1 only at t = 0",
        "output_encoding": "y_t = onehot(output_t), output_t = outputs[s_t][a_t] before the transition",
    }
    return SequenceData(train_x, train_y, eval_x, eval_y, data_seed, meta)
