"""Run the benchmarks side by side in one process and write one flat JSON object of figures.

    python benchmarks/run.py [--quick] [--only NAME ...] --json FILE

Each ``benchmarks/bench_<name>.py`` has ``run(quick: bool) -> dict[str, float]`` returning
figures named ``<name>.<figure>``. Ratios are measured within the same run. The process's
allocator is set up as the served predictor's is (``pipeline.allocator.keep_freed_memory``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from pipeline.allocator import keep_freed_memory

HERE = Path(__file__).resolve().parent  # also the first entry of sys.path: the bench_* modules import as such


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller configurations, every figure still written")
    parser.add_argument("--only", action="append", choices=available(), help="run only this benchmark (repeatable)")
    parser.add_argument("--json", required=True, type=Path, help="where to write the figures")
    args = parser.parse_args(argv)

    keep_freed_memory()
    figures: dict[str, float] = {}
    for name in args.only or available():
        started = time.perf_counter()
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        module = importlib.import_module(f"bench_{name}")
        results = module.run(quick=args.quick)
        for key, value in results.items():
            print(f"  {key} = {value}", flush=True)
        figures.update(results)
        print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
    args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(figures)} figures to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
