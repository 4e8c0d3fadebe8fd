import datetime as dt

import polars as pl
import pytest

from models.columns import EVENT_TYPE, ITEM, TIMESTAMP, USER
from models.errors import ConfigError, DataError
from tasks.splitting.split import cut_times, leave_one_out, time_split

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def events(rows):
    """rows: (user, item, day, type)."""
    return pl.DataFrame(
        {
            USER: [r[0] for r in rows],
            ITEM: [r[1] for r in rows],
            TIMESTAMP: [T0 + dt.timedelta(days=r[2]) for r in rows],
            EVENT_TYPE: [r[3] if len(r) > 3 else "view" for r in rows],
        },
        schema_overrides={TIMESTAMP: pl.Datetime("us", "UTC")},
    )


LOG = events([
    ("a", "1", 0), ("a", "2", 1), ("a", "3", 5), ("a", "4", 8, "purchase"),
    ("b", "1", 2), ("b", "5", 6, "purchase"), ("b", "5", 6.5),
    ("c", "9", 7),  # no history before the validation window: never evaluated on it
    ("d", "2", 3), ("d", "6", 9),
])


def test_time_split_histories_end_before_their_windows():
    t_valid, t_test = T0 + dt.timedelta(days=5), T0 + dt.timedelta(days=8)
    split = time_split(LOG, t_valid, t_test)
    assert split.train[TIMESTAMP].max() < t_valid
    assert split.test_history[TIMESTAMP].max() < t_test
    assert split.train.height == 4
    assert split.test_history.height == 8
    # validation targets: distinct items in [day 5, day 8) of users with a training history
    assert split.valid_targets.rows() == [("a", "3"), ("b", "5")]
    # test targets: [day 8, end) of users with a history before day 8 (c joined on day 7)
    assert split.test_targets.rows() == [("a", "4"), ("d", "6")]


def test_time_split_by_event_type():
    t_valid, t_test = T0 + dt.timedelta(days=5), T0 + dt.timedelta(days=8)
    split = time_split(LOG, t_valid, t_test, target_event_types=("purchase",))
    assert split.valid_targets.rows() == [("b", "5")]
    assert split.test_targets.rows() == [("a", "4")]


def test_time_split_without_targets_is_a_clear_error():
    with pytest.raises(DataError, match="no targets"):
        time_split(LOG, T0 + dt.timedelta(days=20), T0 + dt.timedelta(days=30))


def test_cut_times_by_days_and_by_share():
    t_valid, t_test = cut_times(LOG, valid_days=1, test_days=1)
    assert t_test == T0 + dt.timedelta(days=8)
    assert t_valid == T0 + dt.timedelta(days=7)
    t_valid, t_test = cut_times(LOG, valid_share=0.2, test_share=0.2)
    assert t_valid < t_test
    with pytest.raises(ConfigError):
        cut_times(LOG, valid_share=0.6, test_share=0.6)


def test_leave_one_out_takes_last_for_test_second_last_for_validation():
    log = events([
        ("u", "a", 0), ("u", "b", 1), ("u", "c", 2), ("u", "d", 3),
        ("v", "x", 0), ("v", "y", 1),  # too short to evaluate: stays in training data
    ])
    split = leave_one_out(log)
    assert split.test_targets.rows() == [("u", "d")]
    assert split.valid_targets.rows() == [("u", "c")]
    assert sorted(split.train.filter(pl.col(USER) == "u")[ITEM]) == ["a", "b"]
    assert sorted(split.test_history.filter(pl.col(USER) == "u")[ITEM]) == ["a", "b", "c"]
    assert split.train.filter(pl.col(USER) == "v").height == 2


def test_leave_one_out_keeps_file_order_for_equal_timestamps():
    log = events([("u", "a", 0), ("u", "b", 0), ("u", "c", 0)])
    split = leave_one_out(log)
    assert split.test_targets.rows() == [("u", "c")]
    assert split.valid_targets.rows() == [("u", "b")]


def test_empty_events_are_a_clear_error():
    with pytest.raises(DataError, match="empty"):
        leave_one_out(LOG.head(0))


def test_selection_holdout_partitions_the_validation_users_alike_everywhere():
    from tasks.data.demo_data import generate_shop
    from tasks.splitting.split import Selection

    shop, _ = generate_shop(3_000, seed=1)
    split = time_split(shop, *cut_times(shop))
    selection = Selection(0.3, seed=5)
    chosen, tuning = selection.targets(split), selection.tuning(split)
    assert chosen.height + tuning.valid_targets.height == split.valid_targets.height
    assert not set(chosen[USER]) & set(tuning.valid_targets[USER])
    assert tuning.train.equals(split.train)
    assert tuning.test_targets.equals(split.test_targets)
    # a user's draw depends on nothing but the user and the seed: the same in any shard
    users = split.valid_targets[USER]
    assert selection.drawn(users.head(7)).to_list() == selection.drawn(users).head(7).to_list()
    assert 0 < chosen[USER].n_unique() < users.n_unique()
    assert Selection(0.0).tuning(split) is split
    assert Selection(0.0).targets(split).equals(split.valid_targets)
    with pytest.raises(DataError, match="evaluation.selection_share"):
        selection.check(0)
