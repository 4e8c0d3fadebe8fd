"""Choosing the session weight on validation data: hand-made cases and the served answers."""

from __future__ import annotations

import polars as pl
import pytest

from models.baselines import BuyAgain, CoVisitation, Popularity
from models.errors import ConfigError, DataError
from models.metrics import evaluate
from models.requests import Request
from models.serving import ServingModel
from models.session_blend import DEFAULT_WEIGHTS, choose_session_weight

USERS = ("u1", "u2", "u3")


def _frame(rows: list[tuple], names: list[str]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=names, orient="row")


def _lists(items_of: dict[str, list[str]]) -> pl.DataFrame:
    rows = [(user, item, 1.0 / rank, rank) for user, items in items_of.items()
            for rank, item in enumerate(items, start=1)]
    return _frame(rows, ["user_id", "item_id", "score", "rank"])


# every user's model list is noise (m*), the session item s has the neighbours t1, t2, t3
LISTS = _lists({u: [f"m{j}" for j in range(1, 13)] for u in USERS})
NEIGHBOURS = _frame([("s", "t1", 3.0), ("s", "t2", 2.0), ("s", "t3", 1.0),
                     ("x", "n1", 3.0), ("x", "n2", 2.0)], ["item_id", "neighbour", "score"])
HISTORY = _frame([(u, "h") for u in USERS], ["user_id", "item_id"])
SESSIONS = _frame([(u, "s") for u in USERS], ["user_id", "item_id"])


def _targets(items: list[str]) -> pl.DataFrame:
    return _frame([(u, i) for u in USERS for i in items], ["user_id", "item_id"])


def _figures(table: pl.DataFrame, metric: str = "ndcg@10") -> dict[float, float]:
    return dict(table.select("weight", metric).iter_rows())


def test_session_neighbours_that_are_the_targets_get_a_high_weight():
    choice = choose_session_weight(LISTS, NEIGHBOURS, HISTORY, SESSIONS, _targets(
        ["t1", "t2", "t3"]))
    figures = _figures(choice.table)
    assert choice.blended == len(USERS)
    assert choice.weight >= 0.5
    assert figures[choice.weight] == figures[1.0] == pytest.approx(1.0)
    assert figures[0.0] == 0.0
    # ties go to the smallest weight that reaches the best figure
    assert all(figures[w] < figures[choice.weight] for w in figures if w < choice.weight)


def test_noise_neighbours_get_weight_zero():
    lists = _lists({u: ["t1", "t2", *(f"m{j}" for j in range(1, 11))] for u in USERS})
    sessions = SESSIONS.with_columns(pl.lit("x").alias("item_id"))
    choice = choose_session_weight(lists, NEIGHBOURS, HISTORY, sessions, _targets(["t1", "t2"]))
    figures = _figures(choice.table)
    assert choice.weight == 0.0
    assert figures[0.0] == pytest.approx(1.0)
    assert figures[1.0] < figures[0.5] < figures[0.0]  # the noise pushes the targets down


def test_the_table_has_every_weight_and_every_metric_at_the_cut_off():
    choice = choose_session_weight(LISTS, NEIGHBOURS, HISTORY, SESSIONS, _targets(["t1"]),
                                   weights=[0.0, 0.25, 1.0], metric="recall@5")
    assert choice.table["weight"].to_list() == [0.0, 0.25, 1.0]
    assert {"ndcg@5", "recall@5", "hitrate@5", "users"} <= set(choice.table.columns)
    assert choice.metric == "recall@5"
    default = choose_session_weight(LISTS, NEIGHBOURS, HISTORY, SESSIONS, _targets(["t1"]))
    assert default.table["weight"].to_list() == list(DEFAULT_WEIGHTS)
    assert DEFAULT_WEIGHTS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_session_items_already_in_the_history_count_for_nothing():
    known = pl.concat([HISTORY, SESSIONS])  # s is every user's known item
    choice = choose_session_weight(LISTS, NEIGHBOURS, known, SESSIONS, _targets(
        ["t1", "t2", "t3"]))
    assert choice.weight == 0.0
    assert set(_figures(choice.table).values()) == {0.0}
    assert choice.blended == 0  # nothing on this data depends on the weight
    # one new item among known ones is enough: the new item alone is the session
    mixed = pl.concat([SESSIONS, SESSIONS.with_columns(pl.lit("h").alias("item_id"))])
    assert choose_session_weight(LISTS, NEIGHBOURS, HISTORY, mixed, _targets(
        ["t1", "t2", "t3"])).table.equals(choose_session_weight(
            LISTS, NEIGHBOURS, HISTORY, SESSIONS, _targets(["t1", "t2", "t3"])).table)


def test_a_user_without_a_list_is_answered_by_the_whole_session():
    stranger = pl.DataFrame({"user_id": ["u9"], "item_id": ["s"]})
    choice = choose_session_weight(LISTS, NEIGHBOURS, pl.concat([HISTORY, stranger]),
                                   stranger, _frame([("u9", "t1")], ["user_id", "item_id"]))
    assert set(_figures(choice.table).values()) == {1.0}  # t1 first, whatever the weight
    assert choice.blended == 0


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="metric"):
        choose_session_weight(LISTS, NEIGHBOURS, HISTORY, SESSIONS, _targets(["t1"]),
                              metric="coverage@10")
    with pytest.raises(ConfigError, match="weights"):
        choose_session_weight(LISTS, NEIGHBOURS, HISTORY, SESSIONS, _targets(["t1"]),
                              weights=[0.5, 1.5])
    with pytest.raises(DataError, match="no validation targets"):
        choose_session_weight(LISTS, NEIGHBOURS, HISTORY, SESSIONS, _targets([]))


def test_the_figures_are_those_of_the_served_answers(tmp_path, demo_shop_dir):
    """The simulation answers as a served bundle does, at every weight."""
    events = pl.read_parquet(demo_shop_dir / "events.parquet").sort("timestamp")
    cut = events["timestamp"].quantile(0.8, interpolation="lower")
    train, later = events.filter(pl.col("timestamp") < cut), events.filter(
        pl.col("timestamp") >= cut)
    BuyAgain().fit(train).save(tmp_path / "buy_again")
    covis = CoVisitation().fit(train)
    serving = ServingModel.load(ServingModel.build(
        tmp_path / "bundle", family="buy_again", model_dir=tmp_path / "buy_again",
        trending=Popularity(window_days=7).fit(train).popularity_, neighbours=covis.neighbours_,
        users=train["user_id"], items=train["item_id"], history=train, exclude_seen=False,
        max_k=20))
    known = later.join(train.select("user_id").unique(), on="user_id", how="semi")
    sessions = known.group_by("user_id", maintain_order=True).head(2).select("user_id", "item_id")
    targets = known.join(sessions, on=["user_id", "item_id"], how="anti").select(
        "user_id", "item_id").unique()
    users = targets["user_id"].unique().sort().to_list()
    lists = _lists({u: [i for i, _ in serving.lists.get(u)] for u in users})
    choice = choose_session_weight(lists, covis.neighbours_, train, sessions, targets)
    recent = {u: tuple(items) for u, items in sessions.group_by(
        "user_id", maintain_order=True).agg("item_id").iter_rows()}
    for weight in (0.0, 0.3, 1.0):
        serving.session_weight = weight
        answer = serving.answer([Request(u, 10, recent.get(u, ())) for u in users])
        served = evaluate(answer, targets, ks=[10])["ndcg@10"]
        assert _figures(choice.table)[weight] == pytest.approx(served, abs=1e-12)
    assert choice.table["users"].to_list() == [float(len(users))] * len(DEFAULT_WEIGHTS)
