"""The README's Layout section names real paths, and every package under ``placer/``."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_paths() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return {p for p in re.findall(r"`([^`\s]+)`", section)
            if p.startswith(("placer/", "tests/", "docs/", "benchmarks/", "notebooks/"))}


def test_every_path_named_in_the_layout_exists():
    paths = _layout_paths()
    assert len(paths) >= 10
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README Layout names paths that do not exist: {missing}"


def test_every_package_is_named_in_the_layout():
    named = _layout_paths()
    packages = sorted(f"placer/{d.name}/" for d in (ROOT / "placer").iterdir()
                      if (d / "__init__.py").is_file())
    assert packages, "no packages found under placer/"
    unnamed = [p for p in packages if p not in named]
    assert not unnamed, f"packages the README's Layout section does not name: {unnamed}"
