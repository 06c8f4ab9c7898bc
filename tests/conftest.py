"""Suite-wide test plumbing (fixtures of one area live in its ``*_fixtures.py`` module).

looptime (fake event-loop time, ``@pytest.mark.looptime``) is what lets tests/unit/worker/test_loop.py
run the worker's backoff and heartbeat timers, minutes of them, in no real time against a real lease
server; this module exists only to undo a side effect of its pytest plugin.

One thing belongs to every test: looptime 0.9's ``pytest_pyfunc_call`` asks the event-loop policy for
its loop on *every* test, synchronous ones included, and on Python 3.11 that creates a loop nobody
closes. As soon as something replaces it (``asyncio.run`` in the test, or the next async test's loop),
the orphan is garbage-collected unclosed, and its ``ResourceWarning`` (warnings are errors here) fails
whichever test happens to be running then, far from the cause. So around each synchronous test, inside
looptime's wrapper, the plain loop current when the test starts is held and closed when it ends.
Loops that pytest-asyncio manages are looptime's own class and are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import warnings
from collections.abc import Generator
from typing import Any

import looptime
import pytest


def _current_plain_loop() -> asyncio.AbstractEventLoop | None:
    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = policy.get_event_loop()
        except RuntimeError:  # none current
            return None
    if isinstance(loop, looptime.LoopTimeEventLoop) or loop.is_running() or loop.is_closed():
        return None
    return loop


@pytest.hookimpl(wrapper=True, trylast=True)  # trylast: inside looptime's wrapper, after it made the loop
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, Any, Any]:
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        return (yield)
    leaked = _current_plain_loop()
    try:
        return (yield)
    finally:
        if leaked is not None and not leaked.is_running():
            leaked.close()
            policy = asyncio.get_event_loop_policy()
            with contextlib.suppress(RuntimeError):  # nothing current any more: nothing to unset
                if policy.get_event_loop() is leaked:
                    policy.set_event_loop(None)
