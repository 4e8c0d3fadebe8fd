"""Monitoring a released champion: realised quality per day, drift, the verdict and the plot."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import polars as pl
import pytest
from pydantic import ValidationError

from models.serving import ServingModel
from tasks.data.demo_data import generate_shop
from tasks.monitoring.drift import daily_drift, drift_checks, js_distance, price_distance
from tasks.monitoring.expectations import unknown_share_checks
from tasks.monitoring.plot import plot_monitor
from tasks.monitoring.realised import day_sessions, realised_quality
from tasks.monitoring.settings import FLAGGED, OK, SKIPPED, CheckResult, MonitorSettings
from tasks.monitoring.verdict import decay_check, verdict
from tests.test_serving import covisitation_bundle

UTC = dt.UTC
DAY1, DAY2 = dt.datetime(2026, 1, 5, tzinfo=UTC), dt.datetime(2026, 1, 6, tzinfo=UTC)
N_EVENTS, N_DAYS, SHIFT_DAY = 20_000, 60, 53  # the last 7 days are the "new" events
DRIFT_CHECKS = ("event_type_mix", "unknown_users", "unknown_items", "top_items_overlap",
                "category_mix", "price")


def _events(rows: list[tuple[str, str, dt.datetime]]) -> pl.DataFrame:
    users, items, times = zip(*rows, strict=True)
    return pl.DataFrame({"user_id": users, "item_id": items, "event_type": ["view"] * len(rows),
                         "timestamp": pl.Series(times).cast(pl.Datetime("us", "UTC"))})


def _at(day: dt.datetime, minute: int) -> dt.datetime:
    return day + dt.timedelta(hours=10, minutes=minute)


# ---------------------------------------------------------------- shops
def _split(events: pl.DataFrame, items: pl.DataFrame
           ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The champion's events (before SHIFT_DAY), the new events and the catalogue."""
    cut = _cut(events)
    return events.filter(pl.col("timestamp") < cut), events.filter(
        pl.col("timestamp") >= cut), items


def _cut(events: pl.DataFrame) -> dt.datetime:
    return events["timestamp"].min().replace(hour=0, minute=0, second=0,
                                             microsecond=0) + dt.timedelta(days=SHIFT_DAY)


def shifted_shop(seed: int, behaviour: bool = True) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A demo shop whose regime changes on SHIFT_DAY, and with ``behaviour`` its shoppers too.

    The generator's shift launches a category of new, dearer items and rotates tastes and
    best-sellers; it keeps the event-type mix and the users, so ``_change_behaviour`` moves those.
    """
    events, items = generate_shop(N_EVENTS, seed=seed, n_days=N_DAYS, shift_day=SHIFT_DAY)
    return (_change_behaviour(events, _cut(events), seed) if behaviour else events), items


def _change_behaviour(events: pl.DataFrame, cut: dt.datetime, seed: int) -> pl.DataFrame:
    """After ``cut``: 30% of views become purchases; every other user is a new one."""
    rng = np.random.default_rng(seed)
    after = pl.col("timestamp") >= cut
    bought = after & (pl.col("event_type") == "view") & pl.Series(rng.random(events.height) < 0.3)
    renamed = after & (pl.col("user_id").str.slice(1).cast(pl.Int64) % 2 == 0)
    return events.with_columns(
        pl.when(bought).then(pl.lit("purchase")).otherwise("event_type").alias("event_type"),
        pl.when(renamed).then("v" + pl.col("user_id")).otherwise("user_id").alias("user_id"))


# ---------------------------------------------------------------- realised quality
HAND_EVENTS = _events([
    ("a", "x", _at(DAY1, 0)), ("a", "y", _at(DAY1, 5)), ("a", "z", _at(DAY1, 9)),
    ("b", "x", _at(DAY1, 1)),                           # one event: not evaluated
    ("c", "p", _at(DAY1, 2)), ("c", "p", _at(DAY1, 3)),  # the session item again
    ("a", "w", _at(DAY2, 1)), ("a", "y", _at(DAY2, 0)),  # out of order: y comes first
])
LISTS = {"x": ["y", "q", "z"], "p": ["q", "p"], "y": ["q", "r"]}  # by session item
RETURNING = ["z", "w", "q"]  # the list of any user without a session


class FakeServer:
    """A served model's predict: one list per session item; records every call."""

    def __init__(self) -> None:
        self.calls: list[pd.DataFrame] = []

    def __call__(self, records: pd.DataFrame) -> pd.DataFrame:
        self.calls.append(records)
        rows = []
        for record in records.to_dict("records"):
            session = record.get("recent_items")
            items = LISTS[session[0]] if session else RETURNING
            rows += [{"user_id": record["user_id"], "item_id": item, "score": -rank,
                      "rank": rank} for rank, item in enumerate(items, start=1)]
        return pd.DataFrame(rows)


