"""Tests of the built-in synthetic shop: schema, determinism and the realism models rely on."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flows.cli import run
from models.baselines import Popularity
from models.columns import (
    CATEGORY,
    DESCRIPTION,
    EVENT_DTYPES,
    EVENT_TYPE,
    ITEM,
    ITEM_DTYPES,
    PRICE,
    QUANTITY,
    SESSION,
    TIMESTAMP,
    TITLE,
    USER,
)
from models.errors import ConfigError
from models.metrics import evaluate
from tasks.data.demo_catalogue import WORDS
from tasks.data.demo_data import (
    DEFAULT_END,
    DemoShop,
    generate_shop,
    generate_shop_batches,
    write_demo_shop,
)
from tasks.data.demo_sessions import user_tastes

N_EVENTS = 30_000
SHIFT_DAY = 40  # of the default 60 days
FIRST_DAY = DEFAULT_END - dt.timedelta(days=60)
SHIFT_AT = FIRST_DAY + dt.timedelta(days=SHIFT_DAY)
LAUNCHED = pl.col(CATEGORY).str.starts_with("c8/")
# Fingerprints (see _fingerprint) of generate_shop(N_EVENTS, seed=0) and of the batches of
# generate_shop_batches(5_000, 2, batch_users=40), shops with tastes and item texts (numpy 2.4,
# polars 2.1, x86-64). Seeded tests and benchmarks rely on these tables: a change here changes
# them all. Only a change of the shop's behaviour or of numpy's random streams may move them.
SHOP_FINGERPRINTS = (
    "97b71f135e5165a6b70c87bef3f94997b40cba0088f0f7240d911d74891ad20e",
    "f716ad9891b58ab5b0cb00389751d9ef7ca5efcb356e3aff851f7c51f6babc0b",
)
BATCH_FINGERPRINTS = (
    "af61deda14274c94d363ff2552b1d44093085c6a5c575dde4fad686d5efbd536",
    "2d17bd09c42161f62796b307e096fbca1771173443b77332926f3ea41f950436",
)

DTYPES = {
    "String": pl.String,
    "Float64": pl.Float64,
    "Int64": pl.Int64,
    "Datetime(us, UTC)": pl.Datetime("us", "UTC"),
}


@pytest.fixture(scope="module")
def shop() -> tuple[pl.DataFrame, pl.DataFrame]:
    return generate_shop(N_EVENTS, seed=0)


@pytest.fixture(scope="module")
def shifted() -> tuple[pl.DataFrame, pl.DataFrame]:
    return generate_shop(N_EVENTS, seed=0, shift_day=SHIFT_DAY)


@pytest.fixture(scope="module")
def events(shop: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    return shop[0]


@pytest.fixture(scope="module")
def items(shop: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    return shop[1]


@pytest.fixture(scope="module")
def views(events: pl.DataFrame) -> pl.DataFrame:
    return events.filter(pl.col(EVENT_TYPE) == "view")


def _counts(events: pl.DataFrame) -> dict[str, int]:
    return dict(events[EVENT_TYPE].value_counts().iter_rows())


def _fingerprint(frame: pl.DataFrame) -> str:
    """SHA-256 of every column's values (strings joined, other columns' raw bytes)."""
    digest = hashlib.sha256()
    for name in frame.columns:
        column = frame[name]
        digest.update(name.encode())
        if column.dtype == pl.String:
            digest.update("\x1f".join(column.to_list()).encode())
        else:
            digest.update(column.to_physical().to_numpy().tobytes())
    return digest.hexdigest()


def _alternatives(words: tuple[str, ...]) -> str:
    return "|".join(re.escape(w) for w in words)


def _read_texts(items: pl.DataFrame) -> pl.DataFrame:
    """The attributes each item's title and description name (null where a text does not parse).

    Titles read "<Brand> <style> <colour> <material> <noun>", descriptions "A <style> <noun>
    for <use>, in <colour> <material>." ("with" for consumables), in the words of WORDS[top].
    """
    rows = []
    for item, category, title, description in items.select(
            ITEM, CATEGORY, TITLE, DESCRIPTION).iter_rows():
        top = int(category.split("/")[0][1:])
        w = WORDS[top]
        style, colour, material = (_alternatives(w.style), _alternatives(w.colour),
                                   _alternatives(w.material))
        named = re.fullmatch(rf"\S+ ({style}) ({colour}) ({material}) (.+)", title)
        told = re.fullmatch(rf"An? ({style}) (.+) for ({_alternatives(w.use)}), {w.joiner} "
                            rf"({colour}) ({material})\.", description)
        rows.append({ITEM: item, CATEGORY: category, "top": top,
                     "title": named and named.groups(), "description": told and told.groups()})
    read = pl.DataFrame(rows, schema={ITEM: pl.String, CATEGORY: pl.String, "top": pl.Int64,
                                      "title": pl.List(pl.String),
                                      "description": pl.List(pl.String)})
    return read.with_columns(
        style=pl.col("title").list.get(0), colour=pl.col("title").list.get(1),
        material=pl.col("title").list.get(2), noun=pl.col("title").list.get(3),
        told_style=pl.col("description").list.get(0), told_noun=pl.col("description").list.get(1),
        use=pl.col("description").list.get(2), told_colour=pl.col("description").list.get(3),
        told_material=pl.col("description").list.get(4),
    ).drop("title", "description")


def _preferred_share(views: pl.DataFrame, items: pl.DataFrame, seed: int, n_users: int,
                     attribute: str) -> tuple[float, float]:
    """Share of views of an item of a preferred value of ``attribute``, and that share by chance.

    By chance: the share of the items of each viewed item's category with a preferred value, as
    if users drew the items of a category regardless of their tastes.
    """
    read = _read_texts(items)
    vocabulary = {top: getattr(w, attribute) for top, w in enumerate(WORDS)}
    value = np.array([vocabulary[t].index(v)
                      for t, v in zip(read["top"], read[attribute], strict=True)])
    read = read.with_columns(value=value)
    viewed = views.join(read.select(ITEM, CATEGORY, "value"), on=ITEM)
    user = viewed[USER].str.slice(1).cast(pl.Int64).to_numpy()
    preferred = getattr(user_tastes(seed, 0, n_users), attribute)[user]  # (views, 2)
    share = (preferred == viewed["value"].to_numpy()[:, None]).any(axis=1).mean()
    mix = read.group_by(CATEGORY, "value").len().with_columns(
        (pl.col("len") / pl.col("len").sum().over(CATEGORY)).alias("p"))
    chance = 0.0
    for column in range(2):
        taken = viewed.select(CATEGORY, pl.Series("value", preferred[:, column]).cast(pl.Int64))
        p = taken.join(mix, on=[CATEGORY, "value"], how="left")["p"].fill_null(0.0).to_numpy()
        chance += np.where((column == 0) | (preferred[:, 1] != preferred[:, 0]), p, 0.0).mean()
    return float(share), float(chance)


def _day(day: int) -> dt.datetime:
    return FIRST_DAY + dt.timedelta(days=day)


def _days(events: pl.DataFrame, first: int, stop: int) -> pl.DataFrame:
    """The events of days ``first .. stop-1`` of the shop."""
    return events.filter(pl.col(TIMESTAMP).is_between(_day(first), _day(stop), closed="left"))


def _category_shift(events: pl.DataFrame, items: pl.DataFrame, level: pl.Expr) -> float:
    """Total variation distance between the events' category mix before and after SHIFT_AT."""
    labelled = events.join(items.select(ITEM, CATEGORY), on=ITEM).with_columns(level.alias("c"))
    before, after = (
        part.group_by("c").agg((pl.len() / part.height).alias(name))
        for part, name in ((labelled.filter(pl.col(TIMESTAMP) < SHIFT_AT), "before"),
                           (labelled.filter(pl.col(TIMESTAMP) >= SHIFT_AT), "after"))
    )
    both = before.join(after, on="c", how="full", coalesce=True).fill_null(0.0)
    return both.select((pl.col("before") - pl.col("after")).abs().sum() / 2).item()


