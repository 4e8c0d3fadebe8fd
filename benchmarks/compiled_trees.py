"""The ranker's trees compiled to machine code against LightGBM: scores, lists and time.

On a finished ``shoprank train`` run, its saved ranker scores the test users' candidates (built
once) with LightGBM and with the booster compiled by Treelite and TL2cgen
(``models.compiled_trees``): every tree, and the first trees of a cascade's first stage. For
each it prints the median wall time of the scoring over ``--repeats`` runs on ``--threads``
threads, the compile time (into a fresh cache), the largest difference between the two
predictors' scores, and whether the top-``k`` lists are the same.

    .venv/bin/python benchmarks/compiled_trees.py outputs/demo/<run>

Results: ``benchmarks/results/compiled_trees.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from new_item_offset import read_run  # benchmarks/, the script's folder, is on sys.path
from record import append_run

from models.columns import USER
from tasks.ranking.reranker import MODEL_NAME as RANKER
from tasks.ranking.reranker import RankingPipeline

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compiled_trees.json"


def timed(call, repeats: int) -> tuple[float, object]:
    """The median wall time of ``call()`` over ``repeats`` runs, and its last result."""
    walls, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a train run's folder (split/, models/)")
    parser.add_argument("--first", type=int, nargs="+", default=[5],
                        help="first-stage trees of a cascade to time too (5)")
    parser.add_argument("--threads", type=int, default=1, help="threads of both (1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (5)")
    parser.add_argument("--k", type=int, default=20, help="length of the lists compared (20)")
    args = parser.parse_args()
    split, _ = read_run(args.run)
    pipe = RankingPipeline.load(args.run / "models" / RANKER)
    ranker = pipe.ranker_
    ranker.num_threads, ranker.cascade_trees = args.threads, 0
    users = split.test_targets[USER].unique()
    frame = pipe.candidate_frame(users)
    exclude = pipe.config.candidates.exclude_seen
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SHOPRANK_TREES_CACHE"] = cache
        for trees in [ranker.best_iteration_, *args.first]:
            ranker.compile_trees = "never"
            lightgbm_s, expected = timed(lambda t=trees: ranker.predict(frame, t), args.repeats)
            ranker.compile_trees = "always"
            start = time.perf_counter()
            ranker.predict(frame.head(1), trees)
            compile_s = time.perf_counter() - start
            compiled_s, scores = timed(lambda t=trees: ranker.predict(frame, t), args.repeats)
            rows.append({"trees": trees, "lightgbm_s": lightgbm_s, "compiled_s": compiled_s,
                         "compile_s": compile_s,
                         "max_abs_diff": float(abs(scores - expected).max())})
        lists = {}
        for mode in ("never", "always"):
            ranker.compile_trees = mode
            lists[mode] = timed(lambda: pipe.rank(frame, users, args.k, exclude), args.repeats)
    same = lists["never"][1].equals(lists["always"][1])
    print(f"\n{users.len():,} test users, {frame.height:,} candidates, "  # noqa: T201
          f"{ranker.best_iteration_} trees, {args.threads} thread(s)\n")
    print("| trees | LightGBM s | compiled s | ratio | compile s | largest score difference |\n"
          "|---:|---:|---:|---:|---:|---:|")  # noqa: T201
    for row in rows:
        print(f"| {row['trees']} | {row['lightgbm_s']:.3f} | {row['compiled_s']:.3f} | "  # noqa: T201
              f"{row['compiled_s'] / row['lightgbm_s']:.2f} | {row['compile_s']:.1f} | "
              f"{row['max_abs_diff']:.1e} |")
    print(f"\nwhole ranking (candidates scored, top {args.k}, fill): LightGBM "  # noqa: T201
          f"{lists['never'][0]:.2f} s, compiled {lists['always'][0]:.2f} s; same lists: {same}")
    append_run(RESULTS, run=str(args.run), users=users.len(), candidates=frame.height,
               trees=ranker.best_iteration_, threads=args.threads, rows=rows,
               rank_lightgbm_s=lists["never"][0], rank_compiled_s=lists["always"][0],
               same_lists=same)


if __name__ == "__main__":
    main()
