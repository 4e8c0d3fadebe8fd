from __future__ import annotations

import math
import time

import numpy as np
import polars as pl
import pytest

from models.errors import ConfigError, DataError, MissingColumnsError
from models.metrics import (
    COLD_THRESHOLDS,
    cold_metrics_table,
    evaluate,
    merge_partials,
    metrics_table,
    partial_metrics,
    per_user_metrics,
)

KS = (2, 4)


def _recs(lists: dict[str, list[str]]) -> pl.DataFrame:
    rows = [(u, item, r + 1) for u, items in lists.items() for r, item in enumerate(items)]
    return pl.DataFrame(rows, schema=["user_id", "item_id", "rank"], orient="row")


def _targets(sets: dict[str, list[str]]) -> pl.DataFrame:
    rows = [(u, item) for u, items in sets.items() for item in items]
    return pl.DataFrame(rows, schema=["user_id", "item_id"], orient="row")


# u1: targets {a, c}, list a b c d    -> hits at ranks 1 and 3
# u2: targets {x, y, z}, list p y q x -> hits at ranks 2 and 4
# u3: target {a}, no recommendations  -> 0 everywhere
# u9: not a target user; its list must be ignored (coverage included)
RECS = _recs({"u1": ["a", "b", "c", "d"], "u2": ["p", "y", "q", "x"], "u9": ["zz"]})
TARGETS = _targets({"u1": ["a", "c"], "u2": ["x", "y", "z"], "u3": ["a"]})
L2, L3, L4 = math.log2(2), math.log2(3), math.log2(4)  # 1, 1.58496, 2


def _mean(*values: float) -> float:
    return sum(values) / 3  # three evaluated users, u3 always 0


def test_hand_computed_ndcg() -> None:
    got = evaluate(RECS, TARGETS, ks=KS)
    # @2: u1 hit at 1 -> 1/log2(2) = 1; ideal min(2,2)=2 hits: 1 + 1/log2(3) = 1.63093
    #     u2 hit at 2 -> 1/log2(3) = 0.63093; ideal min(2,3)=2 hits: 1.63093
    u1, u2 = 1 / (1 / L2 + 1 / L3), (1 / L3) / (1 / L2 + 1 / L3)
    assert got["ndcg@2"] == pytest.approx(_mean(u1, u2))  # (0.61315 + 0.38685) / 3 = 0.33333
    # @4: u1 hits 1, 3 -> 1 + 1/log2(4) = 1.5; ideal 2 hits: 1.63093 -> 0.91972
    #     u2 hits 2, 4 -> 1/log2(3) + 1/log2(5) = 0.63093 + 0.43068 = 1.06161;
    #        ideal min(4,3)=3 hits: 1 + 0.63093 + 0.5 = 2.13093 -> 0.49819
    u1 = (1 / L2 + 1 / L4) / (1 / L2 + 1 / L3)
    u2 = (1 / L3 + 1 / math.log2(5)) / (1 / L2 + 1 / L3 + 1 / L4)
    assert got["ndcg@4"] == pytest.approx(_mean(u1, u2))
    assert got["ndcg@4"] == pytest.approx((0.919721 + 0.498193) / 3, abs=1e-5)


def test_hand_computed_recall_both_variants() -> None:
    got = evaluate(RECS, TARGETS, ks=KS)
    # @2: u1 1 hit / min(2, 2) = 0.5, u2 1 hit / min(2, 3) = 0.5
    assert got["recall@2"] == pytest.approx(_mean(0.5, 0.5))
    # plain @2: u1 1/2, u2 1/3
    assert got["recall_plain@2"] == pytest.approx(_mean(1 / 2, 1 / 3))
    # @4: u1 2 / min(4, 2) = 1, u2 2 / min(4, 3) = 2/3; plain: 2/2, 2/3 (the same here)
    assert got["recall@4"] == pytest.approx(_mean(1.0, 2 / 3))
    assert got["recall_plain@4"] == pytest.approx(_mean(1.0, 2 / 3))
    assert got["hitrate@2"] == pytest.approx(_mean(1, 1))


