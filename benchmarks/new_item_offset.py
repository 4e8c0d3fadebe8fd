"""The transformer's offset for items without events: validation and test figures at each offset.

On the split of a finished ``shoprank train`` run (its ``split/`` folder and ``items.parquet``),
the transformer with the catalogue's text input is fitted on the training events with the given
settings (early stopping on the validation window), then refitted on train + validation for
its best epoch. Each offset of :data:`tasks.transformer.sequence.NEW_ITEM_OFFSETS` is scored on
both windows: NDCG@10 and Recall@20 overall, on targets whose item has no event before the
window (``cold0``) and on the others (``warm``); the offset training would choose is marked.

    .venv/bin/python benchmarks/new_item_offset.py outputs/demo/<run>
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

from models.transformer import SequentialTransformer
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a train run's folder (split/, items.parquet)")
    parser.add_argument("--params", type=json.loads, default=DEFAULT_PARAMS,
                        help="the transformer's settings (JSON; default: the built-in shop's "
                        "best trial of 2026-12-07)")
    parser.add_argument("--encoder", default="wordllama")
    parser.add_argument("--max-loss", type=float, default=0.03)
    args = parser.parse_args()
    split, items = read_run(args.run)
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
    names = ("ndcg@10", "recall@20", "cold0.recall@20", "warm.recall@20")
    print("| offset | " + " | ".join(f"{w} {n}" for w in ("valid", "test") for n in names) + " |")
    print("|---:|" + "---:|" * 2 * len(names))
    for row in rows:
        cells = [f"{row[w][n]:.4f}" for w in ("valid", "test") for n in names]
        mark = " (chosen)" if row["chosen"] else ""
        print(f"| {row['offset']:+g}{mark} | " + " | ".join(cells) + " |")
    append_run(RESULTS, run=str(args.run), params=args.params, best_epoch=model.best_epoch_,
               chosen=chosen, rows=rows)


if __name__ == "__main__":
    main()
