"""The live session in a served list: its neighbour list, and the blend weight chosen on data.

The served model (:mod:`models.serving`) answers a request with ``recent_items`` by one rule,
which :func:`choose_session_weight` replays on the validation window:

* a known user's session counts only through its **new** items, those not in the user's known
  history (a shop front end replays the items the model has already seen); a session with none
  leaves the user's list as it is. An unknown user's whole session counts;
* the session's list is the co-visitation neighbours of its newest ``session_items`` (new) items,
  the newest weighing most (:meth:`SessionNeighbours.session_list`);
* a known user's list and the session's list are fused by weighted reciprocal rank
  (:func:`models.user_lists.blend`, weight ``session_weight``); an unknown user gets the
  session's list.

:func:`choose_session_weight` picks ``session_weight`` for a model family: each validation user's
first validation event is the session, the rest of their validation window the targets, the
family's validation lists (:data:`VALID_LISTS`, saved beside each family's model) the user's
list, and every weight of a grid is scored with :func:`models.metrics.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from models.columns import ITEM, RANK, SCORE, USER
from models.errors import ConfigError, DataError, require_columns
from models.metrics import ACCURACY_METRICS, merge_partials, partial_metrics
from models.user_lists import IdIndex, as_lists_frame, blend

VALID_LISTS = "valid_lists.parquet"
"""File name of a family's validation lists, in the folder of its saved model."""
DEFAULT_WEIGHTS: tuple[float, ...] = tuple(i / 10 for i in range(11))
"""The grid of session weights tried by default: 0, 0.1, ..., 1."""
NEIGHBOUR = "neighbour"


