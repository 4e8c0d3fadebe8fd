from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from models.errors import ConfigError, DataError
from models.lgbm_ranker import LightGBMRanker, NotFittedError, group_sizes, positive_groups


def _groups(n_users: int, seed: int, per_user: int = 12) -> pl.DataFrame:
    """Candidate groups whose single positive has the highest ``signal`` (plus noise features)."""
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    users = np.repeat([f"u{i:03d}" for i in range(n_users)], per_user)
    label = np.zeros(n, dtype=np.int32)
    label[rng.integers(0, per_user, n_users) + np.arange(n_users) * per_user] = 1
    return pl.DataFrame({
        "user_id": users,
        "item_id": [f"i{j}" for j in rng.integers(0, 500, n)],
        "signal": label * 1.0 + rng.normal(0, 0.3, n),
        "noise": rng.normal(0, 1, n),
        "label": label,
    }).unique(["user_id", "item_id"], keep="first", maintain_order=True)


def test_group_helpers():
    users = pl.Series(["a", "a", "b", "c", "c", "c"])
    assert group_sizes(users).tolist() == [2, 1, 3]
    frame = pl.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "z"],
                          "label": [0, 1, 0]})
    assert positive_groups(frame)["user_id"].to_list() == ["a", "a"]


def test_learns_the_signal_and_ranks_positives_first():
    train, valid = _groups(120, 1), _groups(40, 2)
    ranker = LightGBMRanker({"min_data_in_leaf": 5}, num_boost_round=60,
                            early_stopping_rounds=10, num_threads=1).fit(train, valid)
    assert ranker.features_ == ["signal", "noise"]
    assert 1 <= ranker.best_iteration_ <= 60
    assert ranker.best_score_ > 0.8
    recs = ranker.recommend(valid, k=3)
    assert recs.columns == ["user_id", "item_id", "score", "rank"]
    assert recs.group_by("user_id").len()["len"].max() == 3
    hits = recs.join(valid.filter(pl.col("label") == 1), on=["user_id", "item_id"])
    assert (hits["rank"] == 1).mean() > 0.8
    importance = ranker.feature_importance()
    assert importance["feature"][0] == "signal"


def test_rows_of_a_user_need_not_be_contiguous():
    train = _groups(60, 3)
    # users interleaved (and in reverse order), each user's rows still in their own order
    interleaved = (
        train.with_columns(pl.int_range(pl.len()).over("user_id").alias("pos"))
        .sort(["pos", "user_id"], descending=[False, True]).drop("pos")
    )
    assert interleaved["user_id"][0] != interleaved["user_id"][1]
    a = LightGBMRanker(num_boost_round=10, num_threads=1).fit(train)
    b = LightGBMRanker(num_boost_round=10, num_threads=1).fit(interleaved)
    np.testing.assert_allclose(a.predict(train), b.predict(train))


def test_same_seed_same_model_and_save_load(tmp_path):
    train, valid = _groups(80, 4), _groups(30, 5)
    params = {"bagging_fraction": 0.7, "feature_fraction": 0.5, "min_data_in_leaf": 5}
    first = LightGBMRanker(params, num_boost_round=30, seed=7, num_threads=1).fit(train, valid)
    second = LightGBMRanker(params, num_boost_round=30, seed=7, num_threads=1).fit(train, valid)
    np.testing.assert_array_equal(first.predict(valid), second.predict(valid))
    first.save(tmp_path / "ranker")
    loaded = LightGBMRanker.load(tmp_path / "ranker")
    np.testing.assert_allclose(loaded.predict(valid), first.predict(valid), rtol=1e-6)
    assert loaded.features_ == first.features_
    assert loaded.get_params() == first.get_params()


def test_errors(tmp_path):
    with pytest.raises(NotFittedError):
        LightGBMRanker().predict(_groups(2, 0))
    negatives = _groups(5, 0).with_columns(pl.lit(0).alias("label"))
    with pytest.raises(DataError, match="positive"):
        LightGBMRanker(num_threads=1).fit(negatives)
    with pytest.raises(DataError, match="not a saved LightGBMRanker"):
        LightGBMRanker.load(tmp_path)


