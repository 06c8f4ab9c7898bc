"""Suite-wide test plumbing (fixtures of one area live in its ``*_fixtures.py`` module).

One thing belongs to every test: looptime 0.9's ``pytest_pyfunc_call`` asks the event-loop policy for
its loop on *every* test, synchronous ones included, and on Python 3.11 that creates a loop nobody
closes. When a later async test installs its own loop, the orphan is garbage-collected unclosed and its
``ResourceWarning`` (warnings are errors here) fails whichever test happens to be running then, far
from the cause. So after each synchronous test, a plain loop left current and idle is closed and
unset. Loops that pytest-asyncio manages are looptime's own class and are left alone.
"""

from __future__ import annotations

import asyncio
import inspect
import warnings
from collections.abc import Iterator

import looptime
import pytest


@pytest.fixture(autouse=True)
def _close_the_loop_a_sync_test_leaves(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        return
    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = policy.get_event_loop()
        except RuntimeError:  # none current: nothing leaked
            return
    if isinstance(loop, looptime.LoopTimeEventLoop) or loop.is_running() or loop.is_closed():
        return
    loop.close()
    policy.set_event_loop(None)