class SessionNeighbours:
    """The session model as arrays: each item's co-visitation neighbours, best first.

    Compressed sparse rows over one sorted vocabulary of every item and neighbour id
    (:class:`models.user_lists.IdIndex`): item ``c``'s neighbours are ``codes[starts[c]:
    starts[c + 1]]`` with their ``scores``. :meth:`save` writes the arrays into a folder and
    :meth:`open` memory-maps them, so that a server process opening the neighbours of a large
    catalogue sorts and indexes nothing.

    Args:
        neighbours: ``item_id, neighbour, score`` (as ``CoVisitation.neighbours_``).
    """

    FILES = ("vocabulary.npy", "starts.npy", "codes.npy", "scores.npy")

    def __init__(self, neighbours: pl.DataFrame | pl.LazyFrame | None = None, *,
                 arrays: tuple[np.ndarray, ...] | None = None) -> None:
        if arrays is None:
            if neighbours is None:
                raise ConfigError("SessionNeighbours needs the neighbours or their arrays.")
            arrays = self._arrays(neighbours.lazy())
        vocabulary, *rest = arrays
        self._starts, self._codes, self._scores = (np.asarray(a) for a in rest)  # plain views
        self._index = IdIndex(vocabulary)

    @classmethod
    def from_parquet(cls, path: Path) -> SessionNeighbours:
        """The arrays of a Parquet file of neighbours, streamed: its ids are never all in memory.

        Memory: the vocabulary and 16 bytes a row (codes and scores), not the file's strings.
        """
        return cls(pl.scan_parquet(path))

    @staticmethod
    def _arrays(neighbours: pl.LazyFrame) -> tuple[np.ndarray, ...]:
        require_columns(neighbours.collect_schema().names(), (ITEM, NEIGHBOUR, SCORE),
                        "neighbours")
        ids = pl.concat([neighbours.select(pl.col(column).cast(pl.String).alias("id"))
                         for column in (ITEM, NEIGHBOUR)])
        vocabulary = ids.unique().sort("id").collect(engine="streaming")["id"]
        coder = pl.DataFrame({"id": vocabulary}).with_row_index("code").lazy()
        coded = (neighbours.select(pl.col(ITEM).cast(pl.String), pl.col(NEIGHBOUR).cast(pl.String),
                                   pl.col(SCORE).cast(pl.Float64))
                 .join(coder.rename({"id": ITEM, "code": "__item"}), on=ITEM)
                 .join(coder.rename({"id": NEIGHBOUR, "code": "__neighbour"}), on=NEIGHBOUR)
                 .select("__item", "__neighbour", SCORE)
                 .collect(engine="streaming")
                 .sort("__item", SCORE, "__neighbour", descending=[False, True, False]))
        counts = np.bincount(coded["__item"].to_numpy(), minlength=vocabulary.len())
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return (IdIndex.encode(vocabulary), starts,
                coded["__neighbour"].to_numpy().astype(np.int32),
                coded[SCORE].to_numpy().astype(np.float64))

    def save(self, folder: Path) -> None:
        """Write the arrays into ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = (self._index.ids, self._starts, self._codes, self._scores)
        for name, array in zip(self.FILES, arrays, strict=True):
            np.save(folder / name, np.asarray(array))

    @classmethod
    def open(cls, folder: Path) -> SessionNeighbours:
        """Memory-map arrays written by :meth:`save`."""
        return cls(arrays=tuple(np.load(Path(folder) / name, mmap_mode="r")
                                for name in cls.FILES))

    def session_list(self, recent: Sequence[str], session_items: int = 5,
                     decay: float = 0.5) -> list[tuple[str, float]]:
        """Co-visitation neighbours of a session's newest ``session_items`` items.

        A neighbour scores the sum over those items of ``decay ** age`` times its co-visitation
        score (age 0: the newest item; a repeated item counts at its newest age); best first,
        ties by item id. Items without neighbours add nothing.
        """
        ages: dict[str, int] = {}
        for age, item in enumerate(reversed(recent[-session_items:])):
            ages.setdefault(item, age)
        scores: dict[int, float] = {}
        for item, age in ages.items():
            code = self._index.get(item)
            if code is None:
                continue
            weight = decay ** age
            rows = slice(int(self._starts[code]), int(self._starts[code + 1]))
            for neighbour, score in zip(self._codes[rows].tolist(), self._scores[rows].tolist(),
                                        strict=True):
                scores[neighbour] = scores.get(neighbour, 0.0) + weight * score
        ids = self._index.ids
        named = [(ids[code].decode(), score) for code, score in scores.items()]
        return sorted(named, key=lambda pair: (-pair[1], pair[0]))


class SessionChoice(NamedTuple):
    """What :func:`choose_session_weight` found."""

    weight: float
    """The weight with the best ``metric`` (the smallest such weight on a tie)."""
    table: pl.DataFrame
    """``weight`` and every metric :func:`models.metrics.evaluate` gives at the metric's cut-off
    (``ndcg@10``, ``recall@10``, ..., ``users``), one row per weight of the grid, in its order."""
    metric: str
    """The metric that chose."""
    blended: int
    """Users whose list depends on the weight (a list, and new session items with neighbours);
    0: the data says nothing about the weight (every figure is the same)."""


def choose_session_weight(
    lists: pl.DataFrame,
    neighbours: pl.DataFrame,
    history: pl.DataFrame,
    sessions: pl.DataFrame,
    targets: pl.DataFrame,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    *,
    metric: str = "ndcg@10",
    session_items: int = 5,
    session_decay: float = 0.5,
) -> SessionChoice:
    """The session weight of a family, chosen by replaying the serving rule on validation data.

    Every user of ``targets`` is answered as the served model would answer them with their
    session as ``recent_items`` (see the module docstring): a user with a list and new session
    items gets the blend of both, cut to the list's depth as the served lists are; a user with a
    list and no new session item (or one whose new items have no neighbours) gets the list, at
    every weight; a user without a list is one the model does not know: their whole session's
    list, at every weight. Give ``lists`` for every user of ``targets`` (restrict ``targets`` to
    the users of ``lists`` when only some were scored). Each weight's lists are scored
    on ``targets`` by :func:`models.metrics.evaluate` (a user without any list scores 0;
    trending items, which fill served lists, are not replayed).

    Args:
        lists: The family's validation lists, ``user_id, item_id, score, rank`` (top-N per user,
            from the model fitted on the training window). The deepest list sets the depth the
            session's list is cut to (the served lists' depth: ``serve.max_k`` + 16).
        neighbours: ``item_id, neighbour, score``: the session model fitted on the training
            window (``CoVisitation.neighbours_``).
        history: ``user_id, item_id``: each user's known items (the training window).
        sessions: ``user_id, item_id``: each user's session items in order, newest last (the
            first event of the user's validation window).
        targets: ``user_id, item_id``: what each user's list must find (the distinct items of
            the rest of the user's validation window).
        weights: The weights to try, each in ``[0, 1]`` (0: the list alone, 1: the session's).
        metric: ``<name>@<k>``, an accuracy metric of :mod:`models.metrics` (``ndcg@10``).
        session_items: Newest new items per session that count (``serve.session_items``).
        session_decay: Weight ratio of a session item to the next newer one.

    Returns:
        The chosen weight, the table of every weight's figures, and the metric.

    Raises:
        ConfigError: ``metric`` is not an accuracy metric at a cut-off, or a weight is outside
            ``[0, 1]`` (or none is given).
        DataError: ``targets`` is empty: no user to score.
        MissingColumnsError: A frame lacks a column it needs.
    """
    check_weights(weights, metric)
    require_columns(targets.columns, (USER, ITEM), "targets")
    if targets.is_empty():
        raise DataError("no validation targets to choose the session weight on: no user has "
                        "events in the validation window after their session.")
    part = session_weight_parts(lists, neighbours, history, sessions, targets, weights,
                                metric=metric, session_items=session_items,
                                session_decay=session_decay)
    return pick_weight([part], weights, metric)


def check_weights(weights: Sequence[float], metric: str) -> None:
    """Raise :class:`ConfigError` for a weight outside ``[0, 1]``, none, or a bad metric."""
    _cut_off(metric)
    if not weights or any(not 0.0 <= float(w) <= 1.0 for w in weights):
        raise ConfigError(f"weights must be a non-empty list of numbers from 0 to 1; got "
                          f"{list(weights)}.")


WeightParts = tuple[list[dict[str, Any]], int]
"""Per weight of the grid (in its order) the partial metrics of a part of the users, and how
many of them were blended (:func:`session_weight_parts`)."""


def session_weight_parts(
    lists: pl.DataFrame, neighbours: pl.DataFrame, history: pl.DataFrame,
    sessions: pl.DataFrame, targets: pl.DataFrame, weights: Sequence[float] = DEFAULT_WEIGHTS,
    *, metric: str = "ndcg@10", session_items: int = 5, session_decay: float = 0.5,
) -> WeightParts:
    """:func:`choose_session_weight`'s replay for a part of the users (for example a shard).

    The parts of disjoint users give the whole's choice with :func:`pick_weight` (their
    :func:`models.metrics.partial_metrics` merge exactly); ``neighbours`` must be the whole
    history's. A part without targets scores no user.
    """
    k = _cut_off(metric)
    own = _user_lists(lists)
    depth = max((len(items) for items in own.values()), default=0)
    new = new_session_items(sessions, history)
    whole = new_session_items(sessions, history.clear())
    model = SessionNeighbours(neighbours)
    fixed: dict[str, list[tuple[str, float]]] = {}
    fused: dict[str, tuple[list[tuple[str, float]], list[tuple[str, float]]]] = {}
    for user in targets[USER].cast(pl.String).unique().sort().to_list():
        mine = own.get(user)
        recent = new.get(user) if mine is not None else whole.get(user)
        session = model.session_list(recent, session_items, session_decay) if recent else []
        if session and mine is not None:
            fused[user] = (mine, session[:depth])
        elif mine is not None or session:
            fixed[user] = mine if mine is not None else session
    unchanged, parts = _frame(fixed, k), []  # the same lists at every weight
    for weight in weights:
        answers = {u: blend(m, s, float(weight)) for u, (m, s) in fused.items()}
        parts.append(partial_metrics(pl.concat([unchanged, _frame(answers, k)]), targets, [k]))
    return parts, len(fused)


def pick_weight(parts: Sequence[WeightParts], weights: Sequence[float], metric: str
                ) -> SessionChoice:
    """The weight whose merged ``metric`` is best (the smallest on a tie), and the table."""
    rows = [{"weight": float(weight), **merge_partials([part[0][i] for part in parts])}
            for i, weight in enumerate(weights)]
    best = max(rows, key=lambda row: (row[metric], -row["weight"]))
    return SessionChoice(best["weight"], pl.DataFrame(rows), metric,
                         sum(part[1] for part in parts))


def new_session_items(sessions: pl.DataFrame, history: pl.DataFrame) -> dict[str, list[str]]:
    """Each user's session items that are not among their ``history`` items, in order."""
    require_columns(sessions.columns, (USER, ITEM), "sessions")
    require_columns(history.columns, (USER, ITEM), "history")
    known = history.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String))
    fresh = (sessions.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String))
             .join(known, on=[USER, ITEM], how="anti", maintain_order="left"))
    grouped = fresh.group_by(USER, maintain_order=True).agg(pl.col(ITEM))
    return dict(grouped.iter_rows())


