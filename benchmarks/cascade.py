"""The ranker's cascade: test figures and scoring time at each first stage, against none.

On a finished ``shoprank train`` run, its saved ranker scores the test users' candidates (built
once) with each cascade setting: the first ``trees`` trees score every candidate, each user's
``keep`` best go on to the whole booster (``models.lgbm_ranker``). For each setting it prints
the median wall time of the scoring (``RankingPipeline.rank``: the cascade, the full scores, the
top-K and the fill) over ``--repeats`` runs, the rows the whole booster scored, NDCG@10,
Recall@20 and the cold-target Recall@20 on the test window, and the share of the lists' items
that are those of the ranker without a cascade.

    .venv/bin/python benchmarks/cascade.py outputs/demo/<run>

Results: ``benchmarks/results/cascade.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from new_item_offset import read_run  # benchmarks/, the script's folder, is on sys.path
from record import append_run

from models.columns import ITEM, USER
from models.metrics import evaluate
from tasks.ranking.reranker import MODEL_NAME as RANKER
from tasks.ranking.reranker import RankingPipeline

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cascade.json"
KS = [10, 20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a train run's folder (split/, models/)")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                        help="first-stage trees as shares of the ranker's (0.05 0.1 0.2)")
    parser.add_argument("--keep", type=int, nargs="+", default=[30, 50, 80],
                        help="candidates kept per user (30 50 80)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (3)")
    args = parser.parse_args()
    split, items = read_run(args.run)
    pipe = RankingPipeline.load(args.run / "models" / RANKER)
    ranker, targets = pipe.ranker_, split.test_targets
    users = targets[USER].unique()
    frame = pipe.candidate_frame(users)
    counts = pipe.history_.group_by(ITEM).len("count")
    exclude = pipe.config.candidates.exclude_seen
    trees = ranker.best_iteration_
    settings = [(0, 0)] + [(max(1, round(share * trees)), keep)
                           for share in args.shares for keep in args.keep]
    rows, reference = [], None
    for first, keep in settings:
        ranker.cascade_trees, ranker.cascade_keep = first, keep or 1
        walls = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            recs = pipe.rank(frame, users, max(KS), exclude)
            walls.append(time.perf_counter() - start)
        pairs = recs.select(USER, ITEM)
        reference = pairs if reference is None else reference
        metrics = evaluate(recs, targets, ks=KS, n_items=items.height, item_popularity=counts)
        rows.append({
            "trees": first, "keep": keep, "wall_s": statistics.median(walls), "walls": walls,
            "full_rows": ranker.cascade(frame, max(KS)).height,
            "same_items": pairs.join(reference, on=[USER, ITEM], how="semi").height
            / max(reference.height, 1),
            **{k: metrics.get(k, 0.0) for k in ("ndcg@10", "se.ndcg@10", "recall@20",
                                                 "cold0.recall@20")}})
    base = rows[0]
    print(f"\n{users.len():,} test users, {frame.height:,} candidates, {trees} trees\n")  # noqa: T201
    print("| first stage | rows fully scored | scoring s (median) | vs none | NDCG@10 | "  # noqa: T201
          "Recall@20 | cold0 Recall@20 | items as without |\n|---|---:|---:|---:|---:|---:|"
          "---:|---:|")
    for row in rows:
        name = "none" if not row["trees"] else f"{row['trees']} trees, keep {row['keep']}"
        print(f"| {name} | {row['full_rows']:,} | {row['wall_s']:.2f} | "  # noqa: T201
              f"{row['wall_s'] / base['wall_s']:.2f} | {row['ndcg@10']:.4f} ± "
              f"{row['se.ndcg@10']:.4f} | {row['recall@20']:.4f} | "
              f"{row['cold0.recall@20']:.4f} | {row['same_items']:.3f} |")
    append_run(RESULTS, run=str(args.run), users=users.len(), candidates=frame.height,
               trees=trees, rows=rows)


if __name__ == "__main__":
    main()
