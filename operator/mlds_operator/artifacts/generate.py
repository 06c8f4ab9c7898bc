"""Write, or check, every file that is generated from code and checked in.

    python -m mlds_operator.artifacts.generate            # rewrite what changed (make generate)
    python -m mlds_operator.artifacts.generate --check    # exit 1 listing stale files (make check-generated, CI)

Generated files are committed so that users can `kubectl apply -f crds/` and reviewers see API changes
in diffs (the kubebuilder convention); the check keeps them from drifting from their source. To add one
(the Helm chart's CRD copy, the Grafana dashboard JSON), append a :class:`GeneratedFile` to
:data:`GENERATED`: a path relative to the repository root and a ``"module:function"`` returning the
file's text. Renderers are imported only when used, so one needing
an optional package does not break the others' imports.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GENERATED", "GeneratedFile", "default_root", "main", "stale", "write"]


@dataclass(frozen=True)
class GeneratedFile:
    """One checked-in file and the function that renders it."""

    path: str  # relative to the repository root, with forward slashes
    renderer: str  # "module:function", the function taking no arguments and returning the text

    def render(self) -> str:
        module_name, attr = self.renderer.split(":")
        function: Callable[[], str] = getattr(importlib.import_module(module_name), attr)
        return function()


GENERATED: tuple[GeneratedFile, ...] = (
    GeneratedFile("crds/trainingcampaigns.mlds.dev.yaml", "mlds_operator.artifacts.crd:render_crd_yaml"),
    GeneratedFile("docs/lease-api.openapi.json", "mlds_operator.leases.http:render_openapi_json"),
    # Helm installs charts/mlds/crds/ verbatim: the same text as crds/, checked like it.
    GeneratedFile("charts/mlds/crds/trainingcampaigns.mlds.dev.yaml", "mlds_operator.artifacts.crd:render_crd_yaml"),
    GeneratedFile("charts/mlds/README.md", "mlds_operator.artifacts.chart_readme:render_chart_readme"),
    GeneratedFile("charts/mlds/rules/mlds.rules.yaml", "mlds_operator.artifacts.alerts:render_rules_yaml"),
    GeneratedFile("charts/mlds/dashboards/mlds.json", "mlds_operator.artifacts.dashboard:render_dashboard_json"),
)


def default_root() -> Path:
    """The repository root when running from a checkout (editable install), else the working directory."""
    candidate = Path(__file__).resolve().parents[3]
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def stale(root: Path, files: Sequence[GeneratedFile] = GENERATED) -> list[tuple[GeneratedFile, str]]:
    """The files whose checked-in text differs from what they render to, each with a unified diff."""
    out: list[tuple[GeneratedFile, str]] = []
    for generated in files:
        target = root / generated.path
        want = generated.render()
        have = target.read_text(encoding="utf-8") if target.is_file() else None
        if have != want:
            diff = difflib.unified_diff(
                (have or "").splitlines(keepends=True),
                want.splitlines(keepends=True),
                fromfile=f"{generated.path} (checked in{'' if have is not None else ': missing'})",
                tofile=f"{generated.path} (generated)",
            )
            out.append((generated, "".join(diff)))
    return out


def write(root: Path, files: Sequence[GeneratedFile] = GENERATED) -> list[str]:
    """Rewrite the files that are stale or missing; return their paths."""
    written: list[str] = []
    for generated, _ in stale(root, files):
        target = root / generated.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(generated.render(), encoding="utf-8")
        written.append(generated.path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlds_operator.artifacts.generate", description=(__doc__ or "").split("\n", 1)[0]
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is stale")
    parser.add_argument("--diff", action="store_true", help="with --check: print what would change")
    parser.add_argument("--root", type=Path, default=None, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root: Path = args.root or default_root()
    if args.check:
        problems = stale(root)
        if not problems:
            print(f"{len(GENERATED)} generated file(s) up to date")
            return 0
        for generated, diff in problems:
            print(f"stale: {generated.path} (from {generated.renderer})", file=sys.stderr)
            if args.diff:
                sys.stderr.write(diff)
        print("run `make generate` and commit the result", file=sys.stderr)
        return 1
    written = write(root)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{len(GENERATED)} generated file(s) already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
