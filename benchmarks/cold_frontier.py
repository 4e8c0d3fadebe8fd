"""What the ranker can trade for items without events: its candidates' ceiling, and the frontier.

On the split of a finished ``shoprank train`` run (its ``split/`` folder and ``items.parquet``):

1. **Ceiling**: for each depth N, the Recall@N of the test targets whose item has no event
   before the cut (``cold0``) among each user's N nearest items without events in text space
   (the ranker's ``content_new`` source, :class:`tasks.ranking.external_sources.ContentSource`):
   no ranker puts a target in a list its candidates lack. Beside it, the warm targets' Recall@20
   of the text ranker at offset 0 (what "half the warm figure" asks for).
2. **Frontier**: the ranker's training frames built twice, without the item vectors and with them
   (content candidates and text features, ``--n-new`` items without events per user), one fixed
   set of LightGBM parameters (``--params``) fitted with each of ``--seeds``; the text-free
   rankers' test figures, and each text ranker's at every offset of
   :data:`tasks.ranking.study.NEW_ITEM_OFFSETS`, the offset the holdout rule chooses
   (``new_item_max_loss`` 0.02) marked. ``--pseudo P``: a share P of the training candidates
   with events that the user never touched are rewritten to look like items without any
   (every column that is the same for all real such candidates set to that value), so that
   the ranker learns from more "new-looking" positives (as DropoutNet does for embeddings).

    .venv/bin/python benchmarks/cold_frontier.py outputs/demo/<run>
    .venv/bin/python benchmarks/cold_frontier.py outputs/demo/<run> --pseudo 0.1 0.3 --seeds 0
    .venv/bin/python benchmarks/cold_frontier.py <hm run> --n-new 20 100 --seeds 0

Results: ``benchmarks/results/cold_frontier.json`` and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from record import append_run  # benchmarks/, the script's folder, is on sys.path

from models.columns import ITEM, SCORE, USER
from models.item_text import encode_items, encoder_from_spec
from models.lgbm_ranker import top_scored
from models.metrics import evaluate
from tasks.data.prepare import read_split
from tasks.ranking.candidate_sources import LABEL
from tasks.ranking.external_sources import ContentSource
from tasks.ranking.reranker import QUERY, RankerConfig, RankingPipeline, TrainingData
from tasks.ranking.study import NEW_ITEM_OFFSETS
from tasks.ranking.tune import choose_new_item_offset
from tasks.splitting.split import Split

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cold_frontier.json"
PARAMS = {"learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 50,
          "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
          "lambdarank_truncation_level": 20}
DEPTHS = (20, 50, 100, 200, 500)
KS = [10, 20]


def ceiling(split: Split, vectors: pl.DataFrame, depths: tuple[int, ...]) -> dict[int, float]:
    """Recall@N of the cold0 test targets among each user's N nearest items without events."""
    history, targets = split.test_history, split.test_targets
    counts = history.group_by(ITEM).len("count")
    users = targets[USER].unique()
    source = ContentSource(vectors, 1, False, "ceiling", max(depths))
    new = source(history, users)["content_new"]
    ranked = new.with_columns(pl.col(SCORE).rank("ordinal", descending=True).over(USER)
                              .alias("rank"))
    out = {}
    for n in depths:
        metrics = evaluate(ranked.filter(pl.col("rank") <= n), targets, ks=[n],
                           item_popularity=counts)
        out[n] = metrics.get(f"cold0.recall@{n}", 0.0)
    return out


def frames(split: Split, items: pl.DataFrame, vectors: pl.DataFrame | None, n_new: int
           ) -> tuple[TrainingData, pl.DataFrame]:
    """The ranker's training data and its test window's candidates, with or without text."""
    config = RankerConfig()
    config.candidates.n_new = n_new
    pipe = RankingPipeline(config, items, split.protocol == "leave_one_out")
    content = None if vectors is None else ContentSource(
        vectors, config.candidates.n_external, pipe.config.candidates.exclude_seen, "bench",
        n_new)
    data = pipe.training_frames(split, content)
    history, users = split.test_history, split.test_targets[USER].unique()
    pipe.set_history(history)
    test = pipe.pairs(history, users, external=None if content is None else
                      content(history, users), covis=pipe.covis_, vectors=vectors)
    return data, test


def pseudo_new(train: pl.DataFrame, share: float, seed: int) -> tuple[pl.DataFrame, int]:
    """``train`` with a ``share`` of its untouched candidates with events made to look new."""
    new = train.filter(pl.col("i_n_events").fill_null(0) == 0)
    fixed = {}
    for column in train.columns:
        if column in (USER, ITEM, LABEL, QUERY):
            continue
        values = new[column]
        if values.null_count() == values.len():
            fixed[column] = None
        elif values.n_unique() == 1:
            fixed[column] = values.drop_nulls()[0]
    eligible = ((train["i_n_events"].fill_null(0) > 0) & (train["ui_n_events"].fill_null(0) == 0)
                ).to_numpy()
    pick = pl.Series(eligible & (np.random.default_rng(seed).random(train.height) < share))
    out = train.with_columns(pl.when(pick).then(pl.lit(value, dtype=train[column].dtype))
                             .otherwise(pl.col(column)).alias(column)
                             for column, value in fixed.items())
    if "n_sources" in out.columns:  # a new item is proposed by the content sources alone
        content = sum(pl.col(c).is_not_null().cast(pl.Int64) for c in
                      ("rank_content", "rank_content_new") if c in out.columns)
        out = out.with_columns(pl.when(pick).then(content.cast(out["n_sources"].dtype))
                               .otherwise(pl.col("n_sources")).alias("n_sources"))
    return out, int(pick.sum())


