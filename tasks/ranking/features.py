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
  shared with the user's recent items; with item vectors (the catalogue's text), the
  candidate's cosine with the user's last item, recent items and bought items; co-visitation
  evidence (from the candidates, plus the links from the user's last two items); the rank in
  every candidate source and the merged position;
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
from collections.abc import Iterator, Mapping
from pathlib import Path

import polars as pl

from models.baselines import CoVisitation
from models.columns import (
    ATTRIBUTES,
    ITEM,
    USER,
)
from models.errors import ConfigError, require_columns
from tasks.checks import validate as gx_checks
from tasks.checks.report import failure
from tasks.ranking.candidate_sources import CAND_RANK, LABEL, CandidateConfig
from tasks.ranking.candidates import (
    CandidateBuilder,
    PreparedHistory,
    label_candidates,
    prepared_history,
    user_frame,
)
from tasks.ranking.history_tables import (
    HistoryTables,
    TableSettings,
    history_tables,
)
from tasks.ranking.pair_features import (
    FeatureConfig,
    ItemVectors,
    attribute_features,
    category_features,
    content_features,
    item_attributes,
    last_item_links,
    user_features,
    user_item_features,
)

logger = logging.getLogger(__name__)

ID_COLUMNS: tuple[str, ...] = (USER, ITEM)
USER_CHUNK = 10_000
"""Default users per chunk of :func:`candidate_features`: 5,000-20,000 cost about the same time
(smaller chunks a little less on 10M events), and working memory grows with the chunk."""


def table_settings(candidates: CandidateConfig, features: FeatureConfig, ordered_only: bool
                   ) -> TableSettings:
    """What the whole-history tables of these candidate and feature settings depend on."""
    return TableSettings(candidates.event_weights, candidates.popular_days,
                         features.event_weights, features.windows_days, features.tail_events,
                         not ordered_only)


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
        vectors: ``item_id, vector`` of the catalogue (:mod:`models.item_text`): adds the
            text-similarity features (``ui_text_*``).
    """

    def __init__(self, history: pl.DataFrame | PreparedHistory, items: pl.DataFrame | None = None,
                 covis: CoVisitation | None = None, ordered_only: bool = False,
                 config: FeatureConfig | None = None, tables: HistoryTables | None = None,
                 vectors: pl.DataFrame | None = None) -> None:
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
        self.attributes = None if self.items is None else item_attributes(self.items)
        self.vectors = None if vectors is None else ItemVectors(vectors)

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
        if self.vectors is not None:
            parts.append(content_features(pairs, user_hist, self.vectors, config.recent_items))
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
    vectors: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Add every feature to the candidate pairs, using ``history`` only.

    ``cands`` come from :func:`tasks.ranking.candidates.build_candidates` (row order is kept). One
    call of :meth:`FeatureBuilder.build`; see :class:`FeatureBuilder` for the other arguments.
    """
    return FeatureBuilder(history, items, covis, ordered_only, config,
                          vectors=vectors).build(cands)


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
    vectors: pl.DataFrame | None = None,
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
            holds only some users' events (a shard); else computed from ``history``.
        vectors: ``item_id, vector`` of the catalogue: adds the text-similarity features.

    Returns:
        The candidate pairs with ``rank_*``, ``cand_rank``, co-visitation evidence, the feature
        columns and, with ``targets``, ``label``.
    """
    return pl.concat([frame for _, frame in candidate_chunks(
        history, users, covis, candidate_config, feature_config, items, external, ordered_only,
        targets, user_chunk, tables, vectors)])


def candidate_chunks(
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
    vectors: pl.DataFrame | None = None,
) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
    """:func:`candidate_features` a chunk at a time: ``(the chunk's users, their frame)``.

    The history is prepared once for every chunk; a caller that consumes each chunk before the
    next (scoring, writing) holds one chunk's frame, not every user's.
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
                              feature_config, tables, vectors)
    n_chunks = max(-(-users_df.height // user_chunk), 1)
    for i in range(n_chunks):
        start = time.perf_counter()
        chunk = users_df.slice(i * user_chunk, user_chunk)
        frame = features.build(candidates.build(chunk, external))
        frame = frame if targets is None else label_candidates(
            frame, targets, candidate_config.new_item_grade)
        logger.info("candidates+features: chunk %d/%d, %d users, %d pairs, %.1f s", i + 1,
                    n_chunks, chunk.height, frame.height, time.perf_counter() - start)
        # one chunk per column and part: misaligned chunks would copy the whole frame later
        yield chunk, frame.rechunk()


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
    report.failures = [failure("features", r, sample) for r in results if not r.success]
    report.success = not report.failures
    if frame.height > sample_rows:
        report.warnings.append(f"checked a random sample of {sample_rows:,} of the "
                               f"{frame.height:,} feature rows")
    logger.info("features suite %s: %d checks, %d failed",
                "passed" if report.success else "failed", report.evaluated, len(report.failures))
    gx_checks.raise_on_failure(report)
    return report
