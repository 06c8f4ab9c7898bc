"""`mlds validate FILE...`: check campaign files offline, before `kubectl apply` or `mlds run`.

Registered in :data:`mlds_cli.main.COMMANDS`. Every file goes through the one campaign-file loader,
:func:`mlds_contract.files.check_file`: YAML, apiVersion and kind, the CRD's schema (through the
pydantic model it is generated from) and the operator's semantic rules. Each problem is one line,
``FILE:LINE: FIELD: what is wrong`` (with "did you mean" where a close name exists), so editors and CI
logs link it to the place.

Exit status: 0 when every file is valid, 1 when any file has a problem (2 is a usage mistake, as for
every `mlds` command). Imports only click, PyYAML and pydantic: an answer in well under a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from mlds_contract.files import check_file
from mlds_contract.plan import unit_count

__all__ = ["validate_command"]


@click.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--quiet", "-q", is_flag=True, help="Print only problems, no line per valid file.")
def validate_command(files: tuple[Path, ...], quiet: bool) -> None:
    """Check TrainingCampaign files against the CRD schema and the operator's rules, offline.

    \b
    Prints FILE:LINE: FIELD: PROBLEM for each problem; exit status 0 when all files are valid, 1 otherwise.
    Example:
      mlds validate examples/*.yaml
    """
    bad = 0
    for path in files:
        checked = check_file(path)
        for problem in checked.problems:
            click.echo(str(problem), err=True)
        if checked.problems:
            bad += 1
        elif not quiet:
            for campaign in checked.campaigns:
                spec = campaign.spec
                pools = ", ".join(f"{p.name} ({p.accelerator.value})" for p in spec.pools)
                click.echo(
                    f"{path}: ok: {campaign.name}: {spec.workload.dataset.value}, "
                    f"{unit_count(spec):,} networks, pools {pools}"
                )
    if bad:
        click.echo(f"{bad} of {len(files)} file{'s' if len(files) > 1 else ''} invalid", err=True)
        sys.exit(1)