def test_figures(scores: np.ndarray, test: pl.DataFrame, split: Split) -> dict[str, float]:
    """NDCG@10, Recall@20, cold0 and warm Recall@20 of the top 20 of ``scores``."""
    counts = split.test_history.group_by(ITEM).len("count")
    targets = split.test_targets
    warm = targets.join(counts.select(ITEM), on=ITEM, how="semi")
    recs = top_scored(test.select(USER, ITEM).with_columns(pl.Series(SCORE, scores)), 20)
    metrics = evaluate(recs, targets, ks=KS, item_popularity=counts)
    return {"ndcg@10": metrics["ndcg@10"], "recall@20": metrics["recall@20"],
            "cold0.recall@20": metrics.get("cold0.recall@20", 0.0),
            "warm.recall@20": evaluate(recs, warm, ks=[20])["recall@20"]}


def fit(data: TrainingData, params: dict[str, Any], seed: int, train: pl.DataFrame | None = None
        ) -> Any:
    """A LightGBM ranker of ``params`` (early stopping on the holdout), its offset chosen."""
    pipe = RankingPipeline(RankerConfig(seed=seed))
    ranker = pipe.new_ranker(params).fit(data.train if train is None else train, data.holdout)
    choose_new_item_offset(ranker, data, KS, "ndcg@10", pipe.config.new_item_max_loss)
    return ranker


def frontier(ranker: Any, test: pl.DataFrame, split: Split) -> list[dict[str, Any]]:
    """The text ranker's test figures at every offset (the chosen one marked)."""
    chosen, ranker.new_item_offset = ranker.new_item_offset, 0.0
    base, new = ranker.predict(test), ranker.new_items(test)
    ranker.new_item_offset = chosen
    return [{"offset": offset, "chosen": offset == chosen,
             **test_figures(base + offset * new, test, split)} for offset in NEW_ITEM_OFFSETS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished `shoprank train` run folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="LightGBM seeds of each fit")
    parser.add_argument("--n-new", type=int, nargs="+", default=[20],
                        help="items without events proposed per user (content_new)")
    parser.add_argument("--pseudo", type=float, nargs="*", default=[],
                        help="shares of untouched candidates made to look new in training")
    parser.add_argument("--params", type=json.loads, default=PARAMS,
                        help="LightGBM parameters (JSON)")
    parser.add_argument("--encoder", default="wordllama")
    args = parser.parse_args()
    split, items = read_split(args.run / "split"), pl.read_parquet(args.run / "items.parquet")
    vectors = encode_items(items, encoder_from_spec(args.encoder))
    found = {"ceiling": ceiling(split, vectors, DEPTHS), "text_free": [], "text": []}
    data, test = frames(split, items, None, 0)
    for seed in args.seeds:
        ranker = fit(data, args.params, seed)
        found["text_free"].append({"seed": seed, **test_figures(ranker.predict(test), test,
                                                                 split)})
    variants = [(n, 0.0) for n in args.n_new] + [(args.n_new[0], p) for p in args.pseudo]
    for n_new, share in variants:
        data, test = frames(split, items, vectors, n_new)
        for seed in args.seeds:
            train, rows = pseudo_new(data.train, share, seed) if share else (None, 0)
            ranker = fit(data, args.params, seed, train)
            found["text"].append({"n_new": n_new, "pseudo": share, "pseudo_rows": rows,
                                  "seed": seed, "rounds": ranker.best_iteration_,
                                  "rows": frontier(ranker, test, split)})
    report(found)
    append_run(RESULTS, args={**vars(args), "run": str(args.run)}, results=found)


def report(found: dict[str, Any]) -> None:
    """Markdown tables of the ceiling, the text-free rankers and each text ranker's frontier."""
    print("\n| depth N | cold0 Recall@N of content_new |\n|---:|---:|")  # noqa: T201
    for n, value in found["ceiling"].items():
        print(f"| {n} | {value:.4f} |")  # noqa: T201
    print("\n| text-free seed | NDCG@10 | Recall@20 | warm Recall@20 |\n|---:|---:|---:|---:|")  # noqa: T201
    for row in found["text_free"]:
        print(f"| {row['seed']} | {row['ndcg@10']:.4f} | {row['recall@20']:.4f} | "  # noqa: T201
              f"{row['warm.recall@20']:.4f} |")
    for fitted in found["text"]:
        print(f"\ntext, n_new {fitted['n_new']}, pseudo {fitted['pseudo']} "  # noqa: T201
              f"({fitted['pseudo_rows']} rows), seed {fitted['seed']}, {fitted['rounds']} rounds"
              "\n\n| offset | NDCG@10 | Recall@20 | cold0 R@20 | warm R@20 | cold0 / warm |"
              "\n|---:|---:|---:|---:|---:|---:|")
        for row in fitted["rows"]:
            ratio = row["cold0.recall@20"] / row["warm.recall@20"] if row["warm.recall@20"] \
                else float("nan")
            print(f"| {row['offset']:+g}{' (chosen)' if row['chosen'] else ''} | "  # noqa: T201
                  f"{row['ndcg@10']:.4f} | {row['recall@20']:.4f} | "
                  f"{row['cold0.recall@20']:.4f} | {row['warm.recall@20']:.4f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
