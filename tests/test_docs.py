"""The facts the code cites live in the repository's own docs/, and every citation resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml", "*.sh"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [ROOT / f for f in out if (ROOT / f).is_file()]


def test_citations_point_into_docs_and_resolve():
    cited = {}
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8")
        outside = ("REFERENCE" + " section", "shared/" + "REFERENCE")  # a file outside the repository
        assert not any(o in text for o in outside), path
        for name in re.findall(r"docs/([\w-]+\.md)", text):
            cited.setdefault(name, []).append(path.name)
    assert {"architecture.md", "generation.md", "pruning.md", "flops.md", "bundle.md", "cuda.md"} <= set(cited)
    missing = {name: where for name, where in cited.items() if not (ROOT / "docs" / name).is_file()}
    assert not missing, missing
