"""The candidate sources of the re-ranker and how their lists merge into one per user.

Co-visitation neighbours of the user's recent items, the user's own items (repeat buys), popular
and trending items, the top items of the user's categories, and external sources (the
transformer's nearest items); each source keeps its top ``n`` per user with its rank, and
:func:`merge_sources` joins them into one candidate list per user (see
:mod:`tasks.ranking.candidates`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from models.baselines import DEFAULT_EVENT_WEIGHTS, CoVisitation
from models.columns import CATEGORY, ITEM, RANK, SCORE, TIMESTAMP, USER
from models.errors import ConfigError, DataError, require_columns

BUILTIN_SOURCES: tuple[str, ...] = ("covis", "pop", "category", "recent", "repeat")
RANK_PREFIX = "rank_"
EXTERNAL_SCORE_PREFIX = "score_"
CAND_RANK = "cand_rank"
N_SOURCES = "n_sources"
COVIS_COLUMNS: tuple[str, ...] = ("covis_sum", "covis_max", "covis_n")
LABEL = "label"
POS = "pos"
WEIGHT = "weight"
_KEY = "__key"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


class CandidateConfig(BaseModel):
    """How many items each candidate source proposes and how many are kept per user."""

    model_config = ConfigDict(extra="forbid")

    n_candidates: int = Field(150, gt=0, description="Candidates kept per user after merging.")
    n_covis: int = Field(100, ge=0, description="Quota of co-visitation candidates.")
    n_popular: int = Field(20, ge=0, description="Quota of popular items.")
    n_category: int = Field(20, ge=0, description="Quota of popular items of user categories.")
    n_recent: int = Field(100, ge=0, description="Quota of the user's most recent own items.")
    n_repeat: int = Field(30, ge=0, description="Quota of the user's most interacted own items.")
    n_external: int = Field(50, ge=0, description="Quota of each external source.")
    n_new: int = Field(20, ge=0, description="With the content source: items proposed per "
                       "user among those with no event in the history (source 'content_new', "
                       "the nearest in text space to the user's recent items); 0: none.")
    new_item_grade: int = Field(
        2, ge=1, le=8, description="Relevance grade of a training target whose item had no "
        "event before the window (1: the grade of every other target). LightGBM's gain "
        "2^grade - 1 makes such a target count 3 times at 2: the ranker learns to put the new "
        "items a user will take into lists, where text is all there is to go on.")
    user_categories: int = Field(3, gt=0, description="A user's favourite categories used.")
    popular_days: float | None = Field(
        7.0, gt=0, description="Window of the popularity source (real timestamps); None: all."
    )
    exclude_seen: bool = Field(
        False, description="Drop the items of each user's history (leave-one-out protocol)."
    )
    event_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="Weight of each event type in popularity and repeat counts.",
    )

    def quota(self, source: str) -> int:
        """The configured number of candidates of ``source`` (external ones share one quota)."""
        return {
            "covis": self.n_covis, "pop": self.n_popular, "category": self.n_category,
            "recent": self.n_recent, "repeat": self.n_repeat,
        }.get(source, self.n_external)


def covisitation_scores(covis: CoVisitation, users: pl.DataFrame) -> pl.DataFrame:
    """Co-visitation evidence of every item linked to each user's recent items.

    Returns:
        ``user_id, item_id, covis_sum, covis_max, covis_n``: the recency-weighted score sum (the
        :class:`CoVisitation` score), the best single link and the number of recent items that
        link to the item.
    """
    if not hasattr(covis, "neighbours_"):
        raise ConfigError("the CoVisitation model is not fitted: call fit(history) first.")
    return (
        covis.recent_.join(users, on=USER, how="semi")
        .join(covis.neighbours_, on=ITEM)
        .group_by(USER, "neighbour")
        .agg(
            (pl.col(WEIGHT) * pl.col(SCORE)).sum().alias("covis_sum"),
            pl.col(SCORE).max().alias("covis_max"),
            pl.len().cast(pl.Float64).alias("covis_n"),
        )
        .rename({"neighbour": ITEM})
    )


def top_per_user(
    frame: pl.DataFrame, n: int, by: list[str], descending: list[bool], rank: str = RANK
) -> pl.DataFrame:
    """Each user's first ``n`` rows ordered by ``by``, with ``rank`` 1..n, sorted by user and rank.

    A per-user rank on the first key drops most rows before the full sort.
    """
    keep = pl.col(by[0]).rank("min", descending=descending[0]).over(USER) <= n
    return (
        frame.filter(keep)
        .sort([USER, *by], descending=[False, *descending])
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(USER).alias(rank))
        .filter(pl.col(rank) <= n)
    )


def ranked(frame: pl.DataFrame, n: int, score: str = SCORE) -> pl.DataFrame:
    """``user_id, item_id, score, rank``: each user's best ``n`` rows by ``score`` (ties by id)."""
    frame = frame.select(USER, ITEM, pl.col(score).cast(pl.Float64).alias(SCORE))
    return top_per_user(frame, n, [SCORE, ITEM], [True, False])


def drop_seen(frame: pl.DataFrame, seen: pl.DataFrame | None) -> pl.DataFrame:
    """``frame`` without the ``(user_id, item_id)`` pairs of ``seen`` (all of it when None)."""
    return frame if seen is None else frame.join(seen, on=[USER, ITEM], how="anti")


