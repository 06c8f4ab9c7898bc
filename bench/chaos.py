"""Issue 13's chaos, as a command: kill -9 ``mlds run`` or the operator at random moments, hostile traffic beside.

    python bench/chaos.py run --kills 10        # `mlds run` (alone, or with its workers) SIGKILLed 10 times
    python bench/chaos.py operator --kills 10   # a real operator process SIGKILLed 10 times, its pods live on

Run from the repository root in the development environment (it needs the test harness: the Kubernetes
emulator, the S3 stand-in and the attacker live in tests/, which is why this is not an ``mlds bench``
subcommand: the product's packages never import tests/). The driver is tests/chaos.py; it prints a
table of the kills (moment, what was killed, results done, whether a forged result was in flight, the
restart's time to serve) and the final checks, and exits 1 if any check failed. The same seed gives
the same kill plan; the machine's speed decides the rest.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ is a package there

from tests.chaos import Report, chaos_operator, chaos_run  # after the path it needs

Driver = Callable[..., Awaitable[Report]]


def _options(f: Callable[..., None]) -> Callable[..., None]:
    at_least_one = click.IntRange(min=1)
    options = [  # as --help lists them
        click.option("--kills", default=10, type=at_least_one, show_default=True, help="SIGKILLs before the end."),
        click.option("--units", default=40, type=click.IntRange(min=2), show_default=True, help="ds1 networks."),
        click.option("--workers", default=2, type=at_least_one, show_default=True, help="Worker processes (pods)."),
        click.option("--seed", default=13, show_default=True, help="Seed of the kill plan and the harasser."),
        click.option(
            "--folder",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Where the campaign runs (default: a temporary folder, kept if a check fails).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _chaos(driver: Driver, folder: Path | None, **kwargs: int) -> None:
    where = folder or Path(tempfile.mkdtemp(prefix="mlds-chaos-"))
    report = asyncio.run(driver(where, **kwargs))
    click.echo(report.render())
    if report.failures():
        click.echo(f"the campaign's files are in {where}", err=True)
        sys.exit(1)
    if folder is None:
        shutil.rmtree(where, ignore_errors=True)


@click.group()
def main() -> None:
    """Kill -9 at random moments with hostile completions in flight (issue 13)."""


@main.command("run")
@_options
def run_command(folder: Path | None, **kwargs: int) -> None:
    """`mlds run` of a ds1 campaign, SIGKILLed (alone or with its workers) and restarted --kills times."""
    _chaos(chaos_run, folder, **kwargs)


@main.command("operator")
@_options
def operator_command(folder: Path | None, **kwargs: int) -> None:
    """A real `mlds operator` process, SIGKILLed and restarted --kills times mid-campaign."""
    _chaos(chaos_operator, folder, **kwargs)


if __name__ == "__main__":
    main()
