"""Features of every (user, candidate) pair, computed from the history the candidates came from.

Nothing here looks past the history's last event (``end``): every window, recency and count is
measured back from ``end``, so features built for one window never see that window's events.

* **user**: event counts by type (and in the last day), distinct items and categories, mean price,
  days since the last event and active span;
* **item**: weighted popularity, distinct users (all and in the shortest window), counts in
  windows before ``end``, trend (short window rate over long window rate), popularity among
  users' latest events ("tail"), funnel rates (share of the item's users that carted,
  favourited, bought), price, category popularity and the item's share of it, days since its
  first and last event;
* **user x item**: the user's events on the item by type, their strongest type, recency-decayed
  weighted counts at a few half-lives, steps, hours and sessions since the last one, distinct
  days and sessions with it and hours from the first to the last; events in the item's category
  (count, share of all and of the latest events, steps and hours since the last); attributes
  shared with the user's recent items; co-visitation evidence (from the candidates, plus the
  links from the user's last two items); the rank in every candidate source and the merged
  position;
* **context**: hour of day and day of week of the user's last event.

Time-based features (windows, days, hours, context) exist only when timestamps are real; for
ordered-only data they are left out and position-based ones remain. Features a pair cannot have
(the price of an item without one, the steps since the last event on a never-seen item) are null.

:class:`FeatureBuilder` computes the whole-history tables (end, categories, prices, item
features) once and then the features of any candidate pairs; :func:`candidate_features` builds
candidates, features and labels a chunk of users at a time from one prepared history.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

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
from models.errors import ConfigError, require_columns
from tasks.checks import validate as gx_checks
from tasks.ranking.candidates import (
    CAND_RANK,
    LABEL,
    POS,
    WEIGHT,
    CandidateBuilder,
    CandidateConfig,
    PreparedHistory,
    label_candidates,
    prepared_history,
    user_frame,
)
from tasks.ranking.history_tables import (
    HistoryTables,
    TableSettings,
    history_tables,
    window_name,
)
from tasks.ranking.history_tables import (
    days as _days,
)

logger = logging.getLogger(__name__)

ID_COLUMNS: tuple[str, ...] = (USER, ITEM)
USER_CHUNK = 10_000
"""Default users per chunk of :func:`candidate_features`: 5,000-20,000 cost about the same time
(smaller chunks a little less on 10M events), and working memory grows with the chunk."""
_US_PER_HOUR = 3_600 * 1e6


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


def table_settings(candidates: CandidateConfig, features: FeatureConfig, ordered_only: bool
                   ) -> TableSettings:
    """What the whole-history tables of these candidate and feature settings depend on."""
    return TableSettings(candidates.event_weights, candidates.popular_days,
                         features.event_weights, features.windows_days, features.tail_events,
                         not ordered_only)


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
            ((pl.lit(end) - pl.col("__ts")).dt.total_microseconds() / _US_PER_HOUR)
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
        hours = (pl.lit(end) - pl.col("__ts")).dt.total_microseconds() / _US_PER_HOUR
        out.append(hours.alias("ui_cat_hours_since_last"))
    return (
        pairs.join(categories, on=ITEM, how="left")
        .join(per_cat, on=[USER, CATEGORY], how="left")
        .join(totals, on=USER, how="left")
        .select(out)
    )


def _item_attributes(items: pl.DataFrame) -> pl.DataFrame:
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
    attrs = _item_attributes(items) if attrs is None else attrs
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


class FeatureBuilder:
    """Features of any candidate pairs from one history, its whole-history tables computed once.

    The history end, categories, prices and item features are computed here; :meth:`build`
    then costs the pairs' users' events only.

    Args:
        history: The events the candidates were built from, or a :class:`PreparedHistory` of
            them prepared with ``config.event_weights``.
        items: Items table (categories, prices, attributes when present).
        covis: The :class:`CoVisitation` model of the candidates, for last-item links.
        ordered_only: Timestamps only order events: time-based features are left out.
        config: Windows and depths; defaults to ``FeatureConfig()``.
        tables: The whole history's tables when ``history`` is a part of it (by user); else
            computed from ``history``.
    """

    def __init__(self, history: pl.DataFrame | PreparedHistory, items: pl.DataFrame | None = None,
                 covis: CoVisitation | None = None, ordered_only: bool = False,
                 config: FeatureConfig | None = None, tables: HistoryTables | None = None
                 ) -> None:
        self.config = config or FeatureConfig()
        self.history = prepared_history(history, self.config.event_weights)
        self.covis, self.real_time = covis, not ordered_only
        if tables is None:
            tables = history_tables(self.history.events, table_settings(
                CandidateConfig(event_weights=self.config.event_weights), self.config,
                ordered_only), items)
        self.end, self.categories, self.prices = tables.end, tables.categories, tables.prices
        self.item_table = tables.item_table
        self.items = items if items is not None and ATTRIBUTES in items.columns else None
        self.attributes = None if self.items is None else _item_attributes(self.items)

    def build(self, cands: pl.DataFrame) -> pl.DataFrame:
        """``cands`` (row order kept) with every feature added (see the module docstring)."""
        require_columns(cands.columns, (USER, ITEM, CAND_RANK), "candidates")
        config, end, real_time = self.config, self.end, self.real_time
        pairs = cands.select(USER, ITEM)
        user_hist = self.history.of_users(user_frame(pairs))
        out = cands.join(user_features(user_hist, end, real_time, self.categories, self.prices),
                         on=USER, how="left", maintain_order="left")
        out = out.join(self.item_table, on=ITEM, how="left", maintain_order="left")
        parts = [user_item_features(pairs, user_hist, end, real_time, config)]
        if self.categories is not None:
            parts.append(category_features(pairs, user_hist, self.categories, end, real_time,
                                           config.recent_events))
        if self.items is not None:
            parts.append(attribute_features(pairs, user_hist, self.items, config.recent_items,
                                            self.attributes))
        if self.covis is not None:
            parts.append(last_item_links(pairs, user_hist, self.covis))
        for part in parts:
            out = out.join(part, on=[USER, ITEM], how="left", maintain_order="left")
        out = _fill_defaults(out)
        if "u_mean_price" in out.columns and "i_price" in out.columns:
            out = out.with_columns((pl.col("i_price") / pl.col("u_mean_price"))
                                   .alias("ui_price_ratio"))
        logger.info("features: %d pairs x %d columns", out.height, out.width)
        return out


def build_features(
    cands: pl.DataFrame,
    history: pl.DataFrame,
    items: pl.DataFrame | None = None,
    covis: CoVisitation | None = None,
    ordered_only: bool = False,
    config: FeatureConfig | None = None,
) -> pl.DataFrame:
    """Add every feature to the candidate pairs, using ``history`` only.

    ``cands`` come from :func:`tasks.ranking.candidates.build_candidates` (row order is kept). One
    call of :meth:`FeatureBuilder.build`; see :class:`FeatureBuilder` for the other arguments.
    """
    return FeatureBuilder(history, items, covis, ordered_only, config).build(cands)


def candidate_features(
    history: pl.DataFrame,
    users: pl.Series | list[str] | pl.DataFrame,
    covis: CoVisitation,
    candidate_config: CandidateConfig | None = None,
    feature_config: FeatureConfig | None = None,
    items: pl.DataFrame | None = None,
    external: Mapping[str, pl.DataFrame] | None = None,
    ordered_only: bool = False,
    targets: pl.DataFrame | None = None,
    user_chunk: int = USER_CHUNK,
    tables: HistoryTables | None = None,
) -> pl.DataFrame:
    """Candidates of ``users`` with their features (and labels), ``user_chunk`` users at a time.

    The same frame as ``label_candidates(build_features(build_candidates(...), ...), targets)``
    (labels only with ``targets``), in the same order: users sorted, each user's candidates by
    ``cand_rank``. The history is prepared once (shared by candidates and features when both
    configs weigh events alike) and the whole-history tables are computed once; then each chunk
    of users costs its own events and pairs, so time grows linearly with the data and working
    memory with the chunk.

    Args:
        history: Canonical events (nothing after the history end).
        users: Users to build candidates for (unknown users get popular items).
        covis: A :class:`CoVisitation` model fitted on ``history``.
        candidate_config: Candidate quotas and options; defaults to ``CandidateConfig()``.
        feature_config: Feature windows and depths; defaults to ``FeatureConfig()``.
        items: Items table (categories, prices, attributes when present).
        external: Extra candidate sources by name, each ``user_id, item_id, score``.
        ordered_only: Timestamps only order events: no time windows or time features.
        targets: ``user_id, item_id`` of the window to learn; adds ``label`` when given.
        user_chunk: Users per chunk; working memory follows it (see :data:`USER_CHUNK`).
        tables: The whole history's tables (:mod:`tasks.ranking.history_tables`) when ``history``
        holds
            only some users' events (a shard); else computed from ``history``.

    Returns:
        The candidate pairs with ``rank_*``, ``cand_rank``, co-visitation evidence, the feature
        columns and, with ``targets``, ``label``.
    """
    if user_chunk < 1:
        raise ConfigError(f"user_chunk must be a positive number of users; got {user_chunk}.")
    candidate_config = candidate_config or CandidateConfig()
    feature_config = feature_config or FeatureConfig()
    if targets is not None:
        require_columns(targets.columns, (USER, ITEM), "targets")
        targets = targets.select(USER, ITEM).unique()
    users_df = user_frame(users)
    prepared = PreparedHistory(history, candidate_config.event_weights)
    if tables is None:
        tables = history_tables(prepared.events,
                                table_settings(candidate_config, feature_config, ordered_only),
                                items)
    candidates = CandidateBuilder(prepared, covis, candidate_config, items, ordered_only,
                                  tables.popular, tables.popularity)
    shared = prepared.event_weights == dict(feature_config.event_weights)
    features = FeatureBuilder(prepared if shared else history, items, covis, ordered_only,
                              feature_config, tables)
    n_chunks = max(-(-users_df.height // user_chunk), 1)
    parts = []
    for i in range(n_chunks):
        start = time.perf_counter()
        chunk = users_df.slice(i * user_chunk, user_chunk)
        frame = features.build(candidates.build(chunk, external))
        frame = frame if targets is None else label_candidates(frame, targets)
        # one chunk per column and part: misaligned chunks would copy the whole frame later
        parts.append(frame.rechunk())
        logger.info("candidates+features: chunk %d/%d, %d users, %d pairs, %.1f s", i + 1,
                    n_chunks, chunk.height, frame.height, time.perf_counter() - start)
    return pl.concat(parts)


def _fill_defaults(frame: pl.DataFrame) -> pl.DataFrame:
    """Counts and shares of absent evidence are 0; recency of absent evidence stays null."""
    nullable = {"ui_steps_since_last", "ui_hours_since_last", "i_price", "u_mean_price",
                "ui_cat_steps_since_last", "ui_cat_hours_since_last",
                "u_days_since_last", "u_span_days", "ctx_last_hour", "ctx_last_weekday",
                "i_days_since_first", "i_days_since_last"}
    zero = [c for c in frame.columns
            if c.startswith(("u_", "i_", "ui_", "covis_")) and c not in nullable]
    return frame.with_columns(pl.col(zero).fill_null(0.0))


def feature_columns(frame: pl.DataFrame, exclude: Mapping[str, object] | None = None) -> list[str]:
    """The numeric feature columns of a feature frame: all but ids, ``label`` and ``exclude``."""
    skip = {*ID_COLUMNS, LABEL, *(exclude or {})}
    return [c for c, t in frame.schema.items() if c not in skip and t.is_numeric()]


def check_features(
    frame: pl.DataFrame, sample_rows: int = 200_000, seed: int = 0,
    suites_dir: Path | None = None,
) -> gx_checks.ValidationReport:
    """Run the ``features`` expectation suite; raise when it fails.

    The suite runs on a seeded sample of at most ``sample_rows`` rows (Great Expectations works
    on pandas); an expectation on an optional column runs only when the column is present.

    Raises:
        ValidationFailedError: An expectation failed; the message is the Markdown report
            (which expectation, column, how many rows, example values and the fix).
    """
    # the events/items suite runner, reused piece by piece on the feature frame
    spec = gx_checks.load_suite_spec("features", suites_dir)
    active = gx_checks._active_expectations(spec["expectations"], frame, set())
    sample = frame if frame.height <= sample_rows else frame.sample(sample_rows, seed=seed)
    columns = [c for c in dict.fromkeys(e["kwargs"].get("column") for e in active)
               if c and c in sample.columns]
    path = (suites_dir or gx_checks.SUITES_DIR) / "features.json"
    suite = gx_checks._build_suite(spec, active, path)
    results = gx_checks._run_gx("features", suite, sample.select(columns).to_pandas(), {})
    report = gx_checks.ValidationReport(success=True, rows={"features": frame.height},
                              evaluated=len(results))
    report.failures = [gx_checks._failure("features", r, sample) for r in results if not r.success]
    report.success = not report.failures
    if frame.height > sample_rows:
        report.warnings.append(f"checked a random sample of {sample_rows:,} of the "
                               f"{frame.height:,} feature rows")
    logger.info("features suite %s: %d checks, %d failed",
                "passed" if report.success else "failed", report.evaluated, len(report.failures))
    gx_checks.raise_on_failure(report)
    return report
