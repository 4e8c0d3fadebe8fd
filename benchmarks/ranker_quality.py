"""The tuned LightGBM re-ranker against the baselines, on real data, under each protocol.

    nice -n 10 .venv/bin/python benchmarks/ranker_quality.py                  # both datasets
    nice -n 10 .venv/bin/python benchmarks/ranker_quality.py --dataset taobao --trials 15

* **taobao** (``shared/data/taobao_userbehavior_sample``): time split with the default cut times
  (``tasks.splitting.split.cut_times``: last 10% of events for test, the 10% before for validation),
  targets of every event type, seen items kept (the protocol's default).
* **beauty** (``shared/data/amazon_s3rec``, Amazon Beauty of S3-Rec): leave-one-out, the full
  catalogue ranked, items of the visible history removed.

Baselines are fitted on the training history for validation and refitted on the test history
(``tasks.evaluation.evaluate.score_model``). The ranker learns from the validation window plus
earlier windows cut from the training history, is tuned by Optuna on held-out validation users (a
fresh study in a temporary SQLite file unless ``--storage`` is given), refitted, and scored on the
test window. One markdown table per dataset: test metrics, candidate recall, and the ranker's gain
over the best baseline on NDCG@10.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.columns import ITEM  # noqa: E402
from models.metrics import metrics_table  # noqa: E402
from tasks.data.adapters import load_raw  # noqa: E402
from tasks.evaluation.evaluate import baseline_factories, score_model  # noqa: E402
from tasks.ranking.candidate_sources import CandidateConfig  # noqa: E402
from tasks.ranking.reranker import RankerConfig  # noqa: E402
from tasks.ranking.tune import tune_and_evaluate_lgbm
from tasks.splitting.split import Split, cut_times, leave_one_out, time_split  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KS = [10, 20]
COLUMNS = [f"{m}@{k}" for k in KS for m in ("ndcg", "recall", "hitrate", "mrr")] + ["users"]

DATASETS: dict[str, dict[str, Any]] = {
    "taobao": {
        "path": DATA / "taobao_userbehavior_sample", "format": "taobao",
        "candidates": CandidateConfig(n_candidates=300, n_recent=200, n_repeat=50),
        "extra_windows": 6, "trials": 20,
    },
    "beauty": {
        "path": DATA / "amazon_s3rec", "format": "s3rec",
        "candidates": CandidateConfig(n_candidates=100, n_covis=100),
        "extra_windows": 2, "trials": 8,
    },
}


def load_split(name: str) -> tuple[Split, pl.DataFrame | None, int]:
    """The dataset's split, items table and catalogue size."""
    spec = DATASETS[name]
    raw = load_raw(spec["path"], spec["format"])
    if raw.ordered_only:
        split = leave_one_out(raw.events)
    else:
        split = time_split(raw.events, *cut_times(raw.events))
    ids = raw.events[ITEM]
    if raw.items is not None:
        ids = pl.concat([ids, raw.items[ITEM]])
    return split, raw.items, ids.n_unique()


def run(name: str, args: argparse.Namespace) -> str:
    """Baselines and the tuned ranker on one dataset; returns the markdown report."""
    spec = DATASETS[name]
    split, items, n_items = load_split(name)
    exclude_seen = split.protocol == "leave_one_out"
    results: dict[str, dict[str, float]] = {}
    for model, factory in baseline_factories(recent_days=7.0).items():
        start = time.perf_counter()
        results[model] = score_model(factory, split, KS, n_items, exclude_seen)[0]["test"]
        print(f"{name} {model}: {time.perf_counter() - start:.1f} s", flush=True)
    config = RankerConfig(
        candidates=spec["candidates"], extra_windows=spec["extra_windows"],
        n_trials=args.trials or spec["trials"], num_threads=args.threads, seed=args.seed,
        storage=args.storage or f"sqlite:///{Path(args.workdir) / f'{name}-optuna.db'}",
    )
    start = time.perf_counter()
    ranker = tune_and_evaluate_lgbm(split, items, config, None, Path(args.workdir) / name, KS,
                                    exclude_seen, split.protocol == "leave_one_out", n_items)
    print(f"{name} lgbm_ranker: {time.perf_counter() - start:.1f} s", flush=True)
    results["lgbm_ranker"] = ranker["test"]
    return report(name, split, results, ranker)


def report(name: str, split: Split, results: dict[str, dict[str, float]],
           ranker: dict[str, Any]) -> str:
    """Markdown: test metrics, candidate recall and the gain over the best baseline."""
    best = max((m for m in results if m != "lgbm_ranker"), key=lambda m: results[m]["ndcg@10"])
    gain = results["lgbm_ranker"]["ndcg@10"] / results[best]["ndcg@10"] - 1
    per_user = ranker["candidate_recall"]["test"]["candidates_per_user"]
    recall = {stage: {k: v for k, v in values.items() if k != "candidates_per_user"}
              for stage, values in ranker["candidate_recall"].items()}
    lines = [
        f"### {name}: {split.protocol}, test window "
        f"({split.test_targets['user_id'].n_unique():,} users)", "",
        metrics_table(results, metrics=COLUMNS), "",
        "Candidate recall (share of targets among the candidates, per source and merged):", "",
        metrics_table(recall, digits=3), "",
        f"Candidates per user (test): {per_user:.1f}; best trial {ranker['best_trial']} of "
        f"{ranker['n_trials']}, {ranker['best_iteration']} rounds; "
        f"best params {ranker['best_params']}", "",
        f"**lgbm_ranker vs best baseline ({best}) on NDCG@10: "
        f"{results['lgbm_ranker']['ndcg@10']:.4f} vs {results[best]['ndcg@10']:.4f} "
        f"({gain:+.1%})**",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    parser.add_argument("--trials", type=int, default=None, help="Optuna trials (per dataset)")
    parser.add_argument("--threads", type=int, default=1,
                        help="LightGBM threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: fresh)")
    parser.add_argument("--workdir", default=None, help="Folder for models and the studies")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tasks").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="ranker-quality-") as tmp:
        args.workdir = args.workdir or tmp
        names = list(DATASETS) if args.dataset == "all" else [args.dataset]
        reports = [run(name, args) for name in names]
    print(f"\n## LightGBM ranker vs baselines ({dt.date.today().isoformat()})\n")
    print("\n\n".join(reports))


if __name__ == "__main__":
    main()