def test_hand_computed_map_and_mrr() -> None:
    got = evaluate(RECS, TARGETS, ks=KS)
    # AP@2: u1 (1/1) / min(2,2) = 0.5; u2 (1/2) / min(2,3) = 0.25
    assert got["map@2"] == pytest.approx(_mean(0.5, 0.25))
    # AP@4: u1 (1/1 + 2/3) / 2 = 0.83333; u2 (1/2 + 2/4) / 3 = 0.33333
    assert got["map@4"] == pytest.approx(_mean(5 / 6, 1 / 3))
    # first hit at 1 for u1, at 2 for u2
    assert got["mrr@2"] == pytest.approx(_mean(1.0, 0.5))
    assert got["mrr@4"] == pytest.approx(_mean(1.0, 0.5))
    assert got["users"] == 3


def test_hand_computed_coverage_and_novelty() -> None:
    popularity = pl.DataFrame({"item_id": ["a", "b", "c", "p", "y"], "count": [8, 4, 2, 1, 1]})
    got = evaluate(RECS, TARGETS, ks=KS, n_items=10, item_popularity=popularity)
    # @2: {a, b, p, y} -> 4 / 10 (u9's "zz" is not an evaluated user's)
    assert got["coverage@2"] == pytest.approx(0.4)
    # @4: {a, b, c, d, p, y, q, x} -> 8 / 10
    assert got["coverage@4"] == pytest.approx(0.8)
    # total count 16. @2: a -log2(8/16)=1, b 2, p 4, y 4 -> 11 / 4
    assert got["novelty@2"] == pytest.approx(2.75)
    # @4 adds c 3, d (unseen, count 1) 4, q 4, x 4 -> (11 + 15) / 8
    assert got["novelty@4"] == pytest.approx(3.25)


def test_perfect_ranking_scores_one() -> None:
    targets = _targets({"u1": ["a", "b"], "u2": ["c"]})
    recs = _recs({"u1": ["b", "a", "x"], "u2": ["c", "y"]})
    got = evaluate(recs, targets, ks=(2, 3))
    for metric in ("ndcg", "recall", "recall_plain", "hitrate", "map", "mrr"):
        assert got[f"{metric}@2"] == pytest.approx(1.0), metric
        assert got[f"{metric}@3"] == pytest.approx(1.0), metric


def test_no_hits_scores_zero() -> None:
    got = evaluate(_recs({"u1": ["x", "y"]}), _targets({"u1": ["a"]}), ks=(2,))
    assert all(value == 0.0 for key, value in got.items() if key != "users")


def test_user_without_recommendations_counts_as_zero() -> None:
    targets = _targets({"u1": ["a"], "u2": ["b"]})
    got = evaluate(_recs({"u1": ["a"]}), targets, ks=(1,))
    assert got["ndcg@1"] == pytest.approx(0.5)
    assert got["users"] == 2
    nothing = evaluate(_recs({}).cast({"user_id": pl.String, "item_id": pl.String}), targets)
    assert nothing["ndcg@10"] == 0.0


def test_hits_beyond_k_do_not_count_and_duplicate_targets_count_once() -> None:
    targets = _targets({"u1": ["a", "a"]})
    got = evaluate(_recs({"u1": ["x", "y", "a"]}), targets, ks=(2, 3))
    assert got["recall@2"] == 0.0
    assert got["recall@3"] == 1.0
    assert got["mrr@3"] == pytest.approx(1 / 3)


def test_bad_inputs_raise_named_errors() -> None:
    with pytest.raises(MissingColumnsError, match="rank"):
        evaluate(RECS.drop("rank"), TARGETS)
    with pytest.raises(DataError, match="same item twice"):
        evaluate(pl.concat([RECS, RECS]), TARGETS)
    with pytest.raises(ConfigError, match="ks"):
        evaluate(RECS, TARGETS, ks=(0,))


def test_tied_ranks_are_rejected_not_scored_above_one() -> None:
    # two hits both at rank 1: scored, NDCG@10 would be 1.226
    tied = pl.DataFrame({"user_id": ["u1", "u1"], "item_id": ["a", "b"], "rank": [1, 1]})
    with pytest.raises(DataError, match="same rank.*user 'u1'"):
        evaluate(tied, _targets({"u1": ["a", "b"]}))


def test_metrics_table_is_markdown() -> None:
    table = metrics_table({"pop": {"ndcg@10": 0.12345, "users": 3.0}, "cov": {"ndcg@10": 0.5}})
    lines = table.splitlines()
    assert lines[0] == "| model | ndcg@10 | users |"
    assert lines[2] == "| pop | 0.1235 | 3 |"
    assert lines[3] == "| cov | 0.5000 |  |"