def item_popularity(events: pl.DataFrame, days: float | None, ordered_only: bool) -> pl.DataFrame:
    """``item_id, score``: weighted event counts, over the last ``days`` with real timestamps."""
    if days is not None and not ordered_only:
        start = events[TIMESTAMP].max() - pl.duration(days=days)
        events = events.filter(pl.col(TIMESTAMP) > start)
    return events.group_by(ITEM).agg(pl.col(WEIGHT).sum().alias(SCORE))


def category_tops(popularity: pl.DataFrame, cats: pl.DataFrame) -> pl.DataFrame:
    """``category_id, item_id, score, i_share, __cpos``: items by popularity within category.

    ``i_share`` is the item's share of its category's popularity, ``__cpos`` its place (from 0).
    """
    return (
        popularity.join(cats, on=ITEM)
        .with_columns((pl.col(SCORE) / pl.col(SCORE).sum().over(CATEGORY)).alias("i_share"))
        .sort([CATEGORY, SCORE, ITEM], descending=[False, True, False])
        .with_columns(pl.int_range(pl.len()).over(CATEGORY).alias("__cpos"))
    )


def external_source(name: str, frame: pl.DataFrame, users: pl.DataFrame, n: int,
                    seen: pl.DataFrame | None) -> pl.DataFrame:
    """An external source's top ``n`` per user (its name checked, seen pairs dropped)."""
    if not _NAME.match(name) or name in BUILTIN_SOURCES:
        raise ConfigError(
            f"external candidate source name {name!r} must be lower-case letters, digits and "
            f"underscores, not one of {', '.join(BUILTIN_SOURCES)}. Rename the source."
        )
    require_columns(frame.columns, (USER, ITEM, SCORE), f"external candidates {name!r}")
    clean = frame.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String),
                         pl.col(SCORE).cast(pl.Float64)).join(users, on=USER, how="semi")
    best = clean.group_by(USER, ITEM).agg(pl.col(SCORE).max())
    return ranked(drop_seen(best, seen), n)


def category_source(hist: pl.DataFrame, categories: pl.DataFrame, cat_top: pl.DataFrame,
                     config: CandidateConfig, seen: pl.DataFrame | None) -> pl.DataFrame:
    """Popular items (``cat_top``) of each user's ``user_categories`` heaviest categories."""
    user_cats = (
        hist.join(categories, on=ITEM)
        .group_by(USER, CATEGORY).agg(pl.col(WEIGHT).sum().alias("u_w"))
        .filter(pl.col("u_w") > 0)
        .with_columns((pl.col("u_w") / pl.col("u_w").sum().over(USER)).alias("u_share"))
        .sort([USER, "u_w", CATEGORY], descending=[False, True, False])
        .filter(pl.int_range(pl.len()).over(USER) < config.user_categories)
    )
    pairs = user_cats.join(cat_top, on=CATEGORY).select(
        USER, ITEM, (pl.col("u_share") * pl.col("i_share")).alias(SCORE)
    )
    return ranked(drop_seen(pairs, seen), config.n_category)


def own_sources(hist: pl.DataFrame, config: CandidateConfig) -> dict[str, pl.DataFrame]:
    """``recent`` (last interaction first) and ``repeat`` (heaviest weighted count first).

    ``hist`` holds the events of the users concerned only.
    """
    own = (
        hist.group_by(USER, ITEM)
        .agg(pl.col(POS).max().alias("last_pos"), pl.col(WEIGHT).sum().alias("w"),
             pl.len().alias("n"))
    )
    repeat = own.filter(pl.col("n") > 1).with_columns(
        (pl.col("w") + pl.col("last_pos") * 1e-9).alias(SCORE)  # recency breaks ties
    )
    return {
        "recent": ranked(own.with_columns(pl.col("last_pos").alias(SCORE)), config.n_recent),
        "repeat": ranked(repeat, config.n_repeat),
    }


def merge_sources(
    sources: Mapping[str, pl.DataFrame], config: CandidateConfig, all_sources: list[str]
) -> pl.DataFrame:
    """Merge source lists into each user's best ``n_candidates`` (see the module docstring).

    ``all_sources`` names every ``rank_<source>`` column of the result, so candidate frames built
    on different histories share one schema even when a source proposes nothing.
    """
    external = [s for s in all_sources if s not in BUILTIN_SOURCES]
    priority = {name: i for i, name in enumerate(all_sources)}
    parts = [
        frame.select(USER, ITEM, SCORE, RANK).with_columns(
            pl.lit(name).alias("source"),
            (pl.col(RANK) / max(config.quota(name), 1)).alias(_KEY),
            pl.lit(priority[name], dtype=pl.Int64).alias("__prio"),
        )
        for name, frame in sources.items()
    ]
    if not parts:
        raise DataError("no candidate source proposed anything: check the quotas and history.")
    source = pl.col("source")
    wide = pl.concat(parts).group_by(USER, ITEM).agg(
        *(pl.when(source == s).then(pl.col(RANK)).min().alias(f"{RANK_PREFIX}{s}")
          for s in all_sources),
        *(pl.when(source == s).then(pl.col(SCORE)).max().alias(f"{EXTERNAL_SCORE_PREFIX}{s}")
          for s in external),
        pl.len().cast(pl.Int64).alias(N_SOURCES),
        pl.col(_KEY).min(),
        pl.col("__prio").min(),
    )
    order = [_KEY, N_SOURCES, "__prio", ITEM]
    return top_per_user(wide, config.n_candidates, order, [False, True, False, False],
                        rank=CAND_RANK).drop(_KEY, "__prio")
