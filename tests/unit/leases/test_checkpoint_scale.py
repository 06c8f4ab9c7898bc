"""A lease-book checkpoint of a 100,000-unit campaign in a realistic mid-run state survives a restart.

The size the suite can afford for issue 15's million-unit figures (`mlds bench million` prints those):
scattered successes, failures and live leases, through ``to_bytes``/``from_bytes`` and
through the store (``put_checkpoint``/``get_checkpoint``), every unit's state and attempts kept.
"""

from __future__ import annotations

import random
from pathlib import Path

from mlds_operator.leases.book import LeaseBook
from mlds_operator.storage import manifest as mf
from mlds_operator.storage.store import LocalStore

UNITS = 100_000


def test_a_100k_unit_checkpoint_round_trips_through_the_store(tmp_path: Path) -> None:
    now = [0.0]
    book = LeaseBook(UNITS, max_attempts=3, lease_seconds=600, clock=lambda: now[0], pools=["cpu", "gpu"])
    rng = random.Random(15)
    for n in range(UNITS // 64):  # leases of 64 units; most finish, some fail or are given back
        view = book.grant(f"w{n % 97}", "cpu" if n % 3 else "gpu", 64)
        assert view is not None
        for unit, attempt in zip(view.units, view.attempts, strict=True):
            roll = rng.random()
            pool = "cpu" if n % 3 else "gpu"
            if roll < 0.8:
                book.complete(unit, worker=f"w{n % 97}", pool=pool, attempt=attempt, converged=True)
            elif roll < 0.9:
                book.fail(unit, worker=f"w{n % 97}", pool=pool, attempt=attempt, retry=False)
            # else: left leased (a live lease at checkpoint time)
    store = LocalStore(tmp_path, durable=False)
    data = book.to_bytes()
    mf.put_checkpoint(store, data)
    saved = mf.get_checkpoint(store)
    assert saved == data
    restored = LeaseBook.from_bytes(saved, clock=lambda: now[0], total=UNITS)
    before, after = book.stats(), restored.stats()
    assert (after.succeeded, after.failed, after.total) == (before.succeeded, before.failed, UNITS)
    assert after.succeeded > 0.7 * UNITS
    # Units under a live lease stay leased (a heartbeat re-adopts the lease; expiry frees them otherwise).
    assert (after.pending, after.leased) == (before.pending, before.leased)
    assert after.failed_units == before.failed_units
    for unit in range(UNITS):
        old, new = book.unit(unit), restored.unit(unit)
        assert (new.state, new.attempts) == (old.state, old.attempts)
