"""The repository's documents link only to files inside it.

The README once linked the workload specification at a path outside the repository (``../shared/``),
while `--help`, the README and every dataset README cited its sections; the specification is now
``docs/workloads.md``. Checked: every relative Markdown link of every tracked ``.md`` file resolves
to a file in the checkout, and nothing tracked names the old document.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.stdout.splitlines()]


def test_every_relative_markdown_link_resolves_inside_the_repository() -> None:
    broken = []
    for doc in tracked("*.md"):
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:|^#", target):
                continue  # a URL or an anchor in the same document
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_nothing_names_the_specification_outside_the_repository() -> None:
    old = "MLDS" + "-SPEC"  # spelt apart, so that this file does not name it
    names = [str(p.relative_to(ROOT)) for p in tracked() if p.is_file() and old in p.read_text(errors="ignore")]
    assert names == []
    assert (ROOT / "docs" / "workloads.md").is_file()
