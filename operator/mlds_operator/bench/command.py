"""`mlds bench`: the benchmarks, one module per benchmark, loaded only when its subcommand runs.

Registered in :data:`mlds_cli.main.COMMANDS` as ``bench``. Each benchmark is a click command in its own
module (``bench_<name>.py``) listed in :data:`BENCHMARKS`; importing this group imports none of them,
so `mlds bench leases` never imports torch and `mlds bench train` never starts an HTTP server. A
benchmark prints a small table of figures with the exact settings that produced them.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

__all__ = ["BENCHMARKS", "bench_command"]

#: subcommand -> ("module:attribute" of its click command, one-line help shown by `mlds bench --help`).
BENCHMARKS: dict[str, tuple[str, str]] = {
    "leases": (
        "mlds_operator.bench.leases:bench_leases_command",
        "Leases granted per second over loopback HTTP, and the server's memory, for a 1,000,000-unit campaign.",
    ),
    "cycle": (
        "mlds_operator.bench.cycle:bench_cycle_command",
        "Verified results per second and per server CPU-second: lease, upload, complete, verify, publish.",
    ),
    "million": (
        "mlds_operator.bench.million:bench_million_command",
        "A 1,000,000-unit campaign to Succeeded: checkpoint, reopen, CR status size, manifest, dataset tools.",
    ),
    "run": (
        "mlds_operator.bench.campaign_run:bench_run_command",
        "End to end: `mlds run` of a fixed ds1 campaign against the sum of its training times (overhead).",
    ),
    "campaign": (
        "mlds_operator.bench.campaign:bench_campaign_command",
        "One realistic campaign three ways: one network at a time, fixed stacks, continuous stacks.",
    ),
    "simulate": (
        "mlds_operator.bench.simulate:bench_simulate_command",
        "Fixed against continuous stacks, simulated from a step-time curve and the reference study's epochs.",
    ),
    "load": (
        "mlds_operator.bench.load:bench_load_command",
        "Seconds to load 10,000 pulled networks into a weights matrix (a synthetic dataset in the real layout).",
    ),
    "train": (
        "mlds_operator.bench.train:bench_train_command",
        "Training throughput: one network at a time against the batched trainer.",
    ),
}


class _LazyBenchmarks(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in BENCHMARKS if self._available(name))

    @staticmethod
    def _available(name: str) -> bool:
        module = BENCHMARKS[name][0].split(":")[0]
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in BENCHMARKS or not self._available(cmd_name):
            return None
        module_name, attr = BENCHMARKS[cmd_name][0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # e.g. the operator image has no torch
            raise click.ClickException(
                f"`mlds bench {cmd_name}` needs {exc.name!r}, which is not installed in this environment"
            ) from exc
        command = getattr(module, attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}:{attr} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, BENCHMARKS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Benchmarks"):
                formatter.write_dl(rows)


@click.group("bench", cls=_LazyBenchmarks)
def bench_command() -> None:
    """Benchmarks: training paths, lease API, end to end. Each prints the settings and figures it measured."""
