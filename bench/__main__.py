"""`python -m bench [--quick] [--only NAME ...] [--targets NAME ...] [--repeat N]`, `python -m bench soak --minutes 60`,
`python -m bench store`, `python -m bench rolling-restart`, `python -m bench stop-latency`: see bench/README.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from .report import as_json, table, targets_table
from .run import FULL, QUICK, RESULTS, Row, cores, run_one


def main() -> int:
    if sys.argv[1:2] == ["soak"]:
        from .soak import main as soak

        return soak(sys.argv[2:])
    if sys.argv[1:2] == ["rolling-restart"]:
        from .rolling import main as rolling

        return rolling(sys.argv[2:])
    if sys.argv[1:2] == ["stop-latency"]:
        from .stop import main as stop_latency

        return stop_latency(sys.argv[2:])
    if sys.argv[1:2] == ["store"]:
        from .store import main as store

        return store(sys.argv[2:])
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small loads: checks the instrument, not the speed")
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    parser.add_argument("--targets", nargs="*", help="targets to run (direct, naive, rill)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="passes over the scenarios; CPU per token is then judged by the median over the passes",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat takes 1 or more")
    scenarios = [s for s in (QUICK if args.quick else FULL) if not args.only or s.name in args.only]
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rill-bench-") as work:
        # Pass after pass (not each scenario N times in a row): a target and its baseline
        # are measured minutes apart at most, in the same state of a noisy machine.
        for pass_ in range(args.repeat):
            for scenario in scenarios:
                for target in scenario.targets:
                    if args.targets and target not in args.targets:
                        continue
                    shown = f" (pass {pass_ + 1} of {args.repeat})" if args.repeat > 1 else ""
                    print(f"… {scenario.name} / {target}{shown}", file=sys.stderr, flush=True)
                    row = run_one(scenario, target, Path(work))
                    row.round = pass_
                    rows.append(row)
    server_core, bench_core = cores()
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "pinning": f"server on core {server_core}, upstream + client on core {bench_core}"
        if server_core is not None
        else "none (one core)",
        "duration_s": round(time.monotonic() - started, 1),
    }
    print(
        f"\nRill benchmark, {meta['when']}, Python {meta['python']}, {meta['cpus']} CPUs, {meta['pinning']}, "
        f"{meta['duration_s']} s\n"
    )
    print(table(rows))
    print()
    print(targets_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(as_json(rows, meta), indent=2))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
