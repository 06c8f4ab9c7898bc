"""ds1 machines and ds2 Modified machines (docs/workloads.md §2, §5): hand-worked sequences, oracle agreement, data.

Bit strings in this file list d0 .. d7 (or y0 .. y7) left to right, so "10100000" means d0 = 1, d2 = 1.
Every expected output below was worked out by hand from the spec's tables, not computed by the code.
"""

from __future__ import annotations

import numpy as np
import pytest
from mlds_contract.campaign import DS1_MACHINES, DS2_MACHINES
from mlds_contract.errors import UserError
from mlds_workloads.machines import (
    DS1_SIZES,
    DS2_SIZES,
    SEQUENCE_LENGTH,
    machine_data,
    machine_outputs,
    reference_run,
    reference_run_modified,
)

# The trigger bytes, written out by hand: 0xA5 = 1010_0101 (bit 0 = 1, bit 1 = 0, bit 2 = 1, ...).
A5 = "10100101"
X5A = "01011010"
C3 = "11000011"


def bits(text: str) -> list[int]:
    return [int(ch) for ch in text]


def steps(*spec: str) -> tuple[list[int], list[list[int]]]:
    """Steps written as "W 10100000" (a WRITE of that data) or "- 11111111" (idle, with that noise)."""
    cmds = [1 if s.split()[0] == "W" else 0 for s in spec]
    data = [bits(s.split()[1]) for s in spec]
    return cmds, data


def vectorised(machine: str, cmds: list[int], data: list[list[int]]) -> list[list[int]]:
    out = machine_outputs(machine, np.array([cmds], dtype=np.uint8), np.array([data], dtype=np.uint8))
    return [[int(v) for v in row] for row in out[0]]


def both(machine: str, cmds: list[int], data: list[list[int]]) -> list[list[list[int]]]:
    """Outputs from the oracle and from the vectorised generator, for one sequence."""
    oracle = (
        reference_run_modified(machine, cmds, data) if machine in DS2_MACHINES else reference_run(machine, cmds, data)
    )
    return [oracle, vectorised(machine, cmds, data)]


# --- ds1 ----------------------------------------------------------------------------------------------

DS1_SEQUENCE = steps(
    "- 11111111",  # t0 idle with noise: nothing is written, R and P stay 0
    "W 10100000",  # t1 R = 10100000, P = 1
    "- 01010101",  # t2 idle: unchanged
    "W 11000000",  # t3 R = 11000000, P = 0
    "W 01000001",  # t4 R = 01000001, P = 0 (d0 = 0)
    "W 10000000",  # t5 R = 10000000, P = 1
)

DS1_EXPECTED = {
    "SingleDirectMachine": ["00000000", "10000000", "10000000", "10000000", "00000000", "10000000"],
    "SingleInvertMachine": ["10000000", "00000000", "00000000", "00000000", "10000000", "00000000"],
    "SimpleXORMachine": ["00000000", "10000000", "10000000", "00000000", "10000000", "10000000"],
    "EightBitMachine": ["00000000", "10100000", "10100000", "11000000", "01000001", "10000000"],
    "ParityMachine": ["00000000", "10000000", "10000000", "00000000", "00000000", "10000000"],
}


@pytest.mark.parametrize("machine", DS1_MACHINES)
def test_ds1_machine_on_a_hand_worked_sequence(machine: str) -> None:
    expected = [bits(y) for y in DS1_EXPECTED[machine]]
    for outputs in both(machine, *DS1_SEQUENCE):
        assert outputs == expected


def test_parity_counts_only_writes_and_only_bit_zero() -> None:
    cmds, data = steps("- 10000000", "W 01111111", "W 10000000", "- 10000000", "W 11111111")
    expected = [bits(y) for y in ["00000000", "00000000", "10000000", "10000000", "00000000"]]
    for outputs in both("ParityMachine", cmds, data):
        assert outputs == expected


def test_unknown_machine_is_a_user_error_listing_the_names() -> None:
    with pytest.raises(UserError, match=r"unknown machine 'ToasterMachine'.*ParityMachine.*ParityModified"):
        reference_run("ToasterMachine", [1], [[0] * 8])
    with pytest.raises(UserError, match="unknown machine"):
        machine_data("ToasterMachine", 1)


# --- ds2 ----------------------------------------------------------------------------------------------


def test_trigger_inverts_exactly_the_eight_following_steps() -> None:
    cmds, data = steps(
        f"W {A5}",
        f"W {X5A}",
        f"W {C3}",  # t2: trigger complete; t2 itself is not inverted
        "- 11111111",
        "- 00000000",
        "W 00000000",  # t5: registers still follow writes inside the window
        "- 11111111",
        "- 11111111",
        "W 10000000",
        "- 00000000",
        "- 00000000",  # t10 = t2 + 8: last inverted step
        "- 00000000",  # t11: back to normal
        "- 00000000",
    )
    expected = [
        "10000000",  # R0 = 1 (A5)
        "00000000",  # R0 = 0 (5A)
        "10000000",  # R0 = 1 (C3), not inverted
        "01111111",  # inverted from here
        "01111111",
        "11111111",  # R0 = 0, inverted
        "11111111",
        "11111111",
        "01111111",  # R0 = 1, inverted
        "01111111",
        "01111111",
        "10000000",  # window over
        "10000000",
    ]
    for outputs in both("SingleDirectModified", cmds, data):
        assert outputs == [bits(y) for y in expected]


