"""The resumable driver shared by the long benchmarks: one process per row, one JSON per row.

A row (rows.py) runs in its own process so that its peak memory (``ru_maxrss``) is its own; a row
whose JSON already exists is skipped, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from common import RESULTS, write_json
from rows import Row, full_run


def run_benchmark(
    script: str,
    name: str,
    rows: dict[str, Row],
    settings: dict[str, dict],
    run_phase: Callable[[Row, Path, dict, Path], dict],
    summarize: Callable[[Path, str], None],
) -> None:
    """Parse ``--quick`` / ``--only`` / ``--list``; run each missing row in a child process, then ``summarize``.

    Results go to ``benchmarks/results/<name>[_quick]/``. ``run_phase(row, out_dir, settings[mode],
    root)`` returns the row's JSON-able result; the child adds its peak RSS and the load average
    at its end, then writes ``root/<row id>.json``. ``summarize(root, mode)`` reads them all.
    """
    phases = full_run(rows)
    doc = sys.modules["__main__"].__doc__
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small subsets and few steps: a smoke test.")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one row in this process
    parser.add_argument("--only", help=f"Comma-separated row ids to run (default: all of {','.join(phases)}).")
    parser.add_argument(
        "--list", action="store_true", help="Print the declared rows (and which are measured); run nothing."
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per phase (default 1: timings stay comparable when another job shares the machine).",
    )
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    root = RESULTS / (f"{name}_quick" if args.quick else name)
    if args.list:
        _print_rows(rows, root)
        return
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.phase:  # child process
        import torch

        torch.set_num_threads(args.threads)
        out = root / args.phase
        out.mkdir(exist_ok=True)
        result = run_phase(rows[args.phase], out, settings[mode], root)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["load_avg_end"] = os.getloadavg()
        result["torch_threads"] = args.threads
        write_json(root / f"{args.phase}.json", result)
        return

    selected = phases
    if args.only:
        asked = args.only.split(",")
        unknown = set(asked) - set(rows)
        if unknown:
            raise SystemExit(
                f"--only: unknown row(s) {sorted(unknown)}; choose from {list(rows)} (--list describes them)."
            )
        selected = [p for p in rows if p in asked]
    for phase in selected:
        if (root / f"{phase}.json").exists():
            print(f"[skip] {phase}: {root / f'{phase}.json'} exists")
            continue
        print(f"[run] {phase}", flush=True)
        cmd = [sys.executable, script, "--phase", phase, "--threads", str(args.threads)]
        subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
    summarize(root, mode)


def _print_rows(rows: dict[str, Row], root: Path) -> None:
    """One line per row: measured (its JSON exists under ``root``) or not, the id, the label."""
    width = max(len(row_id) for row_id in rows)
    print(f"{len(rows)} rows; results in {root} (x: measured; *: only with --only, not in a plain run)")
    for row_id, row in rows.items():
        mark = ("x" if (root / f"{row_id}.json").exists() else " ") + (" " if row.in_full_run else "*")
        print(f"[{mark}] {row_id:<{width}}  {row.label}")


def read_results(root: Path, rows: dict[str, Row]) -> dict[str, dict]:
    """Every row result under ``root`` by id (sorted by file name); a file of no declared row is an error."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json"))}
    unknown = sorted(set(results) - set(rows))
    if unknown:
        raise SystemExit(
            f"{root} holds results of undeclared rows {unknown}: declare them in the benchmark's rows module "
            "(their id is the file name) or move the files away."
        )
    return results


def write_summary(name: str, summary: dict, plot: Callable[[dict, Path], None]) -> None:
    """``results/<name>[_quick].json`` and ``.png`` (``summary['mode']`` says which); the rows printed."""
    out = RESULTS / (f"{name}_quick" if summary["mode"] == "quick" else name)
    write_json(out.with_suffix(".json"), summary)
    if summary["rows"]:
        plot(summary, out.with_suffix(".png"))
    print(json.dumps(summary["rows"], indent=1))