# cold targets: "w" has 10 events (warm), "c5" 3 (cold for N=5 only), "n" and "n2" none (cold
# for N=0 too: absent from the popularity table)
# u1: targets {w, n},     list w x n y -> cold n at rank 3
# u2: targets {c5, n2, w}, list c5 w p q -> cold c5 at rank 1, n2 missed
# u3: target {w},         list w       -> no cold target, not a cold user
COLD_RECS = _recs({"u1": ["w", "x", "n", "y"], "u2": ["c5", "w", "p", "q"], "u3": ["w"]})
COLD_TARGETS = _targets({"u1": ["w", "n"], "u2": ["c5", "n2", "w"], "u3": ["w"]})
COLD_POPULARITY = pl.DataFrame({"item_id": ["w", "c5", "x"], "count": [10, 3, 1]})


def test_hand_computed_cold_metrics() -> None:
    got = evaluate(COLD_RECS, COLD_TARGETS, ks=KS, item_popularity=COLD_POPULARITY)
    # N=0: u1 {n}, u2 {n2} (absent items count 0); u3 has none
    assert got["cold0.users"] == 2
    # u1 @2 misses n; @4 hit at 3 -> 1/log2(4) = 0.5 over ideal 1, recall 1/min(4,1) = 1
    assert got["cold0.ndcg@2"] == 0.0
    assert got["cold0.recall@2"] == 0.0
    assert got["cold0.ndcg@4"] == pytest.approx((0.5 + 0.0) / 2)
    assert got["cold0.recall@4"] == pytest.approx((1.0 + 0.0) / 2)
    # N=5: u1 {n}, u2 {c5, n2}; u2 hit at 1 over ideal min(K,2)=2 hits, recall 1/min(K,2)
    u2_ndcg = 1 / (1 / L2 + 1 / L3)  # 0.61315 at both K
    assert got["cold5.users"] == 2
    assert got["cold5.ndcg@2"] == pytest.approx((0.0 + u2_ndcg) / 2)
    assert got["cold5.recall@2"] == pytest.approx((0.0 + 0.5) / 2)
    assert got["cold5.ndcg@4"] == pytest.approx((0.5 + u2_ndcg) / 2)
    assert got["cold5.recall@4"] == pytest.approx((1.0 + 0.5) / 2)


def test_cold_metrics_add_keys_and_change_none() -> None:
    plain = evaluate(COLD_RECS, COLD_TARGETS, ks=KS, n_items=10)
    assert not any(key.startswith("cold") for key in plain)
    got = evaluate(COLD_RECS, COLD_TARGETS, ks=KS, n_items=10, item_popularity=COLD_POPULARITY)
    cold = {f"cold{n}.{metric}@{k}" for n in COLD_THRESHOLDS for metric in ("ndcg", "recall")
            for k in KS} | {f"cold{n}.users" for n in COLD_THRESHOLDS}
    novelty = {f"novelty@{k}" for k in KS}
    assert set(got) == set(plain) | novelty | cold
    assert {key: got[key] for key in plain} == plain
    assert [key for key in got if key in plain] == list(plain)  # in the same order


def test_cold_metrics_left_out_without_cold_users() -> None:
    warm = pl.DataFrame({"item_id": ["w", "c5", "n", "n2"], "count": [10, 10, 10, 10]})
    got = evaluate(COLD_RECS, COLD_TARGETS, ks=KS, item_popularity=warm)
    assert got["cold0.users"] == 0
    assert got["cold5.users"] == 0
    assert not any(key.startswith("cold") and not key.endswith(".users") for key in got)


def test_cold_metrics_of_perfect_and_missed_lists() -> None:
    targets = _targets({"u1": ["new"], "u2": ["old"]})
    popularity = pl.DataFrame({"item_id": ["old"], "count": [50]})
    perfect = evaluate(_recs({"u1": ["new"], "u2": ["x"]}), targets, ks=(1,),
                       item_popularity=popularity)
    assert perfect["cold0.ndcg@1"] == 1.0
    assert perfect["cold0.recall@1"] == 1.0
    assert perfect["ndcg@1"] == 0.5
    missed = evaluate(_recs({"u1": ["x"], "u2": ["old"]}), targets, ks=(1,),
                      item_popularity=popularity)
    assert missed["cold5.ndcg@1"] == 0.0
    assert missed["cold5.users"] == 1


