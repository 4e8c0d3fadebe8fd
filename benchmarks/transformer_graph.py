"""The transformer's top-K from the HNSW graph of its item table, against scoring every item.

Loads a saved transformer (a ``train`` run's ``models/transformer`` folder, or any folder that
``SequentialTransformer.save`` wrote), then for ``--users`` of its fitted users (a seeded draw)
computes each user's exact top-``K`` (every item scored) and the graph's
(``transformer.model.ann_min_items``, :class:`models.ann.Graph`), seen items excluded, and
prints the graph's build time, the time per 1,000 users of each way (median of ``--repeats``)
and the recall of the graph's lists against the exact ones at each K (the share of the exact
top-K items the graph's top-K holds; and with ties, counting a graph item whose score reaches
the exact K-th score), for each graph (``--ef-construction``) at each ``--ef-per-result``.

    .venv/bin/python benchmarks/transformer_graph.py outputs/demo/<run>/models/transformer
    .venv/bin/python benchmarks/transformer_graph.py /tmp/graph30m --demo-events 30000000

With ``--demo-events N`` the model is first made in the folder (unless it is there): the
catalogue of the built-in demo shop of ``N`` events (titles and descriptions encoded by
wordllama), and the events of its first ``--train-users`` users, on which a transformer with item
text is fitted for ``--epochs`` epochs: every catalogue item is in its table (those without
events by their text), so the table has the catalogue's size.

Results: ``benchmarks/results/transformer_graph.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
from record import append_run  # benchmarks/, the script's folder, is on sys.path

from models import transformer as transformer_module
from models.columns import ITEM, SCORE, USER
from models.transformer import SequentialTransformer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "transformer_graph.json"


def timed_lists(model: SequentialTransformer, users: list[str], k: int, exact: bool,
                repeats: int) -> tuple[pd.DataFrame, float]:
    """The lists of ``users`` and the median seconds per 1,000 users."""
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        recs = model.recommend(users, k=k, exact=exact)
        walls.append(time.perf_counter() - start)
    return recs, statistics.median(walls) * 1000 / len(users)


def recall(graph: pd.DataFrame, exact: pd.DataFrame, k: int) -> tuple[float, float]:
    """Share of the exact top-``k`` pairs that the graph's top-``k`` holds; and the same with
    ties: a graph item whose score reaches the exact ``k``-th score counts (items of equal
    vectors, such as catalogue items with the same text and no events, tie)."""
    want = exact[exact["rank"] <= k]
    got = graph[graph["rank"] <= k]
    same = len(want[[USER, ITEM]].merge(got[[USER, ITEM]], on=[USER, ITEM]))
    kth = want.groupby(USER)[SCORE].min().rename("kth")
    reached = got.join(kth, on=USER)
    tied = int((reached[SCORE] >= reached["kth"] - 1e-4 * reached["kth"].abs().clip(1)).sum())
    return same / max(len(want), 1), tied / max(len(want), 1)


def demo_model(folder: Path, events: int, users: int, epochs: int) -> None:
    """Fit and save the ``--demo-events`` transformer in ``folder`` (see the module docstring)."""
    from models.item_text import encode_items, encoder_from_spec
    from models.sasrec import TransformerConfig
    from tasks.data.demo_data import generate_shop_batches

    start = time.perf_counter()
    items, batches = generate_shop_batches(events, 0, batch_users=users)
    first = next(batches)
    vectors = encode_items(items, encoder_from_spec("wordllama"))
    model = SequentialTransformer(TransformerConfig(epochs=epochs, num_threads=None))
    model.fit(first, items=items, item_vectors=vectors)
    model.save(folder)
    print(f"fitted on {first.height:,} events of {users:,} users with {items.height:,} "  # noqa: T201
          f"catalogue items in {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a saved SequentialTransformer folder")
    parser.add_argument("--users", type=int, default=2000, help="users drawn (2000)")
    parser.add_argument("--ks", type=int, nargs="+", default=[200, 20], help="K (200 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way (3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ef-per-result", type=int, nargs="+",
                        default=[transformer_module.GRAPH_EF_PER_RESULT],
                        help="graph candidates per wanted item (efSearch / n), each measured")
    parser.add_argument("--ef-construction", type=int, nargs="+",
                        default=[transformer_module.GRAPH_EF_CONSTRUCTION],
                        help="graph candidates while linking an item, each built and measured")
    parser.add_argument("--demo-events", type=int, default=None,
                        help="make the model first: the demo shop's catalogue at this size")
    parser.add_argument("--train-users", type=int, default=5000,
                        help="with --demo-events: users whose events it is fitted on (5000)")
    parser.add_argument("--epochs", type=int, default=3, help="with --demo-events (3)")
    args = parser.parse_args()
    if args.demo_events and not (args.model / "config.json").is_file():
        demo_model(args.model, args.demo_events, args.train_users, args.epochs)
    model = SequentialTransformer.load(args.model)
    fitted = model.sequences_.users
    rng = np.random.default_rng(args.seed)
    users = rng.choice(fitted, min(args.users, len(fitted)), replace=False).tolist()
    k = max(args.ks)
    exact, exact_s = timed_lists(model, users, k, True, args.repeats)
    model.config = dataclasses.replace(model.config, ann_min_items=1)
    items, dims = len(model.item_ids_), model.config.hidden_size
    names = [f"recall@{n}" for n in sorted(args.ks, reverse=True)]
    print(f"\n{items:,} items x {dims} dims, {len(users):,} users, seen items excluded\n")  # noqa: T201
    print("| way | build s | s per 1,000 users (median) | " + " | ".join(  # noqa: T201
        f"{n} | {n} with ties" for n in names) + " |\n|---|---:|---:|"
        + "---:|" * 2 * len(names))
    print(f"| every item scored | | {exact_s:.2f} | " + " | ".join("1 | 1" for _ in names)  # noqa: T201
          + " |")
    rows = []
    for construction in args.ef_construction:
        transformer_module.GRAPH_EF_CONSTRUCTION = construction
        model.__dict__.pop("graph_key_", None)
        start = time.perf_counter()
        model._item_graph()
        build_s = time.perf_counter() - start
        for ef in args.ef_per_result:
            model.graph_.ef_per_result = ef
            graph, graph_s = timed_lists(model, users, k, False, args.repeats)
            recalls = {name: recall(graph, exact, int(name.split("@")[1])) for name in names}
            rows.append({"ef_construction": construction, "ef_per_result": ef,
                         "build_s": build_s, "graph_s_per_1000": graph_s, **recalls})
            print(f"| HNSW graph, efConstruction {construction}, efSearch {ef} x n | "  # noqa: T201
                  f"{build_s:.0f} | {graph_s:.2f} | " + " | ".join(
                      f"{plain:.4f} | {tied:.4f}" for plain, tied in recalls.values()) + " |")
    append_run(RESULTS, model=str(args.model), items=items, dims=dims, users=len(users),
               exact_s_per_1000=exact_s, rows=rows)


if __name__ == "__main__":
    main()
