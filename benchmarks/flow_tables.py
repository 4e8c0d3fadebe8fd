"""What the flow process holds when it joins the buckets' co-visitation neighbours (engine dask).

The baselines' and the ranker's reduce tasks each write one bucket of source items' neighbours;
the flow process then joins the bucket files into the stage's ``neighbours.parquet``. This
writes ``--buckets`` synthetic bucket files (``--items`` source items, ``--neighbours`` rows each,
string ids like the engine's), then joins them in a fresh process each way, in turn, and prints
each one's wall time and peak resident memory:

* ``whole``: every file read, concatenated and written (the engine until 2026-12-07);
* ``streamed``: :func:`tasks.evaluation.evaluate_shards.join_files` (row groups pass through).

    .venv/bin/python benchmarks/flow_tables.py                       # 1.7M items x 30: 51M rows
    .venv/bin/python benchmarks/flow_tables.py --items 100000 --repeats 1

Results: ``benchmarks/results/flow_tables.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import append_run  # benchmarks/, the script's folder, is on sys.path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "flow_tables.json"
JOIN = """
import re, sys, time
from pathlib import Path
import polars as pl
sys.path.insert(0, {root!r})
from tasks.evaluation.evaluate_shards import join_files
files, out = sorted(Path({folder!r}).glob("bucket-*.parquet")), Path({folder!r}) / "joined.parquet"
start = time.perf_counter()
if {way!r} == "whole":
    pl.concat([pl.read_parquet(f) for f in files]).write_parquet(out)
else:
    join_files(files, out)
wall = time.perf_counter() - start
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) / 1024
rows = pl.scan_parquet(out).select(pl.len()).collect().item()
print(wall, peak, rows)
"""


def write_buckets(folder: Path, items: int, neighbours: int, buckets: int) -> None:
    """``buckets`` files of ``item_id, neighbour, score``: each source item in one bucket."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(0)
    for bucket in range(buckets):
        sources = np.repeat(np.arange(bucket, items, buckets), neighbours)
        pl.DataFrame({
            "item_id": pl.Series(sources).cast(pl.String),
            "neighbour": pl.Series(rng.integers(0, items, len(sources))).cast(pl.String),
            "score": rng.random(len(sources)),
        }).write_parquet(folder / f"bucket-{bucket:05d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_700_000, help="source items (1.7M)")
    parser.add_argument("--neighbours", type=int, default=30, help="neighbours per item (30)")
    parser.add_argument("--buckets", type=int, default=10, help="bucket files (10)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way, in turn (3)")
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"whole": [], "streamed": []}
    with tempfile.TemporaryDirectory(prefix="shoprank-flow-tables-") as tmp:
        write_buckets(Path(tmp), args.items, args.neighbours, args.buckets)
        for _ in range(args.repeats):
            for way in runs:
                code = JOIN.format(root=str(ROOT), folder=tmp, way=way)
                out = subprocess.run([sys.executable, "-c", code], check=True,
                                     capture_output=True, text=True).stdout.split()
                wall, peak, rows = float(out[0]), float(out[1]), int(out[2])
                runs[way].append((wall, peak))
    print(f"\n{rows:,} rows in {args.buckets} files\n\n| join | wall s (median) | "  # noqa: T201
          "peak MiB (median) |\n|---|---:|---:|")
    summary = {}
    for way, found in runs.items():
        summary[way] = {"wall_s": statistics.median(w for w, _ in found),
                        "peak_mib": statistics.median(p for _, p in found), "runs": found}
        print(f"| {way} | {summary[way]['wall_s']:.1f} | {summary[way]['peak_mib']:.0f} |")  # noqa: T201
    append_run(RESULTS, args=vars(args), rows=rows, results=summary)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n{time.perf_counter() - started:.0f} s in all")  # noqa: T201
