"""The content model and the item encoder: quality on cold targets, and what encoding costs.

For each shop, ``shoprank train`` (every family: baselines, the content model, the transformer
and the LightGBM ranker; registry off) under the project's protocol, in a temporary folder with
its own MLflow store, twice: with the item encoder (the content model, the ranker's content
candidates and text features, the transformer's text input) and without it (``--no-content``);
the test figures of every family, overall and on cold targets (items with at most 0 or 5 events
before the test cut). Then the encoder alone on the shop's catalogue: items per second, the
peak memory of a process that only loads and encodes, and the cache hit of a second run.

    .venv/bin/python benchmarks/content.py                      # the built-in shop and H&M
    .venv/bin/python benchmarks/content.py --shops demo --events 200000
    .venv/bin/python benchmarks/content.py --baselines-only     # no ranker, no transformer
    .venv/bin/python benchmarks/content.py --shops hm --no-ranker --seeds 1 2 3   # seeds

Results: ``benchmarks/results/content.json`` and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import append_run  # benchmarks/, the script's folder, is on sys.path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "content.json"
SHOPS = {"demo": (None, None), "hm": ("hm_sample", "hm")}
LENIENT = {"hm": {"validation__min_catalogue_share": 0.3, "validation__max_duplicate_share": 0.1}}
"""The H&M sample's articles are another sample than its transactions (31% of the events have
one) and 9% of its purchases repeat another the same day: accepted here, with a warning."""
METRICS = ("ndcg@10", "recall@20", "cold0.ndcg@10", "cold0.recall@20", "cold0.users",
           "cold5.recall@20", "cold5.users")


def train_scores(shop: str, events: int, folder: Path, content: bool, models: bool,
                 seed: int = 42, ranker: bool = True) -> tuple[dict, Path]:
    """Test metrics of every family from one ``train`` of ``shop``; and the items file."""
    from flows.config import load_config
    from flows.train import train

    data, fmt = SHOPS[shop]
    overrides = {"output_dir": str(folder / "outputs"), "ranker__enabled": models and ranker,
                 "seed": seed,
                 "transformer__enabled": models, "registry__enabled": False,
                 "data__demo_events": events, "content__enabled": content,
                 # studies of their own, and as many trials on a loaded machine as on an idle one
                 "transformer__storage": f"sqlite:///{folder / 'optuna.db'}",
                 "ranker__storage": f"sqlite:///{folder / 'optuna.db'}",
                 "transformer__timeout_s": None, "ranker__timeout_s": None}
    if data:
        overrides.update(data__path=str(ROOT.parent / "shared" / "data" / data),
                         data__format=fmt, **LENIENT.get(shop, {}))
    result = train(load_config(None, **overrides))
    items = next(Path(result["workdir"]).glob("items.parquet"))
    return {name: {m: stages["test"].get(m) for m in METRICS}
            for name, stages in result["scores"].items()}, items


ENCODE = """
import re, sys, time, polars as pl
from models.item_text import WordLlamaEncoder, encode_items
items = pl.read_parquet(sys.argv[1])
start = time.perf_counter(); encoder = WordLlamaEncoder(); load = time.perf_counter() - start
start = time.perf_counter(); encode_items(items, encoder); took = time.perf_counter() - start
peak = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]
print(items.height, load, took, peak)
"""
"""A fresh process (its peak resident memory, VmHWM, is its own: ``ru_maxrss`` would carry the
parent's peak across ``exec``)."""


def encoder_cost(items: Path, folder: Path) -> dict:
    """Items/s and peak RSS of a process that only encodes; the cache's miss and hit times."""
    import polars as pl

    from tasks.data.item_vectors import cached_vectors

    out = subprocess.run([sys.executable, "-c", ENCODE, str(items)], cwd=ROOT, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout.split()
    n, load, took, rss_kb = int(out[0]), float(out[1]), float(out[2]), int(out[3])
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        _, _, hit = cached_vectors(pl.read_parquet(items), "wordllama", folder / "cache")
        timings.append((hit, time.perf_counter() - start))
    return {"items": n, "load_s": load, "encode_s": took, "items_per_s": n / took,
            "peak_rss_mb": rss_kb / 1024, "miss_s": timings[0][1], "hit_s": timings[1][1],
            "second_was_hit": timings[1][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shops", nargs="*", default=list(SHOPS), choices=list(SHOPS))
    parser.add_argument("--events", type=int, default=200_000, help="events of the demo shop")
    parser.add_argument("--baselines-only", action="store_true",
                        help="no ranker and no transformer (faster)")
    parser.add_argument("--no-ranker", action="store_true", help="no LightGBM ranker")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="run seeds (every stochastic step: the selection holdout, trials)")
    args = parser.parse_args()
    results = []
    for shop in args.shops:
        runs, cost = {}, None
        for seed, content in ((seed, content) for seed in args.seeds for content in (True, False)):
            with tempfile.TemporaryDirectory(prefix="shoprank-content-") as tmp:
                folder = Path(tmp)
                os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
                start = time.perf_counter()
                scores, items = train_scores(shop, args.events, folder, content,
                                             not args.baselines_only, seed, not args.no_ranker)
                name = ("with encoder" if content else "without") + (
                    f", seed {seed}" if len(args.seeds) > 1 else "")
                runs[name] = {"scores": scores, "train_s": time.perf_counter() - start}
                if content and cost is None:
                    cost = encoder_cost(items, folder)
        results.append({"shop": shop, "runs": runs, "encoder": cost})
        print(f"\n### {shop}\n\n| run | family | NDCG@10 | Recall@20 | cold0 NDCG@10 | "  # noqa: T201
              "cold0 Recall@20 | cold0 users | cold5 Recall@20 | cold5 users |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")  # noqa: T201
        for run, found in runs.items():
            for name, m in found["scores"].items():
                cells = " | ".join("" if m.get(k) is None else
                                   (f"{m[k]:.0f}" if k.endswith("users") else f"{m[k]:.4f}")
                                   for k in METRICS)
                print(f"| {run} | {name} | {cells} |")  # noqa: T201
        print(f"\nencoder: {cost['items']:,} items, load {cost['load_s']:.2f} s, "  # noqa: T201
              f"{cost['items_per_s']:,.0f} items/s, peak RSS {cost['peak_rss_mb']:.0f} MB; "
              f"cache miss {cost['miss_s']:.2f} s, hit {cost['hit_s']:.2f} s")
    append_run(RESULTS, args=vars(args), results=results)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.path.insert(0, str(ROOT))
    main()