# ---------------------------------------------------------------- schema and determinism


def test_tables_have_the_canonical_columns_and_dtypes(events, items):
    assert events.columns == [USER, ITEM, EVENT_TYPE, TIMESTAMP, SESSION, PRICE, QUANTITY]
    assert {c: events.schema[c] for c in events.columns} == {
        c: DTYPES[EVENT_DTYPES[c]] for c in events.columns
    }
    assert set(items.columns) <= set(ITEM_DTYPES)
    assert {c: items.schema[c] for c in items.columns} == {
        c: DTYPES[ITEM_DTYPES[c]] for c in items.columns
    }
    assert events.null_count().sum_horizontal().item() == 0
    assert items.null_count().sum_horizontal().item() == 0


def test_ids_have_their_documented_form(events, items):
    assert events[USER].str.contains(r"^u\d{6}$").all()
    assert events[ITEM].str.contains(r"^i\d{5}$").all()
    assert events[SESSION].str.contains(r"^s\d{7}$").all()
    assert items[CATEGORY].str.contains(r"^c(\d)/c\d\.\d+$").all()
    parts = items[CATEGORY].str.split("/")
    assert (parts.list.last().str.split(".").list.first() == parts.list.first()).all()


def test_without_a_shift_the_shop_is_the_pinned_one(events, items):
    assert (_fingerprint(events), _fingerprint(items)) == SHOP_FINGERPRINTS
    again_events, again_items = generate_shop(N_EVENTS, seed=0, shift_day=None)
    assert again_events.equals(events)
    assert again_items.equals(items)
    batch_items, batches = generate_shop_batches(5_000, 2, batch_users=40, shift_day=None)
    assert (_fingerprint(pl.concat(list(batches))), _fingerprint(batch_items)) == (
        BATCH_FINGERPRINTS)