def test_merged_partials_equal_the_whole() -> None:
    recs, targets = _random_case(3)
    rng = np.random.default_rng(3)
    # items i0..i49 get 0..9 events (i50.. are absent: 0 events)
    popularity = pl.DataFrame({"item_id": [f"i{i}" for i in range(50)],
                               "count": rng.integers(0, 10, 50)})
    ks = (5, 10)
    whole = evaluate(recs, targets, ks=ks, n_items=60, item_popularity=popularity)
    assert whole["cold0.users"] > 0
    assert whole["cold5.users"] > whole["cold0.users"]
    users = targets["user_id"].unique().sort()
    halves = (users[:100], users[100:])
    parts = [partial_metrics(recs.filter(pl.col("user_id").is_in(half.implode())),
                             targets.filter(pl.col("user_id").is_in(half.implode())), ks,
                             popularity)
             for half in halves]
    merged = merge_partials(parts, n_items=60)
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        assert merged[key] == pytest.approx(value, abs=1e-12), key


def test_a_parts_recommended_items_are_codes_over_the_popularity_table() -> None:
    recs, targets = _random_case(5)
    popularity = pl.DataFrame({"item_id": [f"i{i}" for i in range(50)], "count": [3] * 50})
    part = partial_metrics(recs, targets, (5,), popularity)
    found = part["items"][5]
    assert found["codes"].nbytes == 7  # a bitset of 50 items, whatever the users
    top = recs.filter(pl.col("rank") <= 5)["item_id"].unique()
    assert sorted(found["others"]) == sorted(i for i in top if int(i[1:]) >= 50)
    assert evaluate(recs, targets, ks=(5,), n_items=60, item_popularity=popularity)[
        "coverage@5"] == top.len() / 60
    large = pl.DataFrame({"item_id": [f"i{i}" for i in range(10_000)], "count": [1] * 10_000})
    sparse = partial_metrics(recs, targets, (5,), large)["items"][5]  # fewer than 1 in 32
    assert sparse["codes"].dtype == np.uint32
    assert len(sparse["codes"]) == top.len()
    halves = [recs.filter(pl.col("user_id") < "u1"), recs.filter(pl.col("user_id") >= "u1")]
    parts = [partial_metrics(half, targets, (5,), table) for half in halves
             for table in [large]]
    assert merge_partials(parts, n_items=10_000)["coverage@5"] == top.len() / 10_000


def test_standard_errors_of_the_mean_over_users() -> None:
    recs, targets = _random_case(4)
    got = evaluate(recs, targets, ks=(5, 10))
    per_user = per_user_metrics(recs, targets, ks=(5, 10))
    for key in ("ndcg@5", "recall@10"):
        values = per_user[key].to_numpy()
        expected = values.std(ddof=1) / math.sqrt(len(values))
        assert got[f"se.{key}"] == pytest.approx(expected, rel=1e-9)
    assert {key for key in got if key.startswith("se.")} == {
        f"se.{metric}@{k}" for metric in ("ndcg", "recall") for k in (5, 10)}
    assert not any(key.startswith("se.") for key in evaluate(RECS, TARGETS.head(1), ks=KS))
    table = metrics_table({"model": got}, metrics=["ndcg@5", "hitrate@5"])
    assert f"| {got['ndcg@5']:.4f} ± {got['se.ndcg@5']:.4f} | {got['hitrate@5']:.4f} |" in table
    assert "se." not in metrics_table({"model": got})  # not columns of their own


def test_merge_counts_a_part_without_cold_users() -> None:
    popularity = pl.DataFrame({"item_id": ["w", "c5", "n", "n2"], "count": [10, 3, 10, 10]})
    whole = evaluate(COLD_RECS, COLD_TARGETS, ks=KS, item_popularity=popularity)
    parts = [partial_metrics(COLD_RECS.filter(pl.col("user_id") == user),
                             COLD_TARGETS.filter(pl.col("user_id") == user), KS, popularity)
             for user in ("u1", "u2", "u3")]
    assert [part["cold"][5]["users"] for part in parts] == [0, 1, 0]
    assert merge_partials(parts) == pytest.approx(whole)
    assert whole["cold5.ndcg@2"] == 1.0  # u2's only cold target, c5, at rank 1
    assert "cold0.ndcg@2" not in whole


