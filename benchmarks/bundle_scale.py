"""A serving bundle the size of the 100M-event shop's, registered, to serve and load-test.

The engine's release writes a lists-only bundle (:meth:`models.serving.ServingModel.
build_from_lists`): every known user's list, their history items, the trending items and the
co-visitation neighbours of the session model. At 10^8 events of the built-in shop that is
2,314,964 users, a catalogue of 1,666,666 items and about 30 neighbours an item (the size of the
100M run's neighbours table; BENCHMARKS.md "The flow process and the buckets' neighbours"). This
script writes a bundle of those sizes with synthetic contents (lists of distinct items at
non-increasing scores, ``--history`` items a user, ``--neighbours`` an item), a part at a time,
and registers it as the engine does (:func:`tasks.release.packaging.package_and_register`) in
a store of its own; the time and size of each step are printed. Then serve it and load-test it:

    .venv/bin/python benchmarks/bundle_scale.py --workdir /tmp/bundle-100m
    .venv/bin/python benchmarks/load.py --label bundle-100m --concurrency 1 8 --seconds 20 \\
        --tracking-uri sqlite:////tmp/bundle-100m/mlflow.db --model-uri models:/bundle-scale/1

Results: ``benchmarks/results/bundle_scale.json`` (and ``load-<label>.json`` of ``load.py``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record import append_run  # noqa: E402  (benchmarks/, the script's folder)

from models.base import POP_RANK  # noqa: E402
from models.columns import ITEM, SCORE, USER  # noqa: E402
from models.serving import EXCLUDE_SLACK, ServingModel  # noqa: E402
from models.user_lists import IdIndex, Vocabulary  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bundle_scale.json"
CHUNK = 100_000


def ids(prefix: str, start: int, end: int) -> pl.Series:
    """``prefix`` + a zero-padded number, for ``start <= n < end``."""
    return pl.select(pl.lit(prefix) + pl.Series(ITEM, np.arange(start, end))
                     .cast(pl.String).str.zfill(8)).to_series().alias(ITEM)


def write_lists(folder: Path, users: int, items: int, depth: int, rng: np.random.Generator
                ) -> None:
    """A :class:`models.user_lists.UserLists` folder: ``depth`` distinct items a user."""
    folder.mkdir(parents=True)
    np.save(folder / "offsets.npy", np.arange(users + 1, dtype=np.int64) * depth)
    codes = np.lib.format.open_memmap(folder / "codes.npy", "w+", np.int32, (users * depth,))
    scores = np.lib.format.open_memmap(folder / "scores.npy", "w+", np.float64,
                                       (users * depth,))
    step = np.linspace(1.0, 0.01, depth)
    for start in range(0, users, CHUNK):
        n = min(CHUNK, users - start)
        first = rng.integers(0, items - depth, n, dtype=np.int64)[:, None]
        codes[start * depth:(start + n) * depth] = (first + np.arange(depth)).ravel()
        scores[start * depth:(start + n) * depth] = np.tile(step, n)
    codes.flush()
    scores.flush()
    del codes, scores
    known = ids("u", 0, users)
    pl.DataFrame({USER: known}).write_parquet(folder / "users.parquet")
    Vocabulary.write(folder, ids("i", 0, items))  # as UserLists.merge_parts writes them
    IdIndex.build(known).save(folder)


def write_history(folder: Path, users: int, items: int, per_user: int,
                  rng: np.random.Generator) -> None:
    """A :class:`models.user_lists.UserItems` folder: ``per_user`` sorted items a user."""
    folder.mkdir(parents=True)
    np.save(folder / "offsets.npy", np.arange(users + 1, dtype=np.int64) * per_user)
    codes = np.lib.format.open_memmap(folder / "codes.npy", "w+", np.int32, (users * per_user,))
    for start in range(0, users, CHUNK):
        n = min(CHUNK, users - start)
        first = rng.integers(0, items - per_user, n, dtype=np.int64)[:, None]
        codes[start * per_user:(start + n) * per_user] = (first + np.arange(per_user)).ravel()
    codes.flush()
    del codes
    Vocabulary.write(folder, ids("i", 0, items))


def write_neighbours(path: Path, items: int, per_item: int) -> None:
    """``item_id, neighbour, score``: the next ``per_item`` items of each item."""
    code = np.repeat(np.arange(items, dtype=np.int64), per_item)
    neighbour = (code + np.tile(np.arange(1, per_item + 1), items)) % items
    frame = pl.DataFrame({"c": code, "n": neighbour,
                          SCORE: np.tile(np.linspace(1.0, 0.1, per_item), items)})
    frame.select((pl.lit("i") + pl.col("c").cast(pl.String).str.zfill(8)).alias(ITEM),
                 (pl.lit("i") + pl.col("n").cast(pl.String).str.zfill(8)).alias("neighbour"),
                 SCORE).write_parquet(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shoprank-bundle-scale"))
    parser.add_argument("--users", type=int, default=2_314_964)
    parser.add_argument("--items", type=int, default=1_666_666)
    parser.add_argument("--max-k", type=int, default=200, help="serve.max_k")
    parser.add_argument("--history", type=int, default=20, help="history items a user")
    parser.add_argument("--neighbours", type=int, default=30, help="neighbours an item")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import mlflow

    from tasks.release.packaging import folder_bytes, package_and_register

    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    depth = args.max_k + EXCLUDE_SLACK
    times = {}
    start = time.perf_counter()
    write_lists(work / "lists", args.users, args.items, depth, rng)
    write_history(work / "history", args.users, args.items, args.history, rng)
    write_neighbours(work / "neighbours.parquet", args.items, args.neighbours)
    pl.DataFrame({ITEM: ids("i", 0, args.items), SCORE: np.linspace(1.0, 0.0, args.items),
                  POP_RANK: np.arange(1, args.items + 1)}).write_parquet(work / "trending.parquet")
    times["synthetic_s"] = time.perf_counter() - start
    start = time.perf_counter()
    bundle = ServingModel.build_from_lists(
        work / "bundle", family="lgbm_ranker", lists=work / "lists", history=work / "history",
        trending=work / "trending.parquet", neighbours=work / "neighbours.parquet",
        items=ids("i", 0, args.items), max_k=args.max_k, default_k=10, session_items=5,
        session_weight=0.5)
    times["bundle_s"] = time.perf_counter() - start
    sizes = {path.name: folder_bytes(path) if path.is_dir() else path.stat().st_size
             for path in sorted(bundle.iterdir())}
    total = folder_bytes(bundle)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "bundle-scale", artifact_location=(work / "artifacts").as_uri()))
    example = pd.DataFrame([{USER: "u00000001", "k": 10, "recent_items": None, "exclude": None},
                            {USER: "a-new-visitor", "k": 5, "recent_items": ["i00000001"],
                             "exclude": []}])
    with mlflow.start_run() as run:
        start = time.perf_counter()
        packaged = package_and_register(
            run.info.run_id, bundle, None, family="lgbm_ranker", model_name="bundle-scale",
            tracking_uri=tracking, tags={}, description="synthetic bundle of the 100M shop's "
            "sizes", example=example)
        times["register_s"] = time.perf_counter() - start
    shutil.rmtree(bundle)  # the registered copy is what is served
    result = {"users": args.users, "items": args.items, "depth": depth,
              "history": args.history, "neighbours": args.neighbours, "bundle_bytes": total,
              "bytes_per_user": total / args.users, "files": sizes, "times": times,
              "artifact_bytes": packaged.artifact_bytes, "load_seconds": packaged.load_seconds,
              "model_uri": packaged.model_uri, "tracking_uri": tracking}
    append_run(RESULTS, args={k: str(v) for k, v in vars(args).items()}, results=result)
    print(f"bundle of {args.users:,} users, {args.items:,} items: {total / 1e9:.2f} GB, "  # noqa: T201
          f"{total / args.users:,.0f} bytes a user; " + ", ".join(
              f"{name} {size / 1e6:,.1f} MB" for name, size in sizes.items()))
    print(", ".join(f"{k} {v:.1f}" for k, v in times.items()),  # noqa: T201
          f"; the pyfunc loads in {packaged.load_seconds:.1f} s; serve {packaged.model_uri} "
          f"from {tracking}")


if __name__ == "__main__":
    main()