def test_day_sessions_take_the_first_event_and_the_later_items():
    sessions, targets = day_sessions(HAND_EVENTS)
    assert sessions.rows() == [(DAY1.date(), "a", "x"), (DAY1.date(), "c", "p"),
                               (DAY2.date(), "a", "y")]
    assert targets.rows() == [(DAY1.date(), "a", "y"), (DAY1.date(), "a", "z"),
                              (DAY1.date(), "c", "p"), (DAY2.date(), "a", "w")]


def test_realised_quality_per_day_equals_hand_computed_figures():
    server = FakeServer()
    daily = realised_quality(server, HAND_EVENTS, ks=(10, 20))
    # one batched call per day, each user with its first item as the session and k = max(ks)
    assert [call["user_id"].tolist() for call in server.calls] == [["a", "c"], ["a"]]
    assert server.calls[0]["recent_items"].tolist() == [["x"], ["p"]]
    assert set(server.calls[0]["k"]) == {20}
    ndcg_a = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))  # hits at ranks 1 and 3 of 2
    ndcg_c = 1 / math.log2(3)                                 # hit at rank 2 of 1
    assert daily["day"].to_list() == [DAY1.date(), DAY2.date()]
    assert daily["users"].to_list() == [2, 1]
    assert daily["ndcg@10"].to_list() == pytest.approx([(ndcg_a + ndcg_c) / 2, 0.0])
    assert daily["recall@20"].to_list() == pytest.approx([1.0, 0.0])
    assert daily["hitrate@10"].to_list() == pytest.approx([1.0, 0.0])
    assert daily["mrr@10"].to_list() == pytest.approx([(1 + 1 / 2) / 2, 0.0])


def test_returning_users_are_scored_on_the_same_targets_without_a_session():
    server = FakeServer()
    daily = realised_quality(server, HAND_EVENTS, ks=(10,), session=False)
    assert all("recent_items" not in call.columns for call in server.calls)
    # day 1: a's targets y, z -> z at rank 1 (of 2 targets); c's target p -> no hit
    assert daily["ndcg@10"].to_list() == pytest.approx([(1 / (1 + 1 / math.log2(3))) / 2,
                                                        1 / math.log2(3)])  # day 2: w at rank 2
    assert daily.columns[:3] == ["day", "users", "ndcg@10"]


def test_realised_quality_of_no_evaluable_user_is_an_empty_table():
    daily = realised_quality(FakeServer(), HAND_EVENTS.filter(pl.col("user_id") == "b"))
    assert daily.is_empty()
    assert "ndcg@10" in daily.columns


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[ServingModel, pl.DataFrame, pl.DataFrame]:
    """A co-visitation champion served from a real bundle, and two futures of 7 days: steady,
    and after the shop's regime change (the events before it are the same)."""
    reference, new, _ = _split(*generate_shop(N_EVENTS, seed=1, n_days=N_DAYS))
    before, shifted, _ = _split(*shifted_shop(seed=1, behaviour=False))
    assert before.equals(reference)
    return covisitation_bundle(reference, tmp_path_factory.mktemp("champion")), new, shifted


def test_a_served_model_is_scored_each_day_and_the_session_helps(served):
    serving, new, _ = served
    predict = lambda records: serving.predict(records.to_dict("records"))  # noqa: E731
    session = realised_quality(predict, new, ks=(10, 20), n_items=serving.items.len())
    returning = realised_quality(predict, new, ks=(10, 20), session=False)
    assert session["day"].n_unique() == 7
    assert session["users"].to_list() == returning["users"].to_list()
    assert (session["users"] > 10).all()
    assert session["ndcg@10"].is_between(0, 1).all()
    assert (session["coverage@10"] > 0).all()
    # the live session's co-visitation neighbours find the rest of the day's visit
    assert session["ndcg@10"].mean() > returning["ndcg@10"].mean()