def test_cold_metrics_get_their_own_table() -> None:
    results = {"pop": {"ndcg@10": 0.5, "users": 3.0, "cold0.ndcg@10": 0.125,
                       "cold0.recall@10": 0.25, "cold0.users": 2.0, "cold5.users": 0.0},
               "plain": {"ndcg@10": 0.25, "users": 3.0}}
    assert metrics_table(results).splitlines()[0] == "| model | ndcg@10 | users |"
    lines = cold_metrics_table(results).splitlines()
    assert lines[0] == "| model | ndcg@10 | recall@10 | users |"
    assert lines[2] == "| pop (item events <= 0) | 0.1250 | 0.2500 | 2 |"
    assert lines[3] == "| pop (item events <= 5) |  |  | 0 |"
    assert len(lines) == 4
    assert cold_metrics_table({"plain": results["plain"]}) == ""


def _random_case(seed: int, n_users: int = 300, n_items: int = 60, depth: int = 25):
    rng = np.random.default_rng(seed)
    rec_rows, target_rows = [], []
    for u in range(n_users):
        user = f"u{u}"
        for item in rng.choice(n_items, size=rng.integers(1, 12), replace=False):
            target_rows.append((user, f"i{item}"))
        if u % 17 == 0:
            continue  # some users get no recommendations
        ranked = rng.choice(n_items, size=rng.integers(1, depth + 1), replace=False)
        rec_rows += [(user, f"i{item}", r + 1) for r, item in enumerate(ranked)]
    recs = pl.DataFrame(rec_rows, schema=["user_id", "item_id", "rank"], orient="row")
    targets = pl.DataFrame(target_rows, schema=["user_id", "item_id"], orient="row").unique()
    return recs, targets


def _ranx_scores(recs: pl.DataFrame, targets: pl.DataFrame, metrics: list[str]) -> dict:
    from ranx import Qrels, Run
    from ranx import evaluate as ranx_evaluate

    qrels: dict[str, dict[str, int]] = {}
    for user, item in targets.iter_rows():
        qrels.setdefault(user, {})[item] = 1
    run: dict[str, dict[str, float]] = {user: {} for user in qrels}
    for user, item, rank in recs.iter_rows():
        run.setdefault(user, {})[item] = 1.0 / rank  # ranx orders by score
    ranx_run = Run(run)
    ranx_evaluate(Qrels(qrels), ranx_run, metrics, make_comparable=True)
    return {metric: dict(ranx_run.scores[metric]) for metric in metrics}


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_ranx_on_random_rankings(seed: int) -> None:
    recs, targets = _random_case(seed)
    ks = (5, 10, 20)
    ours = per_user_metrics(recs, targets, ks)
    names = {"ndcg": "ndcg", "recall_plain": "recall", "hitrate": "hit_rate", "mrr": "mrr"}
    ranx_metrics = [f"{theirs}@{k}" for theirs in [*names.values(), "map"] for k in ks]
    theirs = _ranx_scores(recs, targets, ranx_metrics)
    users = ours["user_id"].to_list()
    n_targets = ours["n_targets"].to_numpy()
    for k in ks:
        for mine, other in names.items():
            expected = np.array([theirs[f"{other}@{k}"].get(u, 0.0) for u in users])
            np.testing.assert_allclose(ours[f"{mine}@{k}"].to_numpy(), expected, atol=1e-9)
        # ranx divides AP by |T|; ours by min(K, |T|) (the protocol): rescale to compare
        expected_ap = np.array([theirs[f"map@{k}"].get(u, 0.0) for u in users])
        rescaled = ours[f"map@{k}"].to_numpy() * np.minimum(k, n_targets) / n_targets
        np.testing.assert_allclose(rescaled, expected_ap, atol=1e-9)
        assert ((n_targets > k) | np.isclose(ours[f"map@{k}"].to_numpy(), expected_ap)).all()


@pytest.mark.slow
def test_scores_100k_users_quickly() -> None:
    rng = np.random.default_rng(0)
    n_users, k = 100_000, 20
    users = np.repeat([f"u{u}" for u in range(n_users)], k)
    recs = (
        pl.DataFrame({"user_id": users, "item_id": rng.integers(0, 50_000, users.size).astype(str)})
        .unique(["user_id", "item_id"], maintain_order=True)
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("rank"))
    )
    targets = pl.DataFrame(
        {"user_id": [f"u{u}" for u in range(n_users)], "item_id": rng.integers(0, 50_000, n_users)}
    ).with_columns(pl.col("item_id").cast(pl.String))
    start = time.perf_counter()
    got = evaluate(recs, targets, n_items=50_000)
    assert time.perf_counter() - start < 10
    assert got["users"] == n_users