def save_valid_lists(recs: Any, folder: Path, k: int) -> Path:
    """Write the top ``k`` of each user's validation list; returns the path.

    ``recs`` (polars or pandas, ``user_id, item_id, score, rank``) goes to
    ``folder/``:data:`VALID_LISTS`, sorted by user and rank.
    """
    path = Path(folder) / VALID_LISTS
    path.parent.mkdir(parents=True, exist_ok=True)
    as_lists_frame(recs).filter(pl.col(RANK) <= k).sort(USER, RANK).write_parquet(path)
    return path


def _cut_off(metric: str) -> int:
    name, _, cut = metric.partition("@")
    if name not in ACCURACY_METRICS or not cut.isdigit() or int(cut) < 1:
        allowed = ", ".join(f"{m}@10" for m in ACCURACY_METRICS)
        raise ConfigError(f"the session weight is chosen on an accuracy metric at a cut-off "
                          f"({allowed}, ...); got metric {metric!r}.")
    return int(cut)


def _user_lists(lists: pl.DataFrame) -> dict[str, list[tuple[str, float]]]:
    """``user -> [(item, score), ...]`` by rank."""
    frame = as_lists_frame(lists).sort(USER, RANK)
    grouped = frame.group_by(USER, maintain_order=True).agg(ITEM, SCORE)
    return {user: list(zip(items, scores, strict=True))
            for user, items, scores in grouped.iter_rows()}


def _frame(answers: dict[str, list[tuple[str, float]]], k: int) -> pl.DataFrame:
    """The top ``k`` of every answer as ``user_id, item_id, rank``."""
    users: list[str] = []
    items: list[str] = []
    ranks: list[int] = []
    for user, ranked in answers.items():
        top = ranked[:k]
        users += [user] * len(top)
        items += [item for item, _ in top]
        ranks += range(1, len(top) + 1)
    return pl.DataFrame({USER: users, ITEM: items, RANK: ranks},
                        schema={USER: pl.String, ITEM: pl.String, RANK: pl.Int64})