def test_the_champion_decays_after_the_regime_change_and_not_without_it(served):
    serving, steady_events, shifted_events = served
    predict = lambda records: serving.predict(records.to_dict("records"))  # noqa: E731
    steady = realised_quality(predict, steady_events)
    shifted = realised_quality(predict, shifted_events)
    # a stand-in for the gate's live-session figure: what the champion scores on a steady week,
    # pooled over the whole week (two days of ~80 users each are within the noise of 10%)
    gate = float((steady["ndcg@10"] * steady["users"]).sum() / steady["users"].sum())
    week = MonitorSettings(decay_days=7)
    assert not verdict(steady, gate, [], week).decayed
    decayed = verdict(shifted, gate, [], week)
    assert decayed.decayed
    assert decayed.decay.value < gate / 2


def test_the_served_pyfunc_is_scored_through_its_predict(tmp_path, served):
    import mlflow

    from tasks.release.packaging import save_pyfunc

    serving, new, _ = served
    example = pd.DataFrame([{"user_id": serving.users[0], "k": 10, "recent_items": None},
                            {"user_id": "a-visitor", "k": 5, "recent_items": ["i00001"]}])
    save_pyfunc(serving.folder, tmp_path / "pyfunc", "covisitation", example)
    pyfunc = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))  # as the gate and server load it
    last_day = new["timestamp"].max().date()
    new = new.filter(pl.col("timestamp").dt.date() >= last_day - dt.timedelta(days=1))
    direct = lambda records: serving.predict(records.to_dict("records"))  # noqa: E731
    daily = realised_quality(pyfunc.predict, new, ks=(10, 20))
    assert daily["day"].to_list() == [last_day - dt.timedelta(days=1), last_day]
    assert daily.equals(realised_quality(direct, new, ks=(10, 20)))


# ---------------------------------------------------------------- drift
@pytest.fixture(scope="module")
def shops() -> dict[str, tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]]:
    return {"steady": _split(*generate_shop(N_EVENTS, seed=3, n_days=N_DAYS)),
            "steady, another seed": _split(*generate_shop(N_EVENTS, seed=4, n_days=N_DAYS)),
            "shifted": _split(*shifted_shop(seed=3)),
            "new regime": _split(*shifted_shop(seed=3, behaviour=False))}


@pytest.mark.parametrize("shop", ["steady", "steady, another seed"])
def test_drift_does_not_flag_an_unshifted_shop(shops, shop):
    checks = {c.name: c for c in drift_checks(*shops[shop])}
    assert tuple(checks) == DRIFT_CHECKS
    assert [c.line() for c in checks.values() if c.status != OK] == []


def test_drift_flags_every_check_of_a_shifted_shop(shops):
    steady = {c.name: c for c in drift_checks(*shops["steady"])}
    shifted = {c.name: c for c in drift_checks(*shops["shifted"])}
    assert [name for name, c in shifted.items() if c.status != FLAGGED] == []
    for name in ("event_type_mix", "unknown_users", "unknown_items", "category_mix", "price"):
        assert shifted[name].value > 2 * steady[name].value, name
    assert shifted["top_items_overlap"].value < steady["top_items_overlap"].value
    assert "purchase" in shifted["event_type_mix"].detail
    assert "c8/" in shifted["category_mix"].detail
    assert {shifted["unknown_users"].tool, shifted["price"].tool} == {"gx", "scipy"}


def test_the_generators_regime_change_flags_what_it_shifts(shops):
    checks = {c.name: c for c in drift_checks(*shops["new regime"])}
    assert {name for name, c in checks.items() if c.flagged} == {
        "unknown_items", "top_items_overlap", "category_mix", "price"}
    assert "c8/" in checks["category_mix"].detail  # the launched category


def test_the_unknown_shares_checked_by_gx_are_the_daily_shares_pooled(shops):
    reference, new, items = shops["shifted"]
    users, known_items = unknown_share_checks(reference, new)
    daily = daily_drift(reference, new, items)
    assert daily.height == 7
    for check, column in ((users, "unknown_users"), (known_items, "unknown_items")):
        pooled = (daily[column] * daily["events"]).sum() / daily["events"].sum()
        assert check.value == pytest.approx(pooled)
    strict = MonitorSettings(max_unknown_user_share=0.6)
    assert unknown_share_checks(reference, new, strict)[0].status == OK