def _with_new_items(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with ``i_n_events``: every third row an item without events (0 or missing)."""
    row = pl.int_range(pl.len())
    return frame.with_columns(
        pl.when(row % 6 == 0).then(None).when(row % 3 == 0).then(0.0)
        .otherwise((row % 7 + 1).cast(pl.Float64)).alias("i_n_events"))


def test_the_new_item_offset_moves_exactly_the_items_without_events(tmp_path):
    train, valid = _with_new_items(_groups(80, 6)), _with_new_items(_groups(30, 7))
    ranker = LightGBMRanker(num_boost_round=20, num_threads=1).fit(train)
    plain = ranker.predict(valid)
    ranker.new_item_offset = 2.5
    moved = ranker.predict(valid) - plain
    new = (valid["i_n_events"].fill_null(0) == 0).to_numpy()
    np.testing.assert_allclose(moved[new], 2.5)
    np.testing.assert_array_equal(moved[~new], 0.0)
    ranker.save(tmp_path / "ranker")  # kept with the model
    loaded = LightGBMRanker.load(tmp_path / "ranker")
    assert loaded.new_item_offset == 2.5
    np.testing.assert_allclose(loaded.predict(valid), ranker.predict(valid), rtol=1e-6)
    ranker.new_item_offset = 50.0  # every list starts with its items without events
    first = ranker.recommend(valid, k=1).join(valid, on=["user_id", "item_id"])
    assert (first["i_n_events"].fill_null(0) == 0).all()
    ranker.new_item_offset = float("nan")
    with pytest.raises(ConfigError, match="finite"):
        ranker.predict(valid)
    blind = LightGBMRanker(num_boost_round=5, features=["signal", "noise"], num_threads=1,
                           new_item_offset=1.0).fit(train)
    with pytest.raises(DataError, match="i_n_events"):  # nothing says which items are new
        blind.predict(valid.drop("i_n_events"))


def test_the_cascade_scores_only_the_first_stages_best_with_every_tree(tmp_path):
    train, valid = _groups(120, 1, per_user=30), _groups(40, 2, per_user=30)
    ranker = LightGBMRanker({"min_data_in_leaf": 5}, num_boost_round=60,
                            num_threads=1).fit(train)  # no early stopping: 60 trees
    assert ranker.best_iteration_ == 60
    whole = ranker.recommend(valid, k=5)
    assert ranker.cascade(valid, 5).equals(valid)  # no cascade by default

    ranker.cascade_trees, ranker.cascade_keep = 5, 8
    kept = ranker.cascade(valid, 5)
    first = valid.with_columns(pl.Series("s", ranker.predict(valid, trees=5)))
    best = first.filter(pl.col("s").rank("ordinal", descending=True).over("user_id") <= 8)
    assert kept.equals(best.drop("s"))  # each user's 8 best by the first 5 trees, in order
    assert kept.group_by("user_id").len()["len"].max() == 8
    cascaded = ranker.recommend(valid, k=5)
    ranker.cascade_trees = 0
    assert cascaded.equals(ranker.recommend(kept, k=5))  # the kept rows, scored by every tree
    hits = cascaded.join(valid.filter(pl.col("label") == 1), on=["user_id", "item_id"])
    assert (hits["rank"] == 1).mean() > 0.8
    ranker.cascade_trees, ranker.cascade_keep = 5, 30  # keeps everything: the same lists
    assert ranker.recommend(valid, k=5).equals(whole)
    ranker.cascade_keep = 2  # never fewer than k
    assert ranker.cascade(valid, 5).group_by("user_id").len()["len"].min() == 5

    ranker.cascade_keep = 8
    ranker.save(tmp_path / "r")
    loaded = LightGBMRanker.load(tmp_path / "r")
    assert (loaded.cascade_trees, loaded.cascade_keep) == (5, 8)
    assert loaded.recommend(valid, k=5).equals(cascaded)
    with pytest.raises(ConfigError, match="cascade_trees >= 0"):
        LightGBMRanker(cascade_trees=-1).fit(train)
