"""The feature families of a (user, candidate) pair: user, user x item, category, attributes, links.

Each function measures back from the history's last event (``end``) and never past it; the
item features are whole-history tables (:mod:`tasks.ranking.history_tables`). Assembled by
:class:`tasks.ranking.features.FeatureBuilder`.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from models.baselines import DEFAULT_EVENT_WEIGHTS, CoVisitation
from models.columns import (
    ATTRIBUTES,
    CATEGORY,
    EVENT_TYPE,
    EVENT_TYPES,
    ITEM,
    PRICE,
    SCORE,
    TIMESTAMP,
    USER,
)
from models.item_text import VECTOR
from tasks.ranking.candidate_sources import POS, WEIGHT
from tasks.ranking.history_tables import (
    days as _days,
)
from tasks.ranking.history_tables import (
    window_name,
)

US_PER_HOUR = 3_600 * 1e6
_PAIR_BLOCK = 1 << 16  # pairs whose vectors are gathered at once (x 256 floats: 64 MiB)


class FeatureConfig(BaseModel):
    """Windows and depths of the features."""

    model_config = ConfigDict(extra="forbid")

    windows_days: list[float] = Field(
        [1.0, 3.0, 7.0, 30.0], description="Item popularity windows before the history end."
    )
    half_lives_days: list[float] = Field(
        [0.25, 2.0], description="Half-lives of the decayed weighted counts of a user's item."
    )
    tail_events: int = Field(3, gt=0, description="Latest events per user in tail popularity.")
    recent_items: int = Field(5, gt=0, description="Latest items of a user for attribute overlap.")
    recent_events: int = Field(20, gt=0, description="Latest events of a user for category share.")
    session_gap_minutes: float = Field(
        30.0, gt=0, description="Inactivity that ends a session (for session counts)."
    )
    event_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="Weight of each event type in weighted counts.",
    )


def _type_counts(prefix: str) -> list[pl.Expr]:
    return [(pl.col(EVENT_TYPE) == t).sum().cast(pl.Float64).alias(f"{prefix}_n_{t}")
            for t in EVENT_TYPES]


def user_features(hist: pl.DataFrame, end: object, real_time: bool,
                  categories: pl.DataFrame | None, prices: pl.DataFrame | None) -> pl.DataFrame:
    """One row per user of ``hist``: activity, breadth, price level, recency and context."""
    aggs = [pl.len().cast(pl.Float64).alias("u_n_events"), *_type_counts("u"),
            pl.col(ITEM).n_unique().cast(pl.Float64).alias("u_n_items")]
    if real_time:
        last = pl.col(TIMESTAMP).max()
        aggs += [_days(pl.lit(end) - last).alias("u_days_since_last"),
                 (_days(pl.lit(end) - pl.col(TIMESTAMP)) <= 1).sum().cast(pl.Float64)
                 .alias("u_n_events_1d"),
                 _days(last - pl.col(TIMESTAMP).min()).alias("u_span_days"),
                 last.dt.hour().cast(pl.Float64).alias("ctx_last_hour"),
                 last.dt.weekday().cast(pl.Float64).alias("ctx_last_weekday")]
    frame = hist
    if categories is not None:
        frame = frame.join(categories, on=ITEM, how="left")
        aggs.append(pl.col(CATEGORY).drop_nulls().n_unique().cast(pl.Float64).alias("u_n_categories"))
    if prices is not None:
        frame = frame.join(prices.rename({PRICE: "__price"}), on=ITEM, how="left")
        aggs.append(pl.col("__price").mean().alias("u_mean_price"))
    return frame.group_by(USER).agg(aggs)


def user_item_features(pairs: pl.DataFrame, hist: pl.DataFrame, end: object, real_time: bool,
                       config: FeatureConfig) -> pl.DataFrame:
    """``user_id, item_id`` of ``pairs`` with the user's past interactions with the item.

    Returns only the pairs with a past interaction; the caller fills the others.
    """
    aggs = [pl.len().cast(pl.Float64).alias("ui_n_events"), *_type_counts("ui"),
            (pl.col("__last").first() - pl.col(POS).max()).cast(pl.Float64)
            .alias("ui_steps_since_last"),
            pl.col(WEIGHT).max().alias("ui_max_weight")]
    own = hist.with_columns(pl.col(POS).max().over(USER).alias("__last"))
    if real_time:
        age = _days(pl.lit(end) - pl.col(TIMESTAMP))
        aggs += [pl.col(TIMESTAMP).max().alias("__ts"),
                 *((pl.col(WEIGHT) * pl.lit(0.5).pow(age / h)).sum()
                   .alias(f"ui_decay_{window_name(h)}d") for h in config.half_lives_days),
                 pl.col(TIMESTAMP).dt.date().n_unique().cast(pl.Float64).alias("ui_n_days"),
                 (_days(pl.col(TIMESTAMP).max() - pl.col(TIMESTAMP).min()) * 24)
                 .alias("ui_span_hours"),
                 pl.col("__session").n_unique().cast(pl.Float64).alias("ui_n_sessions"),
                 (pl.col("__last_session").first() - pl.col("__session").max())
                 .cast(pl.Float64).alias("ui_sessions_since_last")]
        own = own.with_columns(_sessions(config.session_gap_minutes).alias("__session"))
        own = own.with_columns(pl.col("__session").max().over(USER).alias("__last_session"))
    out = own.join(pairs, on=[USER, ITEM], how="semi").group_by(USER, ITEM).agg(aggs)
    if real_time:
        out = out.with_columns(
            ((pl.lit(end) - pl.col("__ts")).dt.total_microseconds() / US_PER_HOUR)
            .alias("ui_hours_since_last")
        ).drop("__ts")
    return out


def _sessions(gap_minutes: float) -> pl.Expr:
    """Each event's session number within its user (events sorted by user, then time).

    A new session starts after ``gap_minutes`` without an event.
    """
    gap = pl.col(TIMESTAMP).diff().over(USER)
    starts = gap.is_null() | (gap > pl.duration(minutes=gap_minutes))
    return starts.cast(pl.Int64).cum_sum().over(USER)


def category_features(pairs: pl.DataFrame, hist: pl.DataFrame, categories: pl.DataFrame,
                      end: object, real_time: bool, recent_events: int) -> pl.DataFrame:
    """The user's past events in each candidate's category.

    Returns ``user_id, item_id, ui_cat_n_events, ui_cat_share, ui_cat_recent_share,
    ui_cat_steps_since_last`` (and ``ui_cat_hours_since_last`` with real timestamps) for
    ``pairs``: the count, its share of all the user's events and of the last ``recent_events``
    events; counts are 0 and recencies null when the user never touched the category.
    """
    back = pl.len().over(USER) - 1 - pl.col(POS)
    aggs = [pl.len().cast(pl.Float64).alias("ui_cat_n_events"), pl.col(POS).max().alias("__pos"),
            (pl.col("__back") < recent_events).sum().cast(pl.Float64).alias("__recent")]
    if real_time:
        aggs.append(pl.col(TIMESTAMP).max().alias("__ts"))
    per_cat = (hist.with_columns(back.alias("__back")).join(categories, on=ITEM)
               .group_by(USER, CATEGORY).agg(aggs))
    totals = hist.group_by(USER).agg(pl.len().cast(pl.Float64).alias("__n"))
    count = pl.col("ui_cat_n_events").fill_null(0.0)
    recent = pl.col("__recent").fill_null(0.0) / pl.min_horizontal(pl.col("__n"), recent_events)
    out = [USER, ITEM, count, (count / pl.col("__n")).fill_null(0.0).alias("ui_cat_share"),
           recent.fill_null(0.0).alias("ui_cat_recent_share"),
           (pl.col("__n") - 1 - pl.col("__pos")).alias("ui_cat_steps_since_last")]
    if real_time:
        hours = (pl.lit(end) - pl.col("__ts")).dt.total_microseconds() / US_PER_HOUR
        out.append(hours.alias("ui_cat_hours_since_last"))
    return (
        pairs.join(categories, on=ITEM, how="left")
        .join(per_cat, on=[USER, CATEGORY], how="left")
        .join(totals, on=USER, how="left")
        .select(out)
    )


def item_attributes(items: pl.DataFrame) -> pl.DataFrame:
    """``item_id, attributes``: one row per distinct attribute of an item."""
    return items.select(ITEM, pl.col(ATTRIBUTES)).explode(ATTRIBUTES).drop_nulls().unique()


def attribute_features(pairs: pl.DataFrame, hist: pl.DataFrame, items: pl.DataFrame,
                       recent_items: int, attrs: pl.DataFrame | None = None) -> pl.DataFrame:
    """Attributes a candidate shares with the user's last item and last ``recent_items`` items.

    Returns ``user_id, item_id, ui_attr_last, ui_attr_recent, ui_attr_share`` for ``pairs``: the
    number of the candidate's attributes found on the last item, the recency-free count of its
    attributes among the recent items' attributes, and that count over the candidate's
    attribute count. ``attrs`` is ``items``' attribute table when already computed.
    """
    attrs = item_attributes(items) if attrs is None else attrs
    n_attrs = attrs.group_by(ITEM).agg(pl.len().cast(pl.Float64).alias("__n_attr"))
    steps_back = pl.len().over(USER) - pl.col(POS) - 1
    recent = (
        hist.with_columns(steps_back.alias("__back"))
        .group_by(USER, ITEM).agg(pl.col("__back").min())
        .filter(pl.col("__back").rank("ordinal").over(USER) <= recent_items)
        .join(attrs, on=ITEM)
        .group_by(USER, ATTRIBUTES)
        .agg(pl.len().cast(pl.Float64).alias("__hits"),
             (pl.col("__back") == 0).any().cast(pl.Float64).alias("__last"))
    )
    return (
        pairs.join(attrs, on=ITEM)
        .join(recent, on=[USER, ATTRIBUTES])
        .group_by(USER, ITEM)
        .agg(pl.col("__last").sum().alias("ui_attr_last"),
             pl.col("__hits").sum().alias("ui_attr_recent"))
        .join(n_attrs, on=ITEM, how="left")
        .with_columns((pl.col("ui_attr_recent") / pl.col("__n_attr") / recent_items)
                      .clip(0.0, 1.0).alias("ui_attr_share"))
        .drop("__n_attr")
    )


def last_item_links(pairs: pl.DataFrame, hist: pl.DataFrame, covis: CoVisitation) -> pl.DataFrame:
    """``covis_last1`` / ``covis_last2``: neighbour scores from the user's last / second-last item.

    The last distinct items by latest position; 0 when the item is not a neighbour.
    """
    last_items = (
        hist.join(pairs.select(USER).unique(), on=USER, how="semi")
        .group_by(USER, ITEM).agg(pl.col(POS).max())
        .filter(pl.col(POS).rank("ordinal", descending=True).over(USER) <= 2)
        .with_columns(pl.col(POS).rank("ordinal", descending=True).over(USER).alias("__k"))
    )
    links = (
        last_items.join(covis.neighbours_, on=ITEM)
        .select(USER, pl.col("neighbour").alias(ITEM), "__k", SCORE)
        .join(pairs, on=[USER, ITEM], how="semi")
    )
    return links.group_by(USER, ITEM).agg(
        pl.col(SCORE).filter(pl.col("__k") == k).max().fill_null(0.0).alias(f"covis_last{k}")
        for k in (1, 2)
    )


class ItemVectors:
    """The catalogue's item vectors as one float32 matrix and a code per item, built once.

    Args:
        vectors: ``item_id, vector`` (:func:`models.item_text.encode_items`): unit vectors.
    """

    def __init__(self, vectors: pl.DataFrame) -> None:
        self.matrix = vectors[VECTOR].to_numpy().astype(np.float32, copy=False)
        self.codes = pl.DataFrame({ITEM: vectors[ITEM],
                                   "__code": np.arange(vectors.height, dtype=np.int64)})

    def profiles(self, rows: pl.DataFrame, n_users: int) -> np.ndarray:
        """Mean vector per user of ``rows`` (``__user`` index, ``__code``): ``(n_users, D)``."""
        out = np.zeros((n_users, self.matrix.shape[1]), dtype=np.float32)
        users, codes = rows["__user"].to_numpy(), rows["__code"].to_numpy()
        np.add.at(out, users, self.matrix[codes])
        counts = np.bincount(users, minlength=n_users).astype(np.float32)
        return out / np.maximum(counts, 1.0)[:, None]


def content_features(pairs: pl.DataFrame, hist: pl.DataFrame, vectors: ItemVectors,
                     recent_items: int) -> pl.DataFrame:
    """How close each candidate's text is to the user's items: its mean cosine with them.

    Returns ``user_id, item_id, ui_text_last, ui_text_recent, ui_text_bought`` for ``pairs``
    whose candidate has a vector: the cosine with the user's last item, the mean cosine with
    the last ``recent_items`` distinct items and with the items the user bought (0 without any).
    These are what let the ranker trust an item with no events (``i_n_events`` 0,
    ``i_days_since_first`` null) when its text matches what the user looks at.
    """
    users = pairs.select(USER).unique(maintain_order=True).with_row_index("__user")
    coded = (hist.join(users, on=USER).join(vectors.codes, on=ITEM)
             .with_columns(pl.col("__user").cast(pl.Int64)))
    latest = (coded.group_by("__user", "__code").agg(pl.col(POS).max())
              .with_columns(pl.col(POS).rank("ordinal", descending=True).over("__user")
                            .alias("__back"))
              .sort("__user", "__code"))  # sums in one order: the same floats every run
    bought = (coded.filter(pl.col(EVENT_TYPE) == "purchase").select("__user", "__code").unique()
              .sort("__user", "__code"))
    n = users.height
    profiles = np.stack([vectors.profiles(latest.filter(pl.col("__back") == 1), n),
                         vectors.profiles(latest.filter(pl.col("__back") <= recent_items), n),
                         vectors.profiles(bought, n)], axis=1)  # (users, 3, D)
    found = (pairs.select(USER, ITEM).join(users, on=USER).join(vectors.codes, on=ITEM)
             .with_columns(pl.col("__user").cast(pl.Int64)))
    user, code = found["__user"].to_numpy(), found["__code"].to_numpy()
    sims = np.empty((found.height, 3), dtype=np.float32)
    for start in range(0, found.height, _PAIR_BLOCK):
        part = slice(start, start + _PAIR_BLOCK)
        sims[part] = np.einsum("pkd,pd->pk", profiles[user[part]], vectors.matrix[code[part]])
    return found.select(USER, ITEM).with_columns(
        pl.Series(f"ui_text_{name}", sims[:, j].astype(np.float64))
        for j, name in enumerate(("last", "recent", "bought")))
