"""The resumable driver shared by the long benchmarks: one process per phase, one JSON per phase.

A phase runs in its own process so that its peak memory (``ru_maxrss``) is its own; a phase whose
JSON already exists is skipped, so an interrupted run picks up where it stopped.
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

RESULTS = Path(__file__).resolve().parent / "results"


def run_benchmark(
    script: str,
    name: str,
    phases: list[str],
    settings: dict[str, dict],
    run_phase: Callable[[str, Path, dict, Path], dict],
    summarize: Callable[[Path, str], None],
) -> None:
    """Parse ``--quick`` / ``--only``; run each missing phase in a child process, then ``summarize``.

    Results go to ``benchmarks/results/<name>[_quick]/``. ``run_phase(phase, out_dir, settings[mode],
    root)`` returns the phase's JSON-able result; the child adds its peak RSS and the load average
    at its end, then writes ``root/<phase>.json``. ``summarize(root, mode)`` reads them all.
    """
    doc = sys.modules["__main__"].__doc__
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small subsets and few steps: a smoke test.")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    parser.add_argument("--only", help=f"Comma-separated phases to run (default: all of {','.join(phases)}).")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per phase (default 1: timings stay comparable when another job shares the machine).",
    )
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    root = RESULTS / (f"{name}_quick" if args.quick else name)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.phase:  # child process
        import torch

        torch.set_num_threads(args.threads)
        out = root / args.phase
        out.mkdir(exist_ok=True)
        result = run_phase(args.phase, out, settings[mode], root)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["load_avg_end"] = os.getloadavg()
        result["torch_threads"] = args.threads
        (root / f"{args.phase}.json").write_text(json.dumps(result, indent=2))
        return

    selected = phases
    if args.only:
        unknown = set(args.only.split(",")) - set(phases)
        if unknown:
            raise SystemExit(f"--only: unknown phase(s) {sorted(unknown)}; choose from {phases}.")
        selected = [p for p in phases if p in args.only.split(",")]
    for phase in selected:
        if (root / f"{phase}.json").exists():
            print(f"[skip] {phase}: {root / f'{phase}.json'} exists")
            continue
        print(f"[run] {phase}", flush=True)
        cmd = [sys.executable, script, "--phase", phase, "--threads", str(args.threads)]
        subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
    summarize(root, mode)


def write_summary(root: Path, name: str, summary: dict, plot: Callable[[dict, Path], None]) -> None:
    """``results/<name>[_quick].json`` and ``.png`` beside the phase folder ``root``; the rows printed."""
    out = RESULTS / (f"{name}_quick" if summary["mode"] == "quick" else name)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    if summary["rows"]:
        plot(summary, out.with_suffix(".png"))
    print(json.dumps(summary["rows"], indent=1))
