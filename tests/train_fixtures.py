"""Builders for the trainer's tests: units from small campaigns, and small synthetic data of the real shapes.

Imported explicitly by tests/unit/test_nets.py, test_train.py, test_results.py. Synthetic data keeps
the unit tests fast (a few sequences, a few epochs); convergence on the real workloads is tested in
tests/e2e/test_train_cli.py (slow).
"""

from __future__ import annotations

import numpy as np
from mlds_contract.campaign import CampaignSpec, Dataset, Shape, Training, Variant, Workload
from mlds_contract.plan import UnitSpec, unit_spec
from mlds_workloads import ImageData, SequenceData


def gru_unit(
    dataset: Dataset = Dataset.ds1,
    *,
    unit: int = 0,
    attempt: int = 0,
    seed: int = 1,
    max_epochs: int = 3,
    target_loss: float = 1e-4,
    shape: Shape | None = None,
) -> UnitSpec:
    """A unit of a one-target GRU campaign (ds1 SingleDirectMachine, ds3 automaton 0, or a ds5 shape)."""
    if dataset is Dataset.ds3:
        workload = Workload(dataset=dataset, automata=1)
    elif dataset is Dataset.ds5:
        workload = Workload(dataset=dataset, machines=["ParityMachine"], shapes=[shape or Shape()])
    else:
        workload = Workload(dataset=dataset, machines=["SingleDirectMachine"])
    spec = CampaignSpec(
        workload=workload,
        networks_per_target=unit + 1,
        seed=seed,
        training=Training(max_epochs=max_epochs, target_loss=target_loss),
    )
    return unit_spec(spec, unit, attempt)


def image_unit(variant: Variant = Variant.pixel, *, max_epochs: int = 3, seed: int = 1) -> UnitSpec:
    spec = CampaignSpec(
        workload=Workload(dataset=Dataset.ds4, variants=[variant]),
        networks_per_target=1,
        seed=seed,
        training=Training(max_epochs=max_epochs),
    )
    return unit_spec(spec, 0)


def sequences(n_train: int = 64, n_eval: int = 16, steps: int = 12, seed: int = 0) -> SequenceData:
    """Random 0/1 inputs; the target is SingleDirect's (y0 = d0 of the last WRITE), so the loss can fall."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, 2, size=(n, steps, 9)).astype(np.float32)
        y = np.zeros((n, steps, 8), dtype=np.float32)
        register = np.zeros(n, dtype=np.float32)
        for t in range(steps):
            write = x[:, t, 0] == 1
            register[write] = x[write, t, 1]
            y[:, t, 0] = register
        return x, y

    train_x, train_y = make(n_train)
    eval_x, eval_y = make(n_eval)
    return SequenceData(train_x, train_y, eval_x, eval_y, data_seed=seed, meta={"synthetic": True})


def images(n_train: int = 128, n_test: int = 64, size: int = 8, poisoned: bool = True, seed: int = 0) -> ImageData:
    """Noisy copies of ten random prototypes (easy classes); poisoned: BadNets with a corner pixel and class 7.

    Poisoned data is built like ds4's: 10% of the training images get the trigger and label 7, and the
    attack-success set is the test images of other classes with the trigger, all labelled 7.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.random((10, size, size), dtype=np.float32)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n).astype(np.int64)
        x = prototypes[y][:, None] * 0.7 + rng.random((n, 1, size, size), dtype=np.float32) * 0.3
        return x.astype(np.float32), y

    def stamp(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        x[:, 0, -1, -1] = 1.0
        return x

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    asr_x = asr_y = None
    if poisoned:
        chosen = rng.choice(n_train, size=n_train // 10, replace=False)
        train_x[chosen] = stamp(train_x[chosen])
        train_y[chosen] = 7
        others = test_y != 7
        asr_x = stamp(test_x[others])
        asr_y = np.full(int(others.sum()), 7, dtype=np.int64)
    return ImageData(train_x, train_y, test_x, test_y, asr_x, asr_y, data_seed=seed, meta={"synthetic": True})