def test_same_seed_gives_identical_frames_and_another_seed_differs(events, items):
    again_events, again_items = generate_shop(N_EVENTS, seed=0)
    assert again_events.equals(events)
    assert again_items.equals(items)
    other_events, other_items = generate_shop(N_EVENTS, seed=1)
    assert not other_events.equals(events)
    assert not other_items.equals(items)
    assert not other_items[DESCRIPTION].equals(items[DESCRIPTION])


def test_a_users_tastes_depend_on_the_seed_and_the_users_number_only():
    whole = user_tastes(0, 0, 70_010)
    part = user_tastes(0, 69_990, 70_010)  # across two blocks of users
    assert (part.style == whole.style[69_990:]).all()
    assert (part.colour == whole.colour[69_990:]).all()
    again = user_tastes(0, 0, 70_010)
    assert (again.style == whole.style).all()
    assert (again.colour == whole.colour).all()
    other = user_tastes(1, 0, 70_010)
    assert (other.style != whole.style).any()
    assert (other.colour != whole.colour).any()
    assert 0.4 < (whole.style[:, 0] == whole.style[:, 1]).mean() < 0.6  # one or two styles


@pytest.mark.parametrize("n_events", [2_000, 30_000, 120_000])
def test_event_count_is_close_to_the_request(n_events):
    events, _ = generate_shop(n_events, seed=3)
    assert abs(events.height - n_events) / n_events < 0.03


def test_users_and_items_scale_with_the_number_of_events(events, items):
    assert items.height == N_EVENTS // 60
    assert 0.6 * N_EVENTS / 40 < events[USER].n_unique() <= N_EVENTS / 40
    assert items[ITEM].is_unique().all()
    assert items[ITEM].is_sorted()


# ---------------------------------------------------------------- catalogue


def test_every_event_item_is_in_the_catalogue_with_its_price(events, items):
    joined = events.join(items.select(ITEM, pl.col(PRICE).alias("list_price")), on=ITEM, how="left")
    assert joined["list_price"].null_count() == 0
    assert (joined[PRICE] == joined["list_price"]).all()


def test_prices_are_positive_and_differ_by_category(items):
    assert (items[PRICE] > 0).all()
    by_top = items.group_by(pl.col(CATEGORY).str.split("/").list.first().alias("top")).agg(
        pl.col(PRICE).median()
    )
    assert by_top[PRICE].max() / by_top[PRICE].min() > 5


def test_categories_form_a_tree_and_titles_name_brand_and_item(items):
    assert items[CATEGORY].str.split("/").list.first().n_unique() == 8
    assert items[CATEGORY].n_unique() >= 16
    assert items["brand"].n_unique() >= 8
    assert all(
        title.startswith(brand) for title, brand in zip(items["title"], items["brand"], strict=True)
    )


