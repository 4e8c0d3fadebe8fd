"""Does the live session help? Offline, on the test window of a finished ``shoprank train`` run.

Each test user's first test-window event(s) become the request's ``recent_items``; the rest of
that user's test targets (the items not given) are what the list must find. Every model family
saved by the run is packaged as the served model would be
(:func:`tasks.release.packaging.build_bundle`: precomputed lists, the session model, the blend) and
answers each user twice, without and with the session; both lists are scored by the one metrics
module.

    .venv/bin/shoprank train                                       # writes outputs/demo/<stamp>
    .venv/bin/python benchmarks/session.py                         # newest run under outputs/
    .venv/bin/python benchmarks/session.py --workdir outputs/demo/<stamp> --session-events 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.columns import ITEM, TIMESTAMP, USER  # noqa: E402
from models.metrics import evaluate  # noqa: E402
from models.serving import DEFAULT_SESSION_WEIGHT, FAMILIES, Request  # noqa: E402
from tasks.data.prepare import read_split  # noqa: E402
from tasks.release.packaging import build_bundle  # noqa: E402  (registers the lgbm_ranker family)

KS = (10, 20)


def newest_run(root: Path) -> Path:
    """The newest run folder (one holding ``split/`` and ``models/``) under ``root``."""
    runs = [p.parent.parent for p in root.glob("*/*/split/info.json")
            if (p.parent.parent / "models").is_dir()]
    if not runs:
        sys.exit(f"no finished train run under {root}: run `shoprank train` first.")
    return max(runs, key=lambda p: p.name)


def session_cases(workdir: Path, n_events: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(sessions, rest)``: each test user's first ``n_events`` test-window items (in order)
    and the test targets that are not among them.
    """
    split = read_split(workdir / "split")
    t_test = dt.datetime.fromisoformat(split.info["t_test"])
    window = (pl.scan_parquet(workdir / "events.parquet")
              .filter(pl.col(TIMESTAMP) >= t_test)
              .join(split.test_targets.select(USER).unique().lazy(), on=USER, how="semi")
              .sort(USER, TIMESTAMP, ITEM)
              .group_by(USER, maintain_order=True).head(n_events)
              .collect())
    sessions = window.group_by(USER, maintain_order=True).agg(pl.col(ITEM).alias("recent"))
    given = window.select(USER, ITEM).unique()
    rest = split.test_targets.join(given, on=[USER, ITEM], how="anti")
    return sessions.join(rest.select(USER).unique(), on=USER, how="semi"), rest


def measure(workdir: Path, family: str, sessions: pl.DataFrame, rest: pl.DataFrame,
            n_items: int, tmp: Path, weights: list[float]) -> list[dict[str, float | str]]:
    """NDCG/Recall of one family's served lists, without and with the session (per weight)."""
    from models.serving import ServingModel

    bundle = build_bundle(tmp / family, family=family, model_dir=workdir / "models" / family,
                          model_root=workdir / "models", split_dir=workdir / "split",
                          config={}, exclude_seen=False)
    serving = ServingModel.load(bundle)
    k = max(KS)

    def scores(with_session: bool) -> dict[str, float]:
        requests = [Request(user, k, tuple(recent) if with_session else ())
                    for user, recent in sessions.iter_rows()]
        return evaluate(serving.answer(requests), rest, ks=KS, n_items=n_items)

    plain = scores(False)
    rows = []
    for weight in weights:
        serving.session_weight = weight
        live = scores(True)
        row: dict[str, float | str] = {"family": family, "weight": weight,
                                       "users": sessions.height}
        for key in ("ndcg@10", "recall@10", "ndcg@20"):
            row[f"{key} plain"], row[f"{key} session"] = plain[key], live[key]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="a run folder (default: the newest)")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs")
    parser.add_argument("--session-events", type=int, default=1,
                        help="first test-window events given as recent_items (1)")
    parser.add_argument("--weights", type=float, nargs="+", default=[DEFAULT_SESSION_WEIGHT],
                        help="session weights to try (the served default)")
    parser.add_argument("--families", nargs="+", help="families to measure (every saved one)")
    args = parser.parse_args()
    workdir = args.workdir or newest_run(args.outputs)
    sessions, rest = session_cases(workdir, args.session_events)
    n_items = pl.read_parquet(workdir / "events.parquet", columns=[ITEM])[ITEM].n_unique()
    families = args.families or [p.name for p in sorted((workdir / "models").iterdir())
                                 if p.is_dir() and p.name in FAMILIES]
    rows = []
    with tempfile.TemporaryDirectory(prefix="shoprank-session-") as tmp:
        for family in families:
            rows += measure(workdir, family, sessions, rest, n_items, Path(tmp), args.weights)
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nrun {workdir}; {args.session_events} session event(s) given; "
          f"{sessions.height} test users with further targets\n")
    print("| family | session weight | NDCG@10 without | NDCG@10 with session | change | "
          "Recall@10 without | Recall@10 with session |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        change = row["ndcg@10 session"] / max(row["ndcg@10 plain"], 1e-12) - 1
        print(f"| {row['family']} | {row['weight']} | {row['ndcg@10 plain']:.4f} | "
              f"{row['ndcg@10 session']:.4f} | {change:+.1%} | {row['recall@10 plain']:.4f} | "
              f"{row['recall@10 session']:.4f} |")


if __name__ == "__main__":
    main()
