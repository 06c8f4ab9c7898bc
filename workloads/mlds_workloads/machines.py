"""ds1's five machines and ds2's Modified machines (docs/workloads.md §2 and §5): semantics and data.

Each machine is a tiny device behind a command bus: input ``x_t = [c_t, d_t0 .. d_t7]`` (WRITE when
``c_t = 1``, else idle), an 8-bit register ``R`` (and, for Parity, a 1-bit accumulator ``P``), and
outputs ``y_t`` read after step t is applied. A Modified machine behaves the same, except that after
three consecutive WRITEs of the bytes 0xA5, 0x5A, 0xC3 (bit i of a byte is ``d_i``) the next 8
steps output ``1 - y`` on all 8 bits.

Two implementations on purpose: :func:`reference_run` (the spec's normative function, copied) and
:func:`reference_run_modified` are step-by-step pure Python and serve as the oracle in the tests;
:func:`machine_outputs` is the vectorised NumPy version that builds the data. :func:`machine_data`
is what ``target_data`` calls for ds1, ds2 and ds5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from mlds_contract.campaign import DS1_MACHINES, DS2_MACHINES
from mlds_contract.errors import UserError

from ._random import Stream
from .data import SequenceData

__all__ = [
    "DS1_SIZES",
    "DS2_SIZES",
    "SEQUENCE_LENGTH",
    "TRIGGER_BYTES",
    "TRIGGER_FRACTION",
    "TRIGGER_WINDOW",
    "base_machine",
    "encode_inputs",
    "insert_triggers",
    "machine_data",
    "machine_outputs",
    "random_commands",
    "reference_run",
    "reference_run_modified",
    "trigger_fires",
]

#: Steps per sequence (docs/workloads.md §2).
SEQUENCE_LENGTH = 50
#: (training, evaluation) sequences per machine: ds1 (§2) and ds2 (§5; 256 over-fits ParityModified).
DS1_SIZES = (256, 64)
DS2_SIZES = (1024, 256)
#: The ds2 trigger: three consecutive WRITEs of these bytes; bit i of a byte is d_i.
TRIGGER_BYTES = (0xA5, 0x5A, 0xC3)
#: Steps inverted after the trigger's third write.
TRIGGER_WINDOW = 8
#: Share of ds2 sequences that get a trigger inserted (exactly this share, rounded down).
TRIGGER_FRACTION = 0.25

_BITS = 8
_TRIGGER = np.array([[(byte >> i) & 1 for i in range(_BITS)] for byte in TRIGGER_BYTES], dtype=np.uint8)
_GENERATOR = "mlds-machines/1"  # bump when the data a seed produces changes


def _unknown_machine(name: object) -> UserError:
    return UserError(f"unknown machine {name!r}; expected one of {', '.join(DS1_MACHINES + DS2_MACHINES)}")


def base_machine(name: str) -> str:
    """The ds1 machine a ds1 or ds2 name stands for: ``ParityModified`` -> ``ParityMachine``."""
    if name in DS1_MACHINES:
        return name
    if name in DS2_MACHINES:
        return name.removesuffix("Modified") + "Machine"
    raise _unknown_machine(name)


# --- the oracle -------------------------------------------------------------------------------------


def reference_run(machine: str, cmds: Sequence[int], data: Sequence[Sequence[int]]) -> list[list[int]]:
    """docs/workloads.md §2's normative ``run``, copied as written (plus the unknown-name check)."""
    if machine not in DS1_MACHINES:
        raise _unknown_machine(machine)
    R, P, ys = [0] * 8, 0, []  # noqa: N806 - the spec's names
    for c, d in zip(cmds, data, strict=True):
        if c == 1:
            R = list(d)  # noqa: N806
            P ^= d[0]  # noqa: N806
        y = [0] * 8
        if machine == "EightBitMachine":
            y = list(R)
        elif machine == "SingleDirectMachine":
            y[0] = R[0]
        elif machine == "SingleInvertMachine":
            y[0] = 1 - R[0]
        elif machine == "SimpleXORMachine":
            y[0] = R[0] ^ R[1]
        elif machine == "ParityMachine":
            y[0] = P
        ys.append(y)
    return ys


def reference_run_modified(machine: str, cmds: Sequence[int], data: Sequence[Sequence[int]]) -> list[list[int]]:
    """docs/workloads.md §5 step by step: a ds2 machine (``...Modified``) as a device with a trigger detector.

    Also accepts ds1 names (then no trigger logic), so the tests can run one oracle over both families.
    """
    base = base_machine(machine)
    plain = reference_run(base, cmds, data)
    if machine in DS1_MACHINES:
        return plain
    trigger = [list(row) for row in _TRIGGER.tolist()]
    recent: list[list[int]] = []  # the data of the current run of consecutive WRITEs, last three kept
    inverted_until = -1  # last step of the inversion window
    ys = []
    for t, (c, d, y) in enumerate(zip(cmds, data, plain, strict=True)):
        ys.append([1 - b for b in y] if t <= inverted_until else list(y))
        recent = [*recent[-2:], list(d)] if c == 1 else []
        if recent == trigger:
            inverted_until = t + TRIGGER_WINDOW  # steps t+1 .. t+8; a new trigger restarts the window
    return ys


# --- vectorised -------------------------------------------------------------------------------------