def test_titles_and_descriptions_name_the_items_attributes(items, shifted):
    for frame in (items, shifted[1]):  # the launched category's items too
        read = _read_texts(frame)
        assert read.height == frame.height
        assert read.null_count().sum_horizontal().item() == 0  # every text parses
        for told in ("style", "noun", "colour", "material"):
            assert (read[told] == read[f"told_{told}"]).all(), told
        assert read.group_by(CATEGORY).agg(pl.col("noun").n_unique())["noun"].max() == 1
    assert not items[TITLE].str.contains(r" item \d").any()  # words, not item numbers
    read = _read_texts(items)
    assert read.group_by("top").agg(pl.col("style").n_unique())["style"].min() == 5
    assert read["material"].n_unique() > 30  # the words differ by top-level category
    assert read.filter(pl.col("top") == 0)["colour"].is_in(["spicy", "sweet", "organic"]).any()


# ---------------------------------------------------------------- behaviour


def test_funnel_rates_are_realistic(events):
    counts = _counts(events)
    assert 0.05 <= counts["cart"] / counts["view"] <= 0.10
    assert 0.30 <= counts["purchase"] / counts["cart"] <= 0.50
    assert 0.015 <= counts["fav"] / counts["view"] <= 0.035


@pytest.mark.parametrize("event_type", ["cart", "fav", "purchase"])
def test_each_action_follows_a_view_of_the_same_item_by_the_same_user(events, views, event_type):
    first_view = views.group_by(USER, ITEM).agg(pl.col(TIMESTAMP).min().alias("first_view"))
    acts = events.filter(pl.col(EVENT_TYPE) == event_type).join(
        first_view, on=[USER, ITEM], how="left"
    )
    assert acts.height > 0
    assert acts["first_view"].null_count() == 0
    assert (acts["first_view"] < acts[TIMESTAMP]).all()


def test_quantities_are_one_except_for_purchases(events):
    others = events.filter(pl.col(EVENT_TYPE) != "purchase")
    assert (others[QUANTITY] == 1).all()
    bought = events.filter(pl.col(EVENT_TYPE) == "purchase")[QUANTITY]
    assert bought.min() >= 1
    assert bought.max() > 1


