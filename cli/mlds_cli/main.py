"""The `mlds` entry point.

Subcommands live beside the code they drive and are imported only when invoked, so `mlds train` and
`mlds worker` (the worker image) never import kopf, and `mlds operator` never imports torch.

User mistakes raise :class:`click.ClickException` or :class:`mlds_contract.errors.UserError`: one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import click
from mlds_contract.errors import ExitCode, UserError

#: name -> "module:attribute" of a click command.
COMMANDS: dict[str, str] = {
    "run": "mlds_operator.run.command:run_command",
    "validate": "mlds_cli.validate:validate_command",
    "operator": "mlds_operator.controller.command:operator_command",
    "worker": "mlds_worker.loop:worker_command",
    "train": "mlds_worker.cli:train_command",
    "crd": "mlds_operator.artifacts.crd:crd_command",
    "dataset": "mlds_data.dataset:dataset_group",
    "analyze": "mlds_data.analyze:analyze_command",
    "bench": "mlds_operator.bench.command:bench_command",
}

HELP = {
    "run": "Run a campaign file on this machine (lease server + worker processes).",
    "validate": "Check campaign files offline (schema and operator rules), with file, line and field.",
    "operator": "Run the Kubernetes operator (kopf).",
    "worker": "Lease, train and upload units until the campaign is drained (worker pods).",
    "train": "Train one network and write its result to a folder.",
    "crd": "Print the TrainingCampaign CustomResourceDefinition.",
    "dataset": "Pull, inspect and subset campaign datasets.",
    "analyze": "Classify networks by their weights (docs/workloads.md §10).",
    "bench": "Benchmarks: training paths, lease API, end to end.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if self._available(n))

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or not self._available(cmd_name):
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # e.g. the worker image has no kopf
            raise click.ClickException(
                f"`mlds {cmd_name}` needs {exc.name!r}, which is not installed in this environment"
            ) from exc
        command: Any = getattr(module, attr)
        return command  # type: ignore[no-any-return]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, HELP.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlds")
def cli() -> None:
    """mlds: produce datasets of trained neural networks, on Kubernetes or on one machine."""


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(ExitCode.failed)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.config)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(ExitCode.interrupted)


if __name__ == "__main__":
    main()
