"""Candidate generation: the few hundred items per user that a ranker re-orders.

Every source proposes, per user, its best items with a rank (1 = best):

* ``covis``: co-visitation from the user's recent items, read from a fitted
  :class:`~models.baselines.CoVisitation` model (its neighbour table and recent items);
* ``pop``: the most popular items of the history (over the last ``popular_days`` when timestamps
  are real, else all of it);
* ``category``: the most popular items of the user's favourite categories (items table
  ``category_id``; skipped without it);
* ``recent`` and ``repeat``: the user's own items, by last interaction and by weighted count;
* external sources: any ``user_id, item_id, score`` frame (for example a transformer's nearest
  items), ranked by score.

The merged list keeps each user's ``n_candidates`` best items, ordered by the best relative rank
``rank / quota`` over the sources that propose the item (so every source keeps a share of the list
proportional to its quota). Each candidate keeps ``rank_<source>`` (null when that source did not
propose it), ``n_sources``, its merged position ``cand_rank`` and its co-visitation evidence
(``covis_sum``, ``covis_max``, ``covis_n``). Everything is columnar: no Python loop over users.

:class:`CandidateBuilder` prepares the history and its whole-history tables (popularity,
category tops) once, then builds the candidates of any set of users; per chunk of users its
working memory follows the chunk, and the history is sliced, never sorted again.
:func:`build_candidates` is the one-call shortcut.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import polars as pl

from models.base import event_weight_expr
from models.baselines import CoVisitation
from models.columns import CATEGORY, EVENT_REQUIRED, ITEM, SCORE, TIMESTAMP, USER
from models.errors import ConfigError, DataError, require_columns
from tasks.ranking.candidate_sources import (
    BUILTIN_SOURCES,
    CAND_RANK,
    COVIS_COLUMNS,
    LABEL,
    POS,
    RANK_PREFIX,
    CandidateConfig,
    category_source,
    category_tops,
    covisitation_scores,
    drop_seen,
    external_source,
    item_popularity,
    merge_sources,
    own_sources,
    ranked,
)

logger = logging.getLogger(__name__)

NEW_EVIDENCE = "i_n_events"  # an item's events in the history: 0 for a new item


def prepare_history(history: pl.DataFrame, event_weights: Mapping[str, float]) -> pl.DataFrame:
    """Events sorted by user then time (ties keep input order) with ``pos`` and ``weight``.

    ``pos`` counts a user's events from 0 (the oldest); ``weight`` is the event type's weight.
    """
    require_columns(history.columns, EVENT_REQUIRED, "history")
    if history.is_empty():
        raise DataError("the history has no events: candidates need at least one past event.")
    return (
        history.with_row_index("__row")
        .sort([USER, TIMESTAMP, "__row"])
        .drop("__row")
        .with_columns(
            pl.int_range(pl.len(), dtype=pl.Int64).over(USER).alias(POS),
            event_weight_expr(event_weights),
        )
    )


class PreparedHistory:
    """A history prepared once (:func:`prepare_history`) and sliced per set of users.

    Args:
        history: Canonical events.
        event_weights: Weight of each event type (the ``weight`` column).

    Attributes:
        events: The prepared events, sorted by user then time.
        event_weights: The weights the events were prepared with.
    """

    def __init__(self, history: pl.DataFrame, event_weights: Mapping[str, float]) -> None:
        self.event_weights = dict(event_weights)
        self.events = prepare_history(history, self.event_weights)
        self._sorted_ids = self.events[USER].null_count() == 0

    def of_users(self, users: pl.DataFrame) -> pl.DataFrame:
        """The events of ``users`` (a :func:`user_frame`), in the prepared order.

        The events are sorted by user, so only the rows between the first and the last user of
        ``users`` are scanned: a chunk of users costs its own events, not the whole history.
        """
        events = self.events
        if self._sorted_ids and users.height and not users[USER].has_nulls():
            ids = events[USER]
            start = ids.search_sorted(users[USER][0], "left")
            events = events.slice(start, ids.search_sorted(users[USER][-1], "right") - start)
        return events.filter(pl.col(USER).is_in(users[USER].implode()))


def prepared_history(history: pl.DataFrame | PreparedHistory, weights: Mapping[str, float]
              ) -> PreparedHistory:
    """``history`` prepared with ``weights``; a prepared one must carry the same weights."""
    if not isinstance(history, PreparedHistory):
        return PreparedHistory(history, weights)
    if history.event_weights != dict(weights):
        raise ConfigError(
            f"the prepared history weighs events {history.event_weights}, the config "
            f"{dict(weights)}: prepare the history with the config's event_weights."
        )
    return history


def user_frame(users: pl.Series | list[str] | pl.DataFrame) -> pl.DataFrame:
    """One distinct, sorted ``user_id`` column from a series, list or frame."""
    if isinstance(users, pl.DataFrame):
        require_columns(users.columns, (USER,), "users")
        users = users[USER]
    return pl.DataFrame({USER: pl.Series(users, dtype=pl.String)}).unique().sort(USER)


class CandidateBuilder:
    """Candidates of any users from one history, its whole-history tables computed once.

    Args:
        history: Canonical events the candidates may use (nothing after the history end), or a
            :class:`PreparedHistory` of them prepared with ``config.event_weights``.
        covis: A :class:`CoVisitation` model fitted on ``history``.
        config: Quotas and options; defaults to ``CandidateConfig()``.
        items: Items table; its ``category_id`` feeds the ``category`` source.
        ordered_only: Timestamps only order events (no real time): no popularity window.
        popular: ``item_id, score`` of the popular source, when the whole history's is known
            (``history`` is then a part of it, by user); else counted from ``history``.
        popularity: ``item_id, score``: all-time popularity for the category tops, likewise.
    """

    def __init__(self, history: pl.DataFrame | PreparedHistory, covis: CoVisitation,
                 config: CandidateConfig | None = None, items: pl.DataFrame | None = None,
                 ordered_only: bool = False, popular: pl.DataFrame | None = None,
                 popularity: pl.DataFrame | None = None) -> None:
        self.config = config or CandidateConfig()
        self.covis = covis
        self.history = prepared_history(history, self.config.event_weights)
        events = self.history.events
        if popular is None:
            popular = item_popularity(events, self.config.popular_days, ordered_only)
        self.popular = popular.sort([SCORE, ITEM], descending=[True, False])
        self.categories: pl.DataFrame | None = None
        self.category_tops: pl.DataFrame | None = None
        if self.config.n_category and items is not None and CATEGORY in items.columns:
            self.categories = items.select(ITEM, CATEGORY).drop_nulls().unique(ITEM, keep="first")
            if popularity is None:
                popularity = item_popularity(events, None, ordered_only)
            self.category_tops = category_tops(popularity, self.categories)

    def sources(self, users: pl.Series | list[str] | pl.DataFrame,
                external: Mapping[str, pl.DataFrame] | None = None,
                evidence: pl.DataFrame | None = None) -> dict[str, pl.DataFrame]:
        """Each source's ``user_id, item_id, score, rank`` for ``users`` (see the module doc).

        Sources with a zero quota, and ``category`` without an items table with
        ``category_id``, are left out; the user's own items are left out with ``exclude_seen``.
        ``evidence`` is :func:`covisitation_scores` of the same users when already computed.
        """
        config, users = self.config, user_frame(users)
        hist = self.history.of_users(users)
        seen = hist.select(USER, ITEM).unique()
        seen_or_none = seen if config.exclude_seen else None
        # popular items a user has seen are dropped: look that much deeper
        extra = int(seen.group_by(USER).len()["len"].max() or 0) if config.exclude_seen else 0
        sources: dict[str, pl.DataFrame] = {}
        if config.n_covis:
            if evidence is None:
                evidence = covisitation_scores(self.covis, users)
            covis_pairs = evidence.rename({"covis_sum": SCORE})
            sources["covis"] = ranked(drop_seen(covis_pairs, seen_or_none), config.n_covis)
        if config.n_popular:
            top = users.join(self.popular.head(config.n_popular + extra), how="cross")
            sources["pop"] = ranked(drop_seen(top, seen_or_none), config.n_popular)
        if self.categories is not None and self.category_tops is not None:
            cat_top = self.category_tops.filter(pl.col("__cpos") < config.n_category + extra)
            sources["category"] = category_source(hist, self.categories, cat_top, config,
                                                   seen_or_none)
        if not config.exclude_seen:
            own = own_sources(hist, config)
            sources.update({k: v for k, v in own.items() if config.quota(k)})
        for name, frame in (external or {}).items():
            if config.n_external:
                sources[name] = external_source(name, frame, users, config.n_external,
                                                 seen_or_none)
        return sources

    def build(self, users: pl.Series | list[str] | pl.DataFrame,
              external: Mapping[str, pl.DataFrame] | None = None) -> pl.DataFrame:
        """Merged, de-duplicated candidates of ``users`` (see :func:`build_candidates`)."""
        config, users = self.config, user_frame(users)
        evidence = covisitation_scores(self.covis, users)
        sources = self.sources(users, external, evidence)
        merged = merge_sources(sources, config, [*BUILTIN_SOURCES, *(external or {})])
        out = merged.join(evidence, on=[USER, ITEM], how="left",
                          maintain_order="left").with_columns(
            pl.col(c).fill_null(0.0) for c in COVIS_COLUMNS
        )
        logger.info("candidates: %d users, %d pairs (%s)", users.height, out.height,
                    ", ".join(f"{k}={v.height}" for k, v in sources.items()))
        return out


def build_candidates(
    history: pl.DataFrame,
    users: pl.Series | list[str] | pl.DataFrame,
    covis: CoVisitation,
    config: CandidateConfig | None = None,
    items: pl.DataFrame | None = None,
    external: Mapping[str, pl.DataFrame] | None = None,
    ordered_only: bool = False,
) -> pl.DataFrame:
    """Merged, de-duplicated candidates of ``users`` built from ``history`` only.

    One call of :meth:`CandidateBuilder.build` (see :class:`CandidateBuilder` for the arguments);
    users unknown to the history get popular items; ``external`` maps extra source names to
    ``user_id, item_id, score`` frames (higher is better).

    Returns:
        ``user_id, item_id, rank_<source>..., score_<external>..., n_sources, cand_rank,
        covis_sum, covis_max, covis_n`` sorted by user then ``cand_rank`` (1 = first).
    """
    return CandidateBuilder(history, covis, config, items, ordered_only).build(users, external)


def rank_columns(cands: pl.DataFrame) -> list[str]:
    """The ``rank_<source>`` columns of a candidate frame (``cand_rank`` excluded)."""
    return [c for c in cands.columns if c.startswith(RANK_PREFIX)]


def label_candidates(cands: pl.DataFrame, targets: pl.DataFrame, new_grade: int = 1
                     ) -> pl.DataFrame:
    """Add ``label``: 1 when the pair is among the user's targets, else 0.

    ``new_grade``: the label of a target whose item had no event in the history (its feature
    ``i_n_events`` is 0), when the frame has that feature.
    """
    require_columns(targets.columns, (USER, ITEM), "targets")
    positives = targets.select(USER, ITEM).unique().with_columns(pl.lit(1, pl.Int32).alias(LABEL))
    labelled = cands.join(positives, on=[USER, ITEM], how="left", maintain_order="left")
    label = pl.col(LABEL).fill_null(0)
    if new_grade != 1 and NEW_EVIDENCE in cands.columns:
        label = (pl.when((label == 1) & (pl.col(NEW_EVIDENCE).fill_null(0) == 0))
                 .then(pl.lit(new_grade, pl.Int32)).otherwise(label))
    return labelled.with_columns(label.alias(LABEL))


def recall_counts(cands: pl.DataFrame, targets: pl.DataFrame) -> dict[str, float]:
    """The counts behind :func:`candidate_recall` of one part of the users (they add up).

    ``targets``: the number of distinct target pairs; ``all`` and each source: those found;
    ``pairs`` and ``users``: candidate rows and their distinct users.
    """
    require_columns(targets.columns, (USER, ITEM), "targets")
    pairs = targets.select(USER, ITEM).unique()
    # the candidates of target pairs first: a join on every candidate would hash them all
    ranks = cands.select(USER, ITEM, CAND_RANK, *rank_columns(cands)).join(
        pairs, on=[USER, ITEM], how="semi")
    found = pairs.join(ranks, on=[USER, ITEM], how="left")
    counts = {col.removeprefix(RANK_PREFIX): float(found[col].is_not_null().sum())
              for col in rank_columns(cands)}
    counts["all"] = float(found[CAND_RANK].is_not_null().sum())
    return {**counts, "targets": float(pairs.height), "pairs": float(cands.height),
            "users": float(cands[USER].n_unique())}


def add_counts(parts: list[dict[str, float]]) -> dict[str, float]:
    """The :func:`recall_counts` of disjoint sets of users added into one (absent keys 0)."""
    keys = dict.fromkeys(key for part in parts for key in part)
    return {key: sum(part.get(key, 0.0) for part in parts) for key in keys}


def merge_recall(parts: list[dict[str, float]]) -> dict[str, float]:
    """:func:`candidate_recall` from the :func:`recall_counts` of disjoint sets of users."""
    total = add_counts(parts)
    if not total.get("targets"):
        raise DataError("candidate recall needs targets; the target table is empty.")
    result = {key: value / total["targets"] for key, value in total.items()
              if key not in ("targets", "pairs", "users")}
    result["candidates_per_user"] = total["pairs"] / max(total["users"], 1.0)
    return result


def candidate_recall(cands: pl.DataFrame, targets: pl.DataFrame) -> dict[str, float]:
    """Share of target pairs present in the candidates, per source and merged (``all``).

    A source's recall counts the targets it proposed among the kept candidates. Also gives
    ``candidates_per_user``. Every target counts, including those of users without candidates.
    """
    return merge_recall([recall_counts(cands, targets)])
