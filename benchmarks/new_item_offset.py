"""The offset for items without events: validation and test figures at each offset.

The transformer (the default): on the split of a finished ``shoprank train`` run (its ``split/``
folder and ``items.parquet``), the transformer with the catalogue's text input is fitted on the
training events with the given settings (early stopping on the validation window), then
refitted on train + validation for its best epoch. Each offset of
:data:`tasks.ranking.study.NEW_ITEM_OFFSETS` is scored on both windows: NDCG@10 and Recall@20
overall, on targets whose item has no event before the window (``cold0``) and on the others
(``warm``); the offset training would choose is marked.

The ranker (``--family lgbm_ranker``): the run's saved ranker (its offset chosen on the held-out
groups) scored on the test window at each offset, its candidates and features built once.

    .venv/bin/python benchmarks/new_item_offset.py outputs/demo/<run>
    .venv/bin/python benchmarks/new_item_offset.py outputs/demo/<run> --family lgbm_ranker
    .venv/bin/python benchmarks/new_item_offset.py outputs/demo/<run> \\
        --params '{"hidden_size": 64, "n_blocks": 1, "n_heads": 1, "dropout": 0.12, \\
                   "max_len": 20, "lr": 0.0015, "n_negatives": 1024, "epochs": 26}'

Results: ``benchmarks/results/new_item_offset.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl
from record import append_run  # benchmarks/, the script's folder, is on sys.path

from models.columns import ITEM, USER
from models.metrics import evaluate
from models.transformer import SequentialTransformer
from tasks.ranking.reranker import MODEL_NAME as RANKER
from tasks.ranking.reranker import RankingPipeline
from tasks.ranking.study import NEW_ITEM_OFFSETS
from tasks.splitting.split import Split
from tasks.transformer.sequence import (
    SequenceConfig,
    catalogue_vectors,
    choose_new_item_offset,
    fit_final,
    full_metrics,
    offset_grid,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "new_item_offset.json"
DEFAULT_PARAMS = {"hidden_size": 64, "n_blocks": 1, "n_heads": 1, "dropout": 0.12323344486728,
                  "max_len": 20, "lr": 0.00153177096281843, "n_negatives": 1024, "epochs": 26}
KS = [10, 20]


def read_run(run: Path) -> tuple[Split, pl.DataFrame]:
    """The split and the items table a ``train`` run wrote."""
    folder = run / "split"
    info = json.loads((folder / "info.json").read_text())
    tables = {name: pl.read_parquet(folder / f"{name}.parquet")
              for name in ("train", "valid_targets", "test_history", "test_targets")}
    return Split(protocol=info["protocol"], **tables), pl.read_parquet(run / "items.parquet")


def transformer_rows(args: argparse.Namespace, split: Split, items: pl.DataFrame
                     ) -> tuple[list[dict], dict]:
    """Validation and test figures of the refitted transformer at each offset; its choice."""
    seen = split.protocol == "leave_one_out"
    config = SequenceConfig(content_encoder=args.encoder)
    vectors = catalogue_vectors(items, config)
    model = SequentialTransformer(config.transformer(args.params)).fit(
        split.train, None, items, None,
        lambda m: full_metrics(m, split.train, split.valid_targets, KS, seen, items.height),
        "ndcg@10", vectors)
    chosen, _, _ = choose_new_item_offset(model, split.train, split.valid_targets, KS, seen,
                                          items.height, "ndcg@10", args.max_loss)
    final = fit_final(split.test_history, items, config, args.params, model.best_epoch_, vectors)
    figures = {window: offset_grid(m, history, targets, KS, seen, items.height, "ndcg@10")
               for window, m, history, targets in (
                   ("valid", model, split.train, split.valid_targets),
                   ("test", final, split.test_history, split.test_targets))}
    rows = [{"offset": valid["offset"], "chosen": valid["offset"] == chosen,
             "valid": {**valid, "recall@20": valid_all["recall@20"]},
             "test": {**test, "recall@20": test_all["recall@20"]}}
            for (valid, valid_all), (test, test_all) in zip(*figures.values(), strict=True)]
    return rows, {"params": args.params, "best_epoch": model.best_epoch_, "chosen": chosen}


def ranker_rows(run: Path, split: Split, items: pl.DataFrame) -> tuple[list[dict], dict]:
    """Test figures of the run's saved ranker at each offset (its own offset marked)."""
    pipe = RankingPipeline.load(run / "models" / RANKER)
    chosen, targets = pipe.ranker_.new_item_offset, split.test_targets
    users = targets[USER].unique()
    frame = pipe.candidate_frame(users)
    counts = pipe.history_.group_by(ITEM).len("count")
    warm = targets.join(counts.select(ITEM), on=ITEM, how="semi")
    rows = []
    for offset in NEW_ITEM_OFFSETS:
        pipe.ranker_.new_item_offset = offset
        recs = pipe.rank(frame, users, max(KS), pipe.config.candidates.exclude_seen)
        metrics = evaluate(recs, targets, ks=KS, n_items=items.height, item_popularity=counts)
        rows.append({"offset": offset, "chosen": offset == chosen, "test": {
            **{k: metrics.get(k, 0.0) for k in ("ndcg@10", "recall@20", "cold0.recall@20")},
            "warm.recall@20": evaluate(recs, warm, ks=[20])["recall@20"]}})
    return rows, {"chosen": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a train run's folder (split/, items.parquet)")
    parser.add_argument("--family", choices=["transformer", RANKER], default="transformer")
    parser.add_argument("--params", type=json.loads, default=DEFAULT_PARAMS,
                        help="the transformer's settings (JSON; default: the built-in shop's "
                        "best trial of 2026-12-07)")
    parser.add_argument("--encoder", default="wordllama")
    parser.add_argument("--max-loss", type=float, default=0.03)
    args = parser.parse_args()
    split, items = read_run(args.run)
    rows, found = (transformer_rows(args, split, items) if args.family == "transformer"
                   else ranker_rows(args.run, split, items))
    names = ("ndcg@10", "recall@20", "cold0.recall@20", "warm.recall@20")
    windows = [w for w in ("valid", "test") if w in rows[0]]
    print("| offset | " + " | ".join(f"{w} {n}" for w in windows for n in names) + " |")
    print("|---:|" + "---:|" * len(windows) * len(names))
    for row in rows:
        cells = [f"{row[w][n]:.4f}" for w in windows for n in names]
        mark = " (chosen)" if row["chosen"] else ""
        print(f"| {row['offset']:+g}{mark} | " + " | ".join(cells) + " |")
    append_run(RESULTS, run=str(args.run), family=args.family, **found, rows=rows)

if __name__ == "__main__":
    main()
