"""benchmarks/README.md is what benchmarks/tables.py renders from the results, and every result is a declared row.

Both run the benchmark modules in a child process: they import each other by plain names
(``rows``, ``common``) from the benchmarks folder, which should not enter this test session.
Pure Python, no torch: well under a second each.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=BENCHMARKS, capture_output=True, text=True, timeout=60)


def test_benchmarks_readme_is_generated_from_the_results():
    done = _run("tables.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_result_file_is_a_declared_row():
    code = (
        "import rows; from common import RESULTS; "
        "found = rows.undeclared_results(RESULTS); "
        "assert not found, f'results of no declared row: {found}'; "
        "print(sum(len(r) for r in rows.registries().values()))"
    )
    done = _run("-c", code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(done.stdout) > 0  # the registries hold rows at all