def test_checks_without_categories_or_prices_are_skipped_with_the_reason(shops):
    reference, new, _ = shops["steady"]
    checks = {c.name: c for c in drift_checks(reference.drop("price"), new.drop("price"))}
    assert checks["category_mix"].status == SKIPPED
    assert "category_id" in checks["category_mix"].detail
    assert checks["price"].status == SKIPPED
    assert "n/a" in checks["price"].line()
    empty = {c.name: c for c in drift_checks(reference, new.clear())}
    assert {c.status for c in empty.values()} == {SKIPPED}


def test_distances_are_zero_for_equal_samples_and_grow_with_the_shift():
    views = pl.Series(["view"] * 90 + ["purchase"] * 10)
    assert js_distance(views, views.sample(fraction=1.0, shuffle=True, seed=0)) == 0.0
    assert js_distance(views, pl.Series(["view"] * 50 + ["purchase"] * 50)) > 0.2
    prices = pl.Series(np.random.default_rng(0).lognormal(3, 1, 5000))
    assert price_distance(prices, prices) == 0.0
    assert price_distance(prices, prices * 3) == pytest.approx(math.log(3), rel=0.1)


# ---------------------------------------------------------------- verdict
def _daily(ndcg: list[float], users: list[int]) -> pl.DataFrame:
    days = [dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in range(len(ndcg))]
    return pl.DataFrame({"day": days, "users": users, "ndcg@10": ndcg})


def test_decay_is_flagged_below_the_tolerance_and_not_otherwise():
    settings = MonitorSettings(decay_tolerance=0.1, decay_days=2, min_decay_users=50)
    # gate 0.20: decay below 0.18; only the last two days count, weighted by their users
    fine = decay_check(_daily([0.05, 0.19, 0.18], [100, 100, 100]), 0.20, settings)
    assert fine.status == OK
    assert fine.value == pytest.approx(0.185)
    assert fine.threshold == pytest.approx(0.18)
    decayed = decay_check(_daily([0.30, 0.15, 0.25], [100, 300, 100]), 0.20, settings)
    assert decayed.status == FLAGGED  # (0.15 * 300 + 0.25 * 100) / 400 = 0.175
    assert decayed.value == pytest.approx(0.175)
    dropped = _daily([0.165, 0.17], [100, 100])  # 16% below the gate
    assert decay_check(dropped, 0.20, settings).status == FLAGGED
    assert decay_check(dropped, 0.20, MonitorSettings(decay_tolerance=0.2)).status == OK


def test_decay_is_skipped_without_a_gate_figure_or_enough_users():
    assert decay_check(_daily([0.1, 0.1], [100, 100]), None).status == SKIPPED
    few = decay_check(_daily([0.0, 0.0], [10, 10]), 0.2)
    assert few.status == SKIPPED
    assert "min_decay_users" in few.detail


def test_the_verdict_lists_one_line_per_check_and_flags_decay_or_drift():
    drift = [CheckResult("event_type_mix", 0.01, 0.1, False, "", "max", "scipy")]
    healthy = verdict(_daily([0.2, 0.2], [100, 100]), 0.2, drift)
    assert not healthy.flagged
    assert healthy.lines[0].split() == ["decay", "ndcg@10", "0.2000", ">=", "0.1800", "OK"]
    assert healthy.lines[1].split() == ["event_type_mix", "0.0100", "<=", "0.1000", "OK"]
    decayed = verdict(_daily([0.2, 0.1], [100, 100]), 0.2, drift)
    assert decayed.flagged
    assert decayed.decayed
    assert decayed.lines[0].endswith("FLAGGED")
    drifted = verdict(_daily([0.2, 0.2], [100, 100]), 0.2,
                      [CheckResult("price", 0.5, 0.2, True, "", "max", "scipy")])
    assert drifted.flagged
    assert drifted.drifted
    assert not drifted.decayed


def test_settings_refuse_an_unknown_metric_and_extra_fields():
    with pytest.raises(ValidationError, match="decay_metric"):
        MonitorSettings(decay_metric="ndgc@10")
    with pytest.raises(ValidationError):
        MonitorSettings(decay_tolerence=0.2)


# ---------------------------------------------------------------- plot
def test_the_plot_is_written_as_a_png(tmp_path, shops):
    reference, new, items = shops["steady"]
    daily = _daily([0.21, 0.19, 0.17], [100, 120, 90])
    path = plot_monitor(daily, 0.2, tmp_path / "plots" / "monitor.png",
                        drift=daily_drift(reference, new, items), returning=daily)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    plain = plot_monitor(daily, None, tmp_path / "plain.png")
    assert plain.read_bytes()[:4] == b"\x89PNG"
