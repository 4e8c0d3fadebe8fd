"""Speed of candidate and feature building on the built-in shop (time split).

    nice -n 10 .venv/bin/python benchmarks/features_speed.py                 # 1M events
    nice -n 10 .venv/bin/python benchmarks/features_speed.py --events 200000 --user-chunk 5000

Generates the shop, cuts it with ``tasks.splitting.split.cut_times`` defaults and ``time_split``,
then times each stage of building the ranker's training groups for the validation window:
co-visitation fit on ``split.train``, candidates for every validation user, features, labels, each
in one call. Generation and the split are reported but not counted in the total. Then times
:func:`tasks.ranking.features.candidate_features` (the same three stages, ``--user-chunk`` users at
a time, as the ranker builds them) and checks that it returns the same frame.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.baselines import CoVisitation  # noqa: E402
from models.columns import USER  # noqa: E402
from tasks.data.demo_data import generate_shop  # noqa: E402
from tasks.ranking.candidate_sources import CandidateConfig  # noqa: E402
from tasks.ranking.candidates import (  # noqa: E402
    build_candidates,
    candidate_recall,
    label_candidates,
)
from tasks.ranking.features import USER_CHUNK, build_features, candidate_features  # noqa: E402
from tasks.splitting.split import cut_times, time_split  # noqa: E402


class Timer:
    """Collects wall-clock seconds per stage."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def __call__(self, name: str, func, *args, **kwargs):
        start = time.perf_counter()
        out = func(*args, **kwargs)
        self.stages[name] = time.perf_counter() - start
        print(f"{name:<28} {self.stages[name]:7.2f} s", flush=True)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=CandidateConfig().n_candidates)
    parser.add_argument("--user-chunk", type=int, default=USER_CHUNK,
                        help="users per chunk of candidate_features")
    args = parser.parse_args()
    setup, timer = Timer(), Timer()
    events, items = setup("generate shop (not counted)", generate_shop, args.events, args.seed)
    split = setup("split (not counted)", lambda: time_split(events, *cut_times(events)))
    history, targets = split.train, split.valid_targets
    users = targets[USER].unique()
    print(f"\n{events.height:,} events, {history.height:,} in train, {users.len():,} validation "
          f"users, {items.height:,} items\n")
    config = CandidateConfig(n_candidates=args.candidates)
    covis = timer("co-visitation fit", CoVisitation().fit, history)
    cands = timer("candidates", build_candidates, history, users, covis, config, items)
    feats = timer("features", build_features, cands, history, items, covis)
    labelled = timer("labels", label_candidates, feats, targets)
    total = sum(timer.stages.values())
    print(f"{'total (counted stages)':<28} {total:7.2f} s\n")
    recall = candidate_recall(cands, targets)
    print(f"{labelled.height:,} pairs x {labelled.width} columns; candidate recall "
          f"{recall['all']:.3f}; positives {labelled['label'].sum():,}")
    print(pl.DataFrame({"stage": list(timer.stages), "seconds": list(timer.stages.values())}))
    chunked = timer(f"candidate_features ({args.user_chunk:,} users a chunk)",
                    candidate_features, history, users, covis, config, items=items,
                    targets=targets, user_chunk=args.user_chunk)
    print(f"same frame as the one-call stages: {chunked.equals(labelled)}")


if __name__ == "__main__":
    main()
