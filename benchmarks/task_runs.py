"""Per task, the run times of kept ``scale.py`` runs, side by side: which tasks grow with the log.

A run of ``engine: dask`` is made of tasks of a few kinds (a baseline score task per shard, a
ranker refit, ...); Prefect keeps every task run in the database of the run's ``PREFECT_HOME``
(``scale.py`` runs keep theirs when ``PREFECT_HOME`` is set). This reads them through Prefect's
own client (a temporary server on that database, one process per run), keeps the task runs that
computed (state ``Completed``; ``Cached`` ones read a result), and prints per kind: how many,
the median and the sum of their seconds, and the ratio of medians between the first run and each
other. On shards of the same size a kind whose median grows with the log has a cost beyond its
shard (a catalogue-sized table, a larger model); the stage's time is the sum over its tasks
spread over the workers.

    .venv/bin/python benchmarks/task_runs.py --runs 30M=/work/scale/prefect \
        100M=/work/scale/prefect100
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "task_runs.json"
PAGE = 200
SUFFIX = re.compile(r"-(\d+|[0-9a-f]{3})$")
"""A task run's name ends with its shard (``ranker-score-test-00007``) or, for the task runs
that are not named, a short random suffix; the rest is its kind."""
SUBFLOW = "train-shards"
"""The subflow's own run, left out: it spans the stages and finishes in the last attempt only."""


async def read_seconds() -> dict[str, list[float]]:
    """Seconds of every computed task run of this process's ``PREFECT_HOME``, by kind.

    A kind is a task name, numbered when the flow maps it over the shards more than once (the
    baselines' score tasks: ``#1`` the validation users, ``#2`` the test users): within one
    flow run, a map's task runs are all created before the next map's, so the n-th run created
    belongs to map ``n // shards``, counting the cached runs too (``shards``: the flow run's
    ``split-shard`` runs). A resumed run has a flow run per attempt; an attempt stopped
    within a map created only some of its runs.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    created: dict[tuple, list] = defaultdict(list)  # (flow run, name): runs in creation order
    async with get_client() as client:
        offset = 0
        while runs := await client.read_task_runs(sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                                                  limit=PAGE, offset=offset):
            for run in runs:
                if not run.name.startswith(SUBFLOW):
                    created[(run.flow_run_id, SUFFIX.sub("", run.name))].append(run)
            offset += len(runs)
    shards = {flow: len(runs) for (flow, name), runs in created.items() if name == "split-shard"}
    mapped = {name for (flow, name), runs in created.items()  # mapped more than once
              if len(runs) > shards.get(flow, len(runs))}
    seconds: dict[str, list[float]] = defaultdict(list)
    for (flow, name), runs in created.items():
        per_map = shards.get(flow) or len(runs)
        for n, run in enumerate(runs):
            if run.state_name == "Completed" and run.total_run_time:
                kind = f"{name} #{n // per_map + 1}" if name in mapped else name
                seconds[kind].append(run.total_run_time.total_seconds())
    return dict(seconds)


def read_home(home: Path) -> dict[str, list[float]]:
    """:func:`read_seconds` in a child process whose ``PREFECT_HOME`` is ``home``."""
    if not (home / "prefect.db").is_file():
        sys.exit(f"{home} has no prefect.db: give the PREFECT_HOME of a kept run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    out = subprocess.run([sys.executable, __file__, "--read"], capture_output=True, text=True,
                         env={**env, "PREFECT_HOME": str(home)})
    if out.returncode:
        sys.exit(f"reading the task runs of {home} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", metavar="LABEL=PREFECT_HOME",
                        help="kept runs' Prefect homes, the smallest first (e.g. 30M=/path)")
    parser.add_argument("--read", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        print(json.dumps(asyncio.run(read_seconds())))
        return
    if not args.runs or any("=" not in run for run in args.runs):
        parser.error("give --runs LABEL=PREFECT_HOME ...")
    runs = {label: read_home(Path(home)) for label, home in (r.split("=", 1) for r in args.runs)}
    labels = list(runs)
    names = sorted({name for seconds in runs.values() for name in seconds})
    rows = []
    for name in names:
        row: dict = {"task": name}
        for label in labels:
            times = runs[label].get(name, [])
            row[label] = {"n": len(times), "median_s": round(statistics.median(times), 1)
                          if times else None, "sum_s": round(sum(times))}
        rows.append(row)
    head = [f"{label} n | {label} median s | {label} sum s" for label in labels]
    ratios = [f"median {label} / {labels[0]}" for label in labels[1:]]
    print("| task | " + " | ".join(head + ratios) + " |")
    print("|---" + "|---:" * (3 * len(labels) + len(labels) - 1) + "|")
    for row in rows:
        cells = [f"{row[label]['n']} | {row[label]['median_s']} | {row[label]['sum_s']:,}"
                 for label in labels]
        first = row[labels[0]]["median_s"]
        ratio = [f"{row[label]['median_s'] / first:.2f}" if first and row[label]["median_s"]
                 else "" for label in labels[1:]]
        print(f"| {row['task']} | " + " | ".join(cells + ratio) + " |")
    RESULTS.parent.mkdir(exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    previous.append({"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     "machine": platform.node(), "runs": dict(r.split("=", 1) for r in args.runs),
                     "rows": rows})
    RESULTS.write_text(json.dumps(previous, indent=1) + "\n")


if __name__ == "__main__":
    main()
