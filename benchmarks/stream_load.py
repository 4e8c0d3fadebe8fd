"""The flow process's memory while the dask engine loads a large Taobao-format CSV into shards.

Writes the built-in demo shop of ``--events`` events (generated a batch of users at a time) as
one Taobao UserBehavior CSV (``user_id,item_id,category_id,behavior_type,timestamp``, epoch
seconds, ``pv``/``cart``/``fav``/``buy``, with a header since the demo's ids are not numbers;
users one after another, as in the original file), then runs the ``load-sharded`` task on it in
a fresh process and prints that process's wall time and peak resident memory (``VmHWM``), the
shards and the rows. ``--code`` runs another checkout's loader on the same file (before/after).

    .venv/bin/python benchmarks/stream_load.py --events 30000000 --workdir /tmp/taobao30m
    .venv/bin/python benchmarks/stream_load.py --events 30000000 --workdir /tmp/taobao30m \\
        --code /path/to/an/older/checkout

Results: ``benchmarks/results/stream_load.json`` and one line on stdout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from record import append_run  # benchmarks/, the script's folder, is on sys.path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "stream_load.json"
TAOBAO_TYPES = {"view": "pv", "cart": "cart", "fav": "fav", "purchase": "buy"}
LOAD = """
import re, sys, time
from pathlib import Path
sys.path.insert(0, {code!r})
from prefect import flow
from tasks.data.load_shards import load_sharded

@flow(name="stream-load-benchmark")
def load():
    return load_sharded({csv!r}, "taobao", {{}}, {{}}, None, Path({run!r}), 0, 0, None)

start = time.perf_counter()
data = load()
wall = time.perf_counter() - start
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) / 1024
print("RESULT", wall, peak, data.shards, data.rows["events"], data.rows["items"])
"""


def write_taobao_csv(path: Path, events: int, seed: int) -> int:
    """The demo shop of ``events`` events as a Taobao CSV at ``path``; returns its rows."""
    import polars as pl

    sys.path.insert(0, str(ROOT))
    from tasks.data.demo_data import generate_shop_batches

    items, batches = generate_shop_batches(events, seed)
    categories = items.select("item_id", "category_id")
    rows = 0
    with path.open("wb") as out:
        for number, batch in enumerate(batches):
            frame = batch.join(categories, on="item_id", how="left").select(
                "user_id", "item_id", pl.col("category_id").fill_null("0"),
                pl.col("event_type").replace_strict(TAOBAO_TYPES).alias("behavior_type"),
                pl.col("timestamp").dt.epoch("s").alias("timestamp"))
            frame.write_csv(out, include_header=number == 0)
            rows += frame.height
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=30_000_000, help="demo events (30M)")
    parser.add_argument("--seed", type=int, default=0, help="the demo shop's seed (0)")
    parser.add_argument("--workdir", type=Path, required=True,
                        help="folder for the CSV (kept and reused) and the run's shards")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="the checkout whose loader runs (this one by default)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    csv = args.workdir / f"UserBehavior-demo-{args.events}-seed{args.seed}.csv"
    if not csv.is_file():
        start = time.perf_counter()
        partial = csv.with_suffix(".partial")
        rows = write_taobao_csv(partial, args.events, args.seed)
        partial.rename(csv)
        print(f"wrote {rows:,} rows to {csv} in {time.perf_counter() - start:.0f} s")  # noqa: T201
    run = args.workdir / "runs" / time.strftime("%Y%m%dT%H%M%S")
    code = LOAD.format(code=str(args.code.resolve()), csv=str(csv), run=str(run))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=args.workdir)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode or not lines:
        sys.exit(f"the load failed:\n{done.stderr[-3000:]}")
    wall, peak, shards, events, items = (float(v) for v in lines[-1].split()[1:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.code,
                            capture_output=True, text=True).stdout.strip()
    print(f"{csv.stat().st_size / 2**30:.2f} GiB CSV, loader of {commit}: {wall:.0f} s, "  # noqa: T201
          f"flow process peak {peak:,.0f} MiB, {int(events):,} events in {int(shards)} shards, "
          f"{int(items):,} items")
    append_run(RESULTS, args={**vars(args), "workdir": str(args.workdir),
                              "code": str(args.code)}, loader_commit=commit, wall_s=wall,
               peak_mib=peak, shards=int(shards), events=int(events), items=int(items))


if __name__ == "__main__":
    main()