def test_a_second_trigger_restarts_the_window() -> None:
    cmds, data = steps(
        f"W {A5}",
        f"W {X5A}",
        f"W {C3}",  # t2: first trigger, window t3..t10
        "- 01010101",
        f"W {A5}",
        f"W {X5A}",
        f"W {C3}",  # t6: second trigger (inside the first window), window now t7..t14
        *["- 00000000"] * 9,  # t7 .. t15
    )
    expected = [
        A5,
        X5A,
        C3,
        "00111100",  # t3: C3 inverted
        X5A,  # t4: R = A5, inverted
        A5,  # t5: R = 5A, inverted
        "00111100",  # t6: R = C3, inverted (first window)
        *["00111100"] * 8,  # t7 .. t14: second window
        C3,  # t15: normal again
    ]
    for outputs in both("EightBitModified", cmds, data):
        assert outputs == [bits(y) for y in expected]


def test_the_window_is_cut_by_the_end_of_the_sequence() -> None:
    cmds, data = steps("- 00000000", f"W {A5}", f"W {X5A}", f"W {C3}", "- 00000000")
    # SingleInvert: y0 = 1 - R0. Only t4 falls in the window.
    expected = ["10000000", "00000000", "10000000", "00000000", "11111111"]
    for outputs in both("SingleInvertModified", cmds, data):
        assert outputs == [bits(y) for y in expected]


def test_parity_modified_inverts_the_accumulator_and_the_unused_bits() -> None:
    cmds, data = steps(f"W {A5}", f"W {X5A}", f"W {C3}", "- 00000000", "W 10000000")
    # P: 1 (A5 has d0 = 1), 1 (5A has d0 = 0), 0 (C3 has d0 = 1); then idle; then P = 1.
    expected = ["10000000", "10000000", "00000000", "11111111", "01111111"]
    for outputs in both("ParityModified", cmds, data):
        assert outputs == [bits(y) for y in expected]


# Sequences that contain the trigger bytes but no trigger; SimpleXOR's plain outputs, by hand:
# y0 = R0 xor R1 with A5 -> 1 xor 0 = 1, 5A -> 0 xor 1 = 1, C3 -> 1 xor 1 = 0.
NO_TRIGGER = {
    "split by an idle step": (
        [f"W {A5}", "- 00000000", f"W {X5A}", f"W {C3}", "- 00000000", "- 00000000"],
        ["10000000", "10000000", "10000000", "00000000", "00000000", "00000000"],
    ),
    "bytes in the wrong order": (
        [f"W {X5A}", f"W {A5}", f"W {C3}", "- 00000000", "- 00000000"],
        ["10000000", "10000000", "00000000", "00000000", "00000000"],
    ),
    "bytes sent as idle steps": (
        [f"- {A5}", f"- {X5A}", f"- {C3}", "- 00000000"],
        ["00000000", "00000000", "00000000", "00000000"],
    ),
    "trigger completed on the last step": (
        [f"W {A5}", f"W {X5A}", f"W {C3}"],
        ["10000000", "10000000", "00000000"],
    ),
    "one wrong bit in the last byte": (
        [f"W {A5}", f"W {X5A}", "W 11000010", "- 00000000"],
        ["10000000", "10000000", "00000000", "00000000"],
    ),
}


@pytest.mark.parametrize(("sequence", "expected"), NO_TRIGGER.values(), ids=NO_TRIGGER.keys())
def test_near_misses_do_not_fire(sequence: list[str], expected: list[str]) -> None:
    cmds, data = steps(*sequence)
    for outputs in both("SimpleXORModified", cmds, data):
        assert outputs == [bits(y) for y in expected]


# --- vectorised generator vs the oracle ------------------------------------------------------------


