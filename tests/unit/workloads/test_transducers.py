"""ds3's random Mealy transducers (docs/workloads.md §6): the acceptance checks, canonical form, uniqueness, data.

Hand-built machines use few inputs so their tables can be read; the generated ones have 8 inputs.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from mlds_workloads import transducers
from mlds_workloads.transducers import (
    INPUTS,
    OUTPUTS,
    SIZES,
    Mealy,
    automata,
    automaton,
    transducer_data,
)

# 3 states, 2 inputs. States 1 and 2 have the same outputs and the same successors' behaviour: equivalent.
REDUNDANT = Mealy.of(
    transitions=[[1, 2], [1, 0], [2, 0]],
    outputs=[[1, 0], [0, 1], [0, 1]],
)
# 1 input, a chain 0 -> 1 -> 2 -> 2 with outputs 0, 0, 1: states 0 and 1 only differ two steps ahead,
# so partition refinement needs more than one round to separate them.
CHAIN = Mealy.of(transitions=[[1], [2], [2]], outputs=[[0], [0], [1]])
# 3 states, 2 inputs; state 2 is never entered.
UNREACHABLE = Mealy.of(transitions=[[1, 0], [0, 1], [0, 0]], outputs=[[0, 1], [1, 0], [1, 1]])
# 2 states whose output depends on the input only: the same output row everywhere.
STATELESS = Mealy.of(transitions=[[1, 0], [0, 1]], outputs=[[3, 5], [3, 5]])


def test_partition_refinement_finds_equivalent_states() -> None:
    assert REDUNDANT.equivalence_classes() == [0, 1, 1]
    assert not REDUNDANT.is_minimal()


def test_partition_refinement_separates_states_that_differ_later() -> None:
    assert len(set(CHAIN.equivalence_classes())) == 3
    assert CHAIN.is_minimal()
    assert CHAIN.run([0, 0, 0, 0]) == [0, 0, 1, 1]


def test_reachability() -> None:
    assert UNREACHABLE.reachable() == [0, 1]
    assert REDUNDANT.reachable() == [0, 1, 2]


def test_output_depends_on_state() -> None:
    assert not STATELESS.output_depends_on_state()
    assert REDUNDANT.output_depends_on_state()


@pytest.mark.parametrize(
    "machine", [REDUNDANT, UNREACHABLE, STATELESS], ids=["not minimal", "unreachable state", "stateless output"]
)
def test_rejected_machines(machine: Mealy) -> None:
    assert not transducers._acceptable(machine)


def test_canonical_form_by_hand() -> None:
    # BFS from 0 with inputs in order: input 0 reaches old 2 (new 1), input 1 reaches old 1 (new 2).
    m = Mealy.of(transitions=[[2, 1], [1, 0], [0, 1]], outputs=[[0, 1], [2, 3], [4, 5]])
    assert m.canonical() == Mealy.of(transitions=[[1, 2], [0, 2], [2, 0]], outputs=[[0, 1], [4, 5], [2, 3]])
    assert m.canonical().canonical() == m.canonical()


def relabel(m: Mealy, perm: list[int]) -> Mealy:
    """The same machine with state s renamed perm[s] (perm[0] == 0: the start stays state 0)."""
    inverse = {new: old for old, new in enumerate(perm)}
    return Mealy.of(
        transitions=[[perm[t] for t in m.transitions[inverse[s]]] for s in range(m.states)],
        outputs=[m.outputs[inverse[s]] for s in range(m.states)],
    )


@pytest.mark.parametrize("k", range(0, 200, 20))
def test_hash_is_invariant_under_state_relabelling(k: int) -> None:
    m = automaton(1, k)
    rng = np.random.default_rng(k)
    perm = [0, *(s % (m.states - 1) + 1 for s in range(1, m.states))]  # 1 -> 2 -> ... -> n-1 -> 1
    other = relabel(m, perm)
    inputs = rng.integers(0, INPUTS, 40).tolist()
    assert other.run(inputs) == m.run(inputs)  # really the same machine
    assert other.sha256() == m.sha256()
    assert other.canonical() == m
    if m.states > 2:
        assert other != m  # and really relabelled (a reachable machine has no other automorphism)


def test_hash_tells_machines_apart() -> None:
    m = automaton(1, 0)
    changed = [list(row) for row in m.outputs]
    changed[0][0] = (changed[0][0] + 1) % OUTPUTS
    assert Mealy.of(m.transitions, changed).sha256() != m.sha256()


def test_generated_automata_pass_every_check_and_are_unique() -> None:
    machines = automata(7, 3000)
    assert len(machines) == 3000
    for m in machines:
        assert MIN_STATES_OK(m)
        assert len(m.transitions[0]) == INPUTS
        assert all(0 <= o < OUTPUTS for row in m.outputs for o in row)
        assert len(m.reachable()) == m.states
        assert m.is_minimal()
        assert m.output_depends_on_state()
        assert m.canonical() == m
    assert len({m.sha256() for m in machines}) == len(machines)
    # n is drawn uniformly from 2..8 (rejection thins n = 2 a little: it is unreachable or redundant more often).
    counts = collections.Counter(m.states for m in machines)
    assert sorted(counts) == list(range(2, 9))
    assert all(350 < c < 500 for c in counts.values())


def MIN_STATES_OK(m: Mealy) -> bool:
    return transducers.MIN_STATES <= m.states <= transducers.MAX_STATES


@pytest.mark.slow
def test_ten_thousand_automata_are_unique() -> None:
    machines = automata(11, 10_000)
    assert len({m.sha256() for m in machines}) == 10_000


def test_automata_are_reproducible_and_depend_on_the_campaign_seed() -> None:
    fresh = transducers._Book(5)  # a book that shares nothing with the module's cache
    assert [fresh.get(k).machine for k in range(50)] == automata(5, 50)
    assert automaton(5, 49) == fresh.get(49).machine
    assert automata(6, 50) != automata(5, 50)


def test_a_duplicate_candidate_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    real = transducers._candidate

    def candidate(campaign_seed: int, k: int, attempt: int) -> Mealy:
        # Automaton 1's first candidate is a relabelled copy of automaton 0's.
        if k == 1 and attempt == 0:
            m = real(campaign_seed, 0, 0)
            return relabel(m, [0, *range(m.states - 1, 0, -1)])
        return real(campaign_seed, k, attempt)

    monkeypatch.setattr(transducers, "_candidate", candidate)
    book = transducers._Book(99)
    assert real(99, 0, 0).canonical() == book.get(0).machine  # premise: candidate (0, 0) was accepted
    second = book.get(1)
    assert second.attempt == 1
    assert second.sha256 != book.get(0).sha256


def test_transducer_data_follows_the_automaton() -> None:
    data = transducer_data(3, 4, data_seed=1234)
    m = automaton(3, 4)
    for x, y, n in ((data.train_x, data.train_y, SIZES[0]), (data.eval_x, data.eval_y, SIZES[1])):
        assert x.shape == (n, 50, 9)
        assert y.shape == (n, 50, 8)
        assert x.dtype == y.dtype == np.float32
        assert np.array_equal(x[:, 0, 0], np.ones(n))  # reset only at t = 0
        assert not x[:, 1:, 0].any()
        assert np.array_equal(x[..., 1:].sum(-1), np.ones((n, 50)))  # one-hot inputs
        assert np.array_equal(y.sum(-1), np.ones((n, 50)))  # one-hot outputs
        inputs, outputs = x[..., 1:].argmax(-1), y.argmax(-1)
        for a, o in zip(inputs, outputs, strict=True):
            assert o.tolist() == m.run(a.tolist())
    assert data.meta["sha256"] == m.sha256()
    assert data.meta["transitions"] == [list(r) for r in m.transitions]
    assert data.meta["outputs"] == [list(r) for r in m.outputs]
    assert data.meta["automaton"] == 4
    # Input symbols are uniform: each of the 8 about 1/8 of 12,800 steps.
    assert np.all(np.abs(np.bincount(data.train_x[..., 1:].argmax(-1).ravel(), minlength=8) / 12_800 - 1 / 8) < 0.015)


def test_transducer_data_is_reproducible() -> None:
    a, b = transducer_data(3, 2, 77), transducer_data(3, 2, 77)
    assert np.array_equal(a.train_x, b.train_x)
    assert np.array_equal(a.eval_y, b.eval_y)
    assert not np.array_equal(a.train_x, transducer_data(3, 2, 78).train_x)