def test_item_and_user_activity_is_heavy_tailed(views, items):
    per_item = np.sort(views[ITEM].value_counts()["count"].to_numpy())[::-1]
    assert per_item[: items.height // 10].sum() / per_item.sum() > 0.4
    per_user = np.sort(views[USER].value_counts()["count"].to_numpy())[::-1]
    assert per_user[: len(per_user) // 10].sum() / per_user.sum() > 0.3
    assert per_user[0] > 10 * np.median(per_user)


def test_consumables_are_bought_again_by_the_same_user(events, items):
    top = pl.col(CATEGORY).str.split("/").list.first()
    buys = events.filter(pl.col(EVENT_TYPE) == "purchase").join(items, on=ITEM)
    buys = buys.with_columns(top.is_in(["c0", "c1", "c2"]).alias("consumable"))
    repeats = buys.group_by(USER, ITEM).agg(
        pl.col(SESSION).n_unique().alias("sessions"), pl.col("consumable").first()
    ).filter(pl.col("sessions") > 1)
    assert repeats.height >= 20
    assert repeats["consumable"].mean() > 1.5 * buys["consumable"].mean()


def test_consecutive_views_in_a_session_share_a_category_far_more_than_random_pairs(views, items):
    ordered = views.join(items.select(ITEM, CATEGORY), on=ITEM).sort(SESSION, TIMESTAMP)
    same_session = ordered[SESSION] == ordered[SESSION].shift(1)
    same_category = ordered[CATEGORY] == ordered[CATEGORY].shift(1)
    different_item = ordered[ITEM] != ordered[ITEM].shift(1)
    pairs = same_session & different_item
    consecutive = (same_category & pairs).sum() / pairs.sum()
    categories = ordered[CATEGORY].to_numpy()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(categories), (2, 20_000))
    assert consecutive > 0.5
    assert consecutive > 4 * (categories[a] == categories[b]).mean()


def test_users_views_keep_to_their_preferred_styles_and_colours(views, items):
    n_users = N_EVENTS // 40
    style, style_chance = _preferred_share(views, items, 0, n_users, "style")
    colour, colour_chance = _preferred_share(views, items, 0, n_users, "colour")
    assert style > 0.5  # measured: 0.61
    assert style > 1.6 * style_chance  # measured chance: 0.29
    assert colour > 1.2 * colour_chance  # measured: 0.27 against 0.19
    others, others_chance = _preferred_share(views, items, 1, n_users, "style")  # wrong tastes
    assert abs(others - others_chance) < 0.05  # measured: 0.32 against 0.31
    batch_items, batches = generate_shop_batches(N_EVENTS, seed=0, batch_users=100)
    batch_views = pl.concat(list(batches)).filter(pl.col(EVENT_TYPE) == "view")
    in_batches, chance = _preferred_share(batch_views, batch_items, 0, n_users, "style")
    assert in_batches > 1.6 * chance  # each batch's users keep their tastes: 0.62 against 0.31


def test_sessions_focus_on_one_or_two_categories(views, items):
    per_session = views.join(items.select(ITEM, CATEGORY), on=ITEM).group_by(SESSION).agg(
        pl.col(CATEGORY).n_unique().alias("categories"), pl.len().alias("views")
    )
    long_sessions = per_session.filter(pl.col("views") >= 5)
    assert (long_sessions["categories"] <= 2).mean() > 0.6


# ---------------------------------------------------------------- time


def test_timestamps_are_sorted_and_inside_the_window():
    end = dt.datetime(2024, 3, 10, 15, 30)  # naive: read as UTC
    events, _ = generate_shop(5_000, seed=2, n_days=14, end=end)
    end_utc = end.replace(tzinfo=dt.UTC)
    assert events[TIMESTAMP].is_sorted()
    assert events[TIMESTAMP].max() < end_utc
    assert events[TIMESTAMP].min() >= end_utc - dt.timedelta(days=14)
    assert events[TIMESTAMP].max() > end_utc - dt.timedelta(days=1)


def test_default_window_ends_at_the_fixed_end_date(events):
    assert events[TIMESTAMP].max() < DEFAULT_END
    assert events[TIMESTAMP].min() >= DEFAULT_END - dt.timedelta(days=60)


def test_evenings_and_weekends_are_busier(events):
    hour = events[TIMESTAMP].dt.hour()
    assert (hour.is_between(18, 22)).sum() / 5 > 2 * (hour.is_between(6, 10)).sum() / 5
    daily = events.group_by(pl.col(TIMESTAMP).dt.date().alias("day")).len()
    weekend = daily["day"].dt.weekday() >= 6
    assert daily.filter(weekend)["len"].mean() > 1.15 * daily.filter(~weekend)["len"].mean()


def test_recent_popularity_predicts_the_next_week_better_than_all_time():
    events, items = generate_shop(40_000, seed=0)
    views = events.filter(pl.col(EVENT_TYPE) == "view")
    cut = DEFAULT_END - dt.timedelta(days=7)
    history, future = views.filter(pl.col(TIMESTAMP) < cut), views.filter(pl.col(TIMESTAMP) >= cut)
    recent = history.filter(pl.col(TIMESTAMP) >= cut - dt.timedelta(days=7))

    def top(frame: pl.DataFrame) -> pl.Series:
        counts = frame[ITEM].value_counts().sort("count", ITEM, descending=[True, False])
        return counts[ITEM].head(items.height // 10)

    all_time_hits = future[ITEM].is_in(top(history).implode()).mean()
    recent_hits = future[ITEM].is_in(top(recent).implode()).mean()
    assert recent_hits > all_time_hits + 0.02


# ---------------------------------------------------------------- regime change (shift_day)


def test_before_the_shift_day_the_shop_is_the_unshifted_one(events, items, shifted):
    shifted_events, shifted_items = shifted
    before = pl.col(TIMESTAMP) < SHIFT_AT
    assert shifted_events.filter(before).height > 0.6 * events.height
    assert shifted_events.filter(before).equals(events.filter(before))
    assert not shifted_events.filter(~before).equals(events.filter(~before))
    assert abs(shifted_events.height - events.height) / events.height < 0.03
    assert shifted_items.join(items, on=ITEM, how="semi").equals(items)  # old items unchanged


def test_the_new_category_launches_on_the_shift_day_and_most_shoppers_adopt_it(items, shifted):
    shifted_events, shifted_items = shifted
    launched = shifted_items.join(items, on=ITEM, how="anti")
    assert launched.height >= 9
    assert launched.select(LAUNCHED.all()).item()
    assert not items.select(LAUNCHED.any()).item()  # a category that did not exist before
    labelled = shifted_events.join(shifted_items.select(ITEM, CATEGORY), on=ITEM)
    new = labelled.filter(LAUNCHED)
    assert _day(SHIFT_DAY) <= new[TIMESTAMP].min() < _day(SHIFT_DAY + 1)
    assert new[ITEM].n_unique() == launched.height
    after = labelled.filter(pl.col(TIMESTAMP) >= SHIFT_AT)
    assert after.select(LAUNCHED.mean()).item() > 0.2  # of every event after the shift
    bought = after.filter(pl.col(EVENT_TYPE) == "purchase")
    assert bought.select(LAUNCHED.mean()).item() > 0.1
    shoppers = after.group_by(USER).agg(LAUNCHED.any().alias("adopted"))
    assert shoppers["adopted"].mean() > 0.3
    for day in (SHIFT_DAY + 1, SHIFT_DAY + 2):  # among the most viewed items within a day or two
        viewed = _days(labelled, day, day + 1).filter(pl.col(EVENT_TYPE) == "view")
        top = viewed.group_by(ITEM, CATEGORY).len().sort("len", ITEM, descending=[True, False])
        assert top.head(10).select(LAUNCHED.sum()).item() >= 3


def test_the_category_mix_changes_a_lot_with_a_shift_and_not_without(events, items, shifted):
    top = pl.col(CATEGORY).str.split("/").list.first()
    for level in (top, pl.col(CATEGORY)):  # measured, top level / category_id:
        assert _category_shift(events, items, level) < 0.1  # 0.03 / 0.04
        assert _category_shift(*shifted, level) > 0.3  # 0.43 / 0.47
    old = shifted[0].join(items, on=ITEM, how="semi")  # the taste shift alone, without c8
    assert _category_shift(old, items, pl.col(CATEGORY)) > 0.2  # measured: 0.36


def test_the_shifted_shop_keeps_the_tables_and_the_funnel(shifted):
    shifted_events, shifted_items = shifted
    assert shifted_events.schema == generate_shop(1_000, seed=0)[0].schema
    assert shifted_events[TIMESTAMP].is_sorted()
    assert shifted_events[TIMESTAMP].max() < DEFAULT_END
    assert shifted_items[ITEM].is_unique().all()
    assert shifted_items[ITEM].is_sorted()
    listed = shifted_events.join(shifted_items.select(ITEM, pl.col(PRICE).alias("list")), on=ITEM,
                                 how="left")
    assert (listed[PRICE] == listed["list"]).all()
    first_view = shifted_events.filter(pl.col(EVENT_TYPE) == "view").group_by(USER, ITEM).agg(
        pl.col(TIMESTAMP).min().alias("first_view"))
    acts = shifted_events.filter(pl.col(EVENT_TYPE) != "view").join(first_view, on=[USER, ITEM],
                                                                    how="left")
    assert (acts["first_view"] < acts[TIMESTAMP]).all()
    counts = _counts(_days(shifted_events, SHIFT_DAY, 60))
    assert 0.05 <= counts["cart"] / counts["view"] <= 0.10
    assert 0.30 <= counts["purchase"] / counts["cart"] <= 0.50
    assert shifted_events.group_by(SESSION).agg(pl.col(USER).n_unique())[USER].max() == 1


def _ndcg_after_shift(events: pl.DataFrame, fitted_until: int) -> float:
    """NDCG@10 on days SHIFT_DAY+2 .. +5 of recent popularity (2 days) fitted until a day."""
    future = _days(events, SHIFT_DAY + 2, SHIFT_DAY + 6).select(USER, ITEM).unique()
    model = Popularity(window_days=2.0).fit(events.filter(pl.col(TIMESTAMP) < _day(fitted_until)))
    recs = model.recommend(future[USER].unique(), k=10)
    return evaluate(recs, future, ks=[10])["ndcg@10"]


def test_a_model_fitted_before_the_shift_loses_quality_and_a_refit_recovers(events, shifted):
    unshifted = _ndcg_after_shift(events, SHIFT_DAY)  # measured: 0.164
    stale = _ndcg_after_shift(shifted[0], SHIFT_DAY)  # measured: 0.039
    refitted = _ndcg_after_shift(shifted[0], SHIFT_DAY + 2)  # measured: 0.195
    assert stale < 0.5 * unshifted
    assert refitted - stale > 0.6 * (unshifted - stale)
    all_time = Popularity().fit(shifted[0].filter(pl.col(TIMESTAMP) < SHIFT_AT))
    future = _days(shifted[0], SHIFT_DAY + 2, SHIFT_DAY + 6).select(USER, ITEM).unique()
    recs = all_time.recommend(future[USER].unique(), k=10)
    assert evaluate(recs, future, ks=[10])["ndcg@10"] < 0.5 * unshifted


def test_batches_shift_alike():
    plain_items, plain = generate_shop_batches(5_000, 2, batch_users=40)
    items, shifted = generate_shop_batches(5_000, 2, batch_users=40, shift_day=SHIFT_DAY)
    assert items.join(plain_items, on=ITEM, how="semi").equals(plain_items)
    before = pl.col(TIMESTAMP) < SHIFT_AT
    launched = items.join(plain_items, on=ITEM, how="anti")[ITEM].implode()
    frames = list(zip(plain, shifted, strict=True))
    assert frames[0][1].filter(before).equals(frames[0][0].filter(before))
    for old, new in frames:  # later batches' session ids follow the sessions of earlier ones
        assert new.filter(before).drop(SESSION).equals(old.filter(before).drop(SESSION))
        offset = (new.filter(before)[SESSION].str.slice(1).cast(pl.Int64)
                  - old.filter(before)[SESSION].str.slice(1).cast(pl.Int64))
        assert offset.n_unique() == 1
        assert new.filter(pl.col(ITEM).is_in(launched))[TIMESTAMP].min() >= SHIFT_AT
    after = pl.concat([new for _, new in frames]).filter(~before)
    assert after[ITEM].is_in(launched).mean() > 0.2


def test_demo_data_shift_day_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shop"
    assert run(["demo-data", "--out", str(out), "--events", "3000", "--shift-day", "30"]) == 0
    events, items = generate_shop(3_000, seed=0, shift_day=30)
    assert pl.read_parquet(out / "events.parquet").equals(events)
    assert pl.read_parquet(out / "items.parquet").equals(items)
    assert run(["demo-data", "--out", str(tmp_path / "x"), "--shift-day", "60"]) == 2
    assert "allowed days are from 1 to 59" in capsys.readouterr().err


@pytest.mark.parametrize(("n_days", "shift_day", "allowed"), [
    (60, 0, "from 1 to 59"), (60, 60, "from 1 to 59"), (60, -5, "from 1 to 59"),
    (14, 20, "from 1 to 13"), (1, 1, "a one-day shop has no later day"),
])
def test_a_shift_day_outside_the_shop_raises_a_config_error(n_days, shift_day, allowed):
    with pytest.raises(ConfigError, match=f"shift_day={shift_day} .*{allowed}"):
        generate_shop(2_000, n_days=n_days, shift_day=shift_day)
    with pytest.raises(ConfigError, match=allowed):
        write_demo_shop(Path("unused"), 2_000, n_days=n_days, shards=2, shift_day=shift_day)


# ---------------------------------------------------------------- writing and errors


def test_write_demo_shop_writes_parquet_that_reads_back(tmp_path):
    shop = write_demo_shop(tmp_path / "demo", n_events=3_000, seed=5)
    assert shop == DemoShop(
        events=tmp_path / "demo" / "events.parquet", items=tmp_path / "demo" / "items.parquet"
    )
    events, items = generate_shop(3_000, seed=5)
    assert pl.read_parquet(shop.events).equals(events)
    assert pl.read_parquet(shop.items).equals(items)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"n_events": 10}, "n_events=10"), ({"n_days": 0}, "n_days=0"), ({"seed": -1}, "seed=-1")],
)
def test_out_of_range_arguments_raise_a_config_error(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        generate_shop(**kwargs)


def test_unwritable_folder_raises_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write the demo shop"):
        write_demo_shop(blocker / "demo", n_events=1_000)
