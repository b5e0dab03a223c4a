"""House rules a green run should not hide: file size budget and a one-line job per file."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted(p for d in ("src", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py"))


def test_every_python_file_is_under_800_lines():
    big = {str(p.relative_to(ROOT)): n for p in FILES
           if (n := len(p.read_text().splitlines())) > 800}
    assert not big, f"split these files (hard budget 800 lines): {big}"


def test_every_module_starts_with_its_job():
    missing = [str(p.relative_to(ROOT)) for p in FILES
               if p.name != "__init__.py" or p.stat().st_size
               if not p.read_text().lstrip().startswith(('"""', "'''", "#!"))]
    assert not missing, f"first line must be a docstring saying the file's job: {missing}"