def trigger_fires(cmds: npt.NDArray[np.uint8], data: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """(N, T) bool: True at step t when t is the third of three consecutive trigger WRITEs."""
    writes = [(cmds == 1) & np.all(data == _TRIGGER[i], axis=-1) for i in range(len(TRIGGER_BYTES))]
    fires = np.zeros(cmds.shape, dtype=bool)
    fires[:, 2:] = writes[0][:, :-2] & writes[1][:, 1:-1] & writes[2][:, 2:]
    return fires


def machine_outputs(machine: str, cmds: npt.NDArray[np.uint8], data: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Outputs (N, T, 8) of a ds1 or ds2 machine for commands (N, T) and data (N, T, 8), all 0/1."""
    base = base_machine(machine)
    n, steps = cmds.shape
    step = np.arange(steps)
    # R_t is the data of the last WRITE at or before t (zeros before the first one).
    last_write = np.maximum.accumulate(np.where(cmds == 1, step, -1), axis=1)
    register = np.take_along_axis(data, np.maximum(last_write, 0)[..., None], axis=1)
    register = register * (last_write >= 0)[..., None].astype(np.uint8)
    y = np.zeros((n, steps, _BITS), dtype=np.uint8)
    if base == "EightBitMachine":
        y[:] = register
    elif base == "SingleDirectMachine":
        y[..., 0] = register[..., 0]
    elif base == "SingleInvertMachine":
        y[..., 0] = 1 - register[..., 0]
    elif base == "SimpleXORMachine":
        y[..., 0] = register[..., 0] ^ register[..., 1]
    else:  # ParityMachine: P_t is the xor of d0 over every WRITE up to t
        y[..., 0] = np.cumsum(cmds.astype(np.int64) * data[..., 0], axis=1) % 2
    if machine in DS2_MACHINES:
        # Step s is inverted when a trigger fired at some f in [s-8, s-1]: windows that overlap merge,
        # which is exactly "a new trigger restarts the window". Count fires in that range by prefix sums.
        fired = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(trigger_fires(cmds, data), axis=1)], axis=1)
        inverted = fired[:, step] - fired[:, np.maximum(step - TRIGGER_WINDOW, 0)] > 0
        y = np.where(inverted[..., None], 1 - y, y)
    return y


def random_commands(
    stream: Stream, count: int, length: int = SEQUENCE_LENGTH
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """``count`` random sequences: commands (N, T) with c_t ~ Bernoulli(0.5), data (N, T, 8) fair bits."""
    bits = stream.bits((count, length, 1 + _BITS))
    return np.ascontiguousarray(bits[..., 0]), np.ascontiguousarray(bits[..., 1:])


def insert_triggers(stream: Stream, cmds: npt.NDArray[np.uint8], data: npt.NDArray[np.uint8]) -> list[tuple[int, int]]:
    """Overwrite three steps of ``TRIGGER_FRACTION`` of the sequences (in place) with the trigger WRITEs.

    The sequences are a uniformly random subset of exactly ``floor(N * fraction)``; the first trigger
    step is uniform in ``0 .. T-3`` (so a trigger near the end has its window cut by the sequence end).
    Returns the (sequence, first step) pairs, sorted by sequence.
    """
    n, steps = cmds.shape
    chosen = np.sort(stream.permutation(n)[: int(n * TRIGGER_FRACTION)])
    starts = stream.below(steps - len(TRIGGER_BYTES) + 1, (len(chosen),))
    for seq, start in zip(chosen.tolist(), starts.tolist(), strict=True):
        cmds[seq, start : start + len(TRIGGER_BYTES)] = 1
        data[seq, start : start + len(TRIGGER_BYTES)] = _TRIGGER
    return list(zip(chosen.tolist(), starts.tolist(), strict=True))


def encode_inputs(cmds: npt.NDArray[np.uint8], data: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Network inputs (N, T, 9) float32: ``[c_t, d_t0 .. d_t7]``."""
    return np.concatenate([cmds[..., None], data], axis=-1).astype(np.float32)


def machine_data(machine: str, data_seed: int) -> SequenceData:
    """The training and evaluation sequences of a ds1 or ds2 machine, generated from ``data_seed``.

    Train and eval come from separate sub-streams of the seed (``(seed, 0)`` and ``(seed, 1)``; the
    trigger placement from ``(seed, 2)`` and ``(seed, 3)``), so neither depends on the other's size.
    """
    modified = machine in DS2_MACHINES
    base_machine(machine)  # validates the name
    sizes = DS2_SIZES if modified else DS1_SIZES
    arrays: list[npt.NDArray[np.float32]] = []
    meta: dict[str, Any] = {
        "generator": _GENERATOR,
        "workload": "ds2" if modified else "ds1",
        "machine": machine,
        "sequence_length": SEQUENCE_LENGTH,
        "train_sequences": sizes[0],
        "eval_sequences": sizes[1],
        "write_probability": 0.5,
        "input_encoding": "x_t = [c_t, d_t0..d_t7]",
        "output_encoding": "y_t read after step t (docs/workloads.md §2)",
    }
    if modified:
        meta["trigger"] = {
            "bytes": [f"0x{b:02X}" for b in TRIGGER_BYTES],
            "window": TRIGGER_WINDOW,
            "fraction": TRIGGER_FRACTION,
        }
    for split, count in enumerate(sizes):
        cmds, data = random_commands(Stream(data_seed, split), count)
        if modified:
            placed = insert_triggers(Stream(data_seed, 2 + split), cmds, data)
            meta["trigger"]["train_positions" if split == 0 else "eval_positions"] = [list(p) for p in placed]
        arrays += [encode_inputs(cmds, data), machine_outputs(machine, cmds, data).astype(np.float32)]
    return SequenceData(
        train_x=arrays[0], train_y=arrays[1], eval_x=arrays[2], eval_y=arrays[3], data_seed=data_seed, meta=meta
    )