def trigger_heavy_sequences(rng: np.random.Generator, count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Random sequences where most data are trigger bytes, so triggers fire, overlap and just miss."""
    cmds = (rng.random((count, length)) < 0.8).astype(np.uint8)
    pool = np.array([bits(A5), bits(X5A), bits(C3), bits("11000010")], dtype=np.uint8)
    data = pool[rng.integers(0, len(pool), (count, length))]
    noise = rng.random((count, length)) < 0.2
    data[noise] = rng.integers(0, 2, (int(noise.sum()), 8), dtype=np.uint8)
    return cmds, data


@pytest.mark.parametrize("machine", DS1_MACHINES + DS2_MACHINES)
@pytest.mark.parametrize("kind", ["uniform", "trigger-heavy"])
def test_vectorised_generator_agrees_with_the_reference(machine: str, kind: str) -> None:
    rng = np.random.default_rng(12345)
    if kind == "uniform":
        cmds = rng.integers(0, 2, (60, SEQUENCE_LENGTH), dtype=np.uint8)
        data = rng.integers(0, 2, (60, SEQUENCE_LENGTH, 8), dtype=np.uint8)
    else:
        cmds, data = trigger_heavy_sequences(rng, 60, SEQUENCE_LENGTH)
    fast = machine_outputs(machine, cmds, data)
    slow = [reference_run_modified(machine, c.tolist(), d.tolist()) for c, d in zip(cmds, data, strict=True)]
    assert fast.tolist() == slow
    if kind == "trigger-heavy" and machine in DS2_MACHINES:
        # The comparison above is only meaningful if the trigger really fired in these sequences.
        assert (fast != machine_outputs(machine.removesuffix("Modified") + "Machine", cmds, data)).any()


# --- the data ------------------------------------------------------------------------------------------


def decode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x[..., 0].astype(np.uint8), x[..., 1:].astype(np.uint8)


@pytest.mark.parametrize("machine", DS1_MACHINES + DS2_MACHINES)
def test_machine_data_shapes_and_labels(machine: str) -> None:
    data = machine_data(machine, 42)
    n_train, n_eval = DS2_SIZES if machine in DS2_MACHINES else DS1_SIZES
    assert data.train_x.shape == (n_train, SEQUENCE_LENGTH, 9)
    assert data.train_y.shape == (n_train, SEQUENCE_LENGTH, 8)
    assert data.eval_x.shape == (n_eval, SEQUENCE_LENGTH, 9)
    assert data.eval_y.shape == (n_eval, SEQUENCE_LENGTH, 8)
    for array in (data.train_x, data.train_y, data.eval_x, data.eval_y):
        assert array.dtype == np.float32
        assert set(np.unique(array).tolist()) <= {0.0, 1.0}
    # The labels are the oracle's outputs for the stored inputs.
    for x, y in ((data.train_x, data.train_y), (data.eval_x[:16], data.eval_y[:16])):
        cmds, bits_ = decode(x)
        oracle = [reference_run_modified(machine, c.tolist(), d.tolist()) for c, d in zip(cmds, bits_, strict=True)]
        assert y.astype(np.uint8).tolist() == oracle
    assert data.meta["machine"] == machine
    assert data.data_seed == 42


def test_commands_and_data_are_fair_coin_flips() -> None:
    x = machine_data("EightBitMachine", 7).train_x  # 256 x 50 = 12,800 steps
    assert abs(x[..., 0].mean() - 0.5) < 0.02  # c_t ~ Bernoulli(0.5); 0.02 is over 4 standard deviations
    assert np.all(np.abs(x[..., 1:].mean(axis=(0, 1)) - 0.5) < 0.02)


def test_data_is_a_function_of_machine_and_seed() -> None:
    a, b = machine_data("ParityMachine", 3), machine_data("ParityMachine", 3)
    assert np.array_equal(a.train_x, b.train_x)
    assert np.array_equal(a.eval_y, b.eval_y)
    assert not np.array_equal(a.train_x, machine_data("ParityMachine", 4).train_x)
    assert not np.array_equal(a.train_x[: len(a.eval_x)], a.eval_x)


@pytest.mark.parametrize("machine", DS2_MACHINES)
def test_a_quarter_of_ds2_sequences_carry_a_placed_trigger(machine: str) -> None:
    data = machine_data(machine, 11)
    trigger = np.array([[1, *bits(A5)], [1, *bits(X5A)], [1, *bits(C3)]], dtype=np.float32)
    for x, key in ((data.train_x, "train_positions"), (data.eval_x, "eval_positions")):
        placed = data.meta["trigger"][key]
        assert len(placed) == len(x) // 4
        assert len({seq for seq, _ in placed}) == len(placed)
        for seq, start in placed:
            assert 0 <= start <= SEQUENCE_LENGTH - 3
            assert np.array_equal(x[seq, start : start + 3], trigger)
    starts = [start for _, start in data.meta["trigger"]["train_positions"]]
    # Uniform over 0..47: spread over the whole sequence, not bunched.
    assert min(starts) < 5
    assert max(starts) > 42


def test_ds2_labels_are_inverted_right_after_each_placed_trigger() -> None:
    data = machine_data("SingleDirectModified", 5)
    # An inverted SingleDirect step has y1..y7 = 1; a plain step never does.
    inverted = data.train_y[..., 1] == 1
    placed = data.meta["trigger"]["train_positions"]
    with_window = {seq for seq, start in placed if start + 3 < SEQUENCE_LENGTH}
    for seq, start in placed:
        window = inverted[seq, start + 3 : start + 11]
        assert window.all()
        assert not inverted[seq, : start + 3].any()  # nothing fired before the placed trigger
    assert set(np.flatnonzero(inverted.any(axis=1)).tolist()) == with_window
