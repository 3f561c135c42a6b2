"""The checkout's own text files: no merge left half done."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFLICT_MARKER = re.compile(r"^(<{7}|={7}|>{7})( |$)", re.M)


def _tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    suffixes = {".py", ".md", ".toml", ".cfg", ".txt", ".yaml", ".yml", ".sh", ""}
    return [ROOT / name for name in listed.splitlines() if Path(name).suffix in suffixes and (ROOT / name).is_file()]


def test_no_merge_conflict_markers():
    found = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
        for path in _tracked_text_files()
        for text in [path.read_text(errors="replace")]
        for match in CONFLICT_MARKER.finditer(text)
    ]
    assert not found, found
