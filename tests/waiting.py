"""Waiting on progress, not on the clock: how every test waits for real processes and servers.

Who uses it: the end-to-end tests (tests/e2e), the operator tests (tests/operator) and their fixtures
modules. A test that waits N seconds for something fails on a machine N times slower, which says
nothing about the product. So a wait here fails only when nothing has *moved* for :data:`STALL_SECONDS`
(minutes): the test names what it waits for and, where there is one, a progress signal (networks
finished, bytes of log written, a status that changes) whose every change restarts the stall period.
A busy machine slows the signal down; only a stuck system stops it.

:data:`HANG_GUARD_SECONDS` is the one hard bound, a safety net for a system that keeps moving without
ever getting there (a livelock); it is far above any honest run and is never the verdict on speed.

- :func:`wait_until` / :func:`wait_until_async` poll a condition (the async one keeps the event loop
  running, for tests that serve something in it); they return the condition's first truthy value.
- :func:`file_sizes` and :func:`cpu_seconds` are the usual progress signals: how much the processes
  under test have written, and how much CPU they have used (a worker training a network writes nothing
  for minutes on a busy machine, but it computes).
- :func:`wait_exit` waits for a subprocess to end, its output (or another signal) as progress.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar, overload

__all__ = [
    "HANG_GUARD_SECONDS",
    "STALL_SECONDS",
    "Progress",
    "cpu_seconds",
    "file_sizes",
    "files_under",
    "wait_exit",
    "wait_until",
    "wait_until_async",
]

T = TypeVar("T")

#: How long nothing may move before a wait gives up. Long enough for a 2-core machine busy with other
#: work to import torch and train an epoch many times over; short enough that a stuck test ends.
STALL_SECONDS = 300.0
#: The safety net against a system that moves but never arrives: no honest wait in this suite comes near.
HANG_GUARD_SECONDS = 1800.0

#: A progress signal: any value that changes when the system under test moves (compared with ``!=``;
#: give it a readable repr, it is quoted when a wait gives up).
Progress = Callable[[], object]


class _Watch:
    """The bookkeeping of one wait: when the signal last moved, and what it said."""

    def __init__(self, what: str, progress: Progress | None, stall: float, guard: float) -> None:
        self.what, self.progress, self.stall, self.guard = what, progress, stall, guard
        self.started = self.moved = time.monotonic()
        self.last: object = progress() if progress is not None else None

    def check(self) -> None:
        """Raise AssertionError if nothing moved for ``stall`` seconds, or the hang guard is reached."""
        now = time.monotonic()
        if self.progress is not None:
            seen = self.progress()
            if seen != self.last:
                self.last, self.moved = seen, now
        if now - self.moved > self.stall:
            raise AssertionError(f"gave up waiting for {self.what}: {self._story(now)}")
        if now - self.started > self.guard:
            raise AssertionError(
                f"gave up waiting for {self.what}: still moving but not there after {now - self.started:.0f} s "
                f"(the hang guard; last progress {self.last!r})"
            )

    def _story(self, now: float) -> str:
        if self.progress is None:
            return f"nothing happened for {now - self.moved:.0f} s (no progress signal)"
        return (
            f"nothing moved for {now - self.moved:.0f} s; the last progress seen was {self.last!r}, "
            f"{self.moved - self.started:.0f} s into a wait of {now - self.started:.0f} s"
        )


def wait_until(
    condition: Callable[[], T | None],
    *,
    what: str,
    progress: Progress | None = None,
    stall: float = STALL_SECONDS,
    interval: float = 0.2,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """Poll ``condition`` until it returns something truthy; fail when ``progress`` stops moving.

    ``alive`` (optional) returns None while what the test waits on still runs, or a description (say a
    process's exit and output) once it has ended, which fails the wait at once.
    """
    watch = _Watch(what, progress, stall, HANG_GUARD_SECONDS)
    while True:
        value = condition()
        if value:
            return value
        ended = alive() if alive is not None else None
        if ended is not None:
            raise AssertionError(f"gave up waiting for {what}: {ended}")
        watch.check()
        time.sleep(interval)


@overload
async def wait_until_async(
    condition: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    progress: Progress | None = None,
    stall: float = STALL_SECONDS,
    interval: float = 0.2,
) -> T: ...


@overload
async def wait_until_async(
    condition: Callable[[], T | None],
    *,
    what: str,
    progress: Progress | None = None,
    stall: float = STALL_SECONDS,
    interval: float = 0.2,
) -> T: ...


async def wait_until_async(
    condition: Callable[[], object],
    *,
    what: str,
    progress: Progress | None = None,
    stall: float = STALL_SECONDS,
    interval: float = 0.2,
) -> object:
    """:func:`wait_until` for tests whose event loop must keep running (a server in the same loop).

    ``condition`` may be a coroutine function; ``progress`` is called in the loop and must be quick.
    """
    watch = _Watch(what, progress, stall, HANG_GUARD_SECONDS)
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        watch.check()
        await asyncio.sleep(interval)


def file_sizes(*places: Path | Iterable[Path]) -> dict[str, int]:
    """Bytes in each file named (or found under a folder named, recursively): what processes have written."""
    sizes: dict[str, int] = {}
    for place in places:
        paths: Iterable[Path] = [place] if isinstance(place, Path) else place
        for path in paths:
            for f in files_under(path):
                try:
                    sizes[str(f)] = f.stat().st_size
                except OSError:  # it went away meanwhile: nothing to count
                    continue
    return sizes


def files_under(path: Path) -> list[Path]:
    """The files at or under ``path`` now; folders that vanish mid-walk (staging swept) are skipped, not raised."""
    if not path.is_dir():
        return [path] if path.is_file() else []
    # os.walk ignores a folder that disappears between listing and entering it; Path.rglob raises.
    return [Path(root, name) for root, _, names in os.walk(path) for name in names]


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds (user and system) the live processes among ``pids`` have used so far, to 0.1 s."""
    ticks = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone: it no longer counts
            continue
        fields = text[text.rindex(")") + 2 :].split()  # from field 3 (state) on; the name may hold spaces
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15: utime and stime, in clock ticks
    return round(ticks / os.sysconf("SC_CLK_TCK"), 1)


def wait_exit(
    popen: subprocess.Popen[bytes] | subprocess.Popen[str],
    *,
    what: str,
    progress: Progress | None = None,
    stall: float = STALL_SECONDS,
) -> int:
    """The exit status of ``popen`` once it ends; killed (and the wait failed) if ``progress`` stalls."""
    try:
        wait_until(lambda: popen.poll() is not None, what=what, progress=progress, stall=stall)
    except BaseException:  # a stall, or an error in the progress probe: never leave the process running
        popen.kill()
        popen.wait()
        raise
    return popen.returncode
