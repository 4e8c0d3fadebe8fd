"""Answer recommendation requests from one packaged model: the logic behind the served pyfunc.

A *bundle* is a folder holding everything needed to answer a request without the training data:

* ``model/``: the chosen model's saved folder, loaded by the class its family names
  (:data:`FAMILIES`; a new model family plugs in with :func:`register_family`);
* ``trending.parquet``: the fallback ranking (recent popularity), ``item_id, score, pop_rank``;
* ``neighbours.parquet``: the session model, co-visitation neighbours ``item_id, neighbour,
  score``, which turns the ``recent_items`` of a user the model does not know into a list;
* ``users.parquet`` and ``items.parquet``: the users the model knows and the known items;
* ``manifest.json`` (family, settings) and ``config.json`` (the resolved training config).

A request record has ``user_id``, optional ``k`` (default 10), optional ``recent_items`` (item ids
of a live session, newest last) and optional ``exclude`` (item ids never to return). Known users
are answered by the model; unknown users by the session model when their recent items have
neighbours, else by trending items; every list is filled from trending items up to ``k``. A
malformed record raises :class:`RequestError`, naming the record and the field.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from models.base import POP_RANK
from models.columns import ITEM, RANK, SCORE, USER
from models.errors import ConfigError, DataError, ShoprankError

logger = logging.getLogger(__name__)

FAMILIES: dict[str, type | str] = {
    "popularity": "models.baselines:Popularity",
    "recent_popularity": "models.baselines:Popularity",
    "covisitation": "models.baselines:CoVisitation",
    "buy_again": "models.baselines:BuyAgain",
    "transformer": "models.transformer:SequentialTransformer",
}
"""Model family name -> class with ``load(path)`` and ``recommend(users, k, exclude_seen)``
(a class, or ``"module:Class"`` imported on first use)."""

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TRENDING_SLACK = 10_000
"""Trending items kept in memory beyond ``max_k`` for the fill of the lists."""
_POS = "__pos"


def register_family(name: str, target: type | str) -> None:
    """Make model family ``name`` servable: ``target`` is its class or ``"module:Class"``."""
    FAMILIES[name] = target


def family_class(name: str) -> type:
    """The class that loads saved models of family ``name``."""
    target = FAMILIES.get(name)
    if target is None:
        raise ConfigError(
            f"model family {name!r} cannot be served: known families are "
            f"{', '.join(sorted(FAMILIES))}. Register it with models.serving.register_family()."
        )
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        FAMILIES[name] = target
    return target


class RequestError(ShoprankError, ValueError):
    """A request record is malformed; ``field`` names the offending field."""

    def __init__(self, message: str, field: str) -> None:
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class Request:
    """One validated request record."""

    user_id: str
    k: int
    recent_items: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _parse_id(value: Any, where: str, field: str) -> str:
    if isinstance(value, (str, np.str_)) and str(value).strip():
        return str(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(value)
    raise RequestError(
        f"{where}: {field} must be a non-empty string (or integer) id; got {value!r}.", field
    )


def _parse_k(value: Any, where: str, default_k: int, max_k: int) -> int:
    if _missing(value):
        return default_k
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer()
    )
    if isinstance(value, (bool, np.bool_)) or not integral or not 1 <= int(value) <= max_k:
        raise RequestError(f"{where}: k must be an integer from 1 to {max_k}; got {value!r}.", "k")
    return int(value)


def _parse_items(value: Any, where: str, field: str) -> tuple[str, ...]:
    if _missing(value):
        return ()
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise RequestError(
            f"{where}: {field} must be a list of item ids; got {type(value).__name__} {value!r}.",
            field,
        )
    return tuple(_parse_id(item, where, f"{field} item") for item in value)


def parse_requests(
    records: Sequence[Mapping[str, Any]], default_k: int = 10, max_k: int = 1000
) -> list[Request]:
    """Validate request records (dicts) into :class:`Request` objects.

    Raises:
        RequestError: A record is not a mapping, lacks ``user_id``, has a ``k`` that is not an
            integer in ``1..max_k``, a ``recent_items``/``exclude`` that is not a list of ids, or
            repeats a user of an earlier record. The message names the record and the field.
    """
    if len(records) == 0:
        raise RequestError("the request holds no records: send at least one with a user_id.", USER)
    parsed, seen = [], set()
    for index, record in enumerate(records):
        where = f"record {index}"
        if not isinstance(record, Mapping):
            raise RequestError(f"{where} must be an object with a user_id; got {record!r}.", USER)
        if _missing(record.get(USER)):
            raise RequestError(f"{where}: user_id is missing; every record needs one.", USER)
        user = _parse_id(record[USER], where, USER)
        if user in seen:
            raise RequestError(
                f"{where}: user_id {user!r} appears twice; send one record per user.", USER
            )
        seen.add(user)
        parsed.append(
            Request(
                user,
                _parse_k(record.get("k"), where, default_k, max_k),
                _parse_items(record.get("recent_items"), where, "recent_items"),
                _parse_items(record.get("exclude"), where, "exclude"),
            )
        )
    return parsed


def _as_polars(frame: Any) -> pl.DataFrame:
    """A model's ``recommend`` output (polars or pandas) as ``user_id, item_id, score, rank``."""
    if not isinstance(frame, pl.DataFrame):
        frame = pl.from_pandas(frame)
    return frame.select(
        pl.col(USER).cast(pl.String),
        pl.col(ITEM).cast(pl.String),
        pl.col(SCORE).cast(pl.Float64),
        pl.col(RANK).cast(pl.Int64),
    )


def _pairs(requests: Sequence[Request], field: str) -> pl.DataFrame:
    """``user_id, item_id, __pos`` for the item list ``field`` of every request."""
    users = [r.user_id for r in requests for _ in getattr(r, field)]
    items = [i for r in requests for i in getattr(r, field)]
    positions = [p for r in requests for p in range(len(getattr(r, field)))]
    return pl.DataFrame(
        {USER: users, ITEM: items, _POS: positions},
        schema={USER: pl.String, ITEM: pl.String, _POS: pl.Int64},
    )


class ServingModel:
    """A loaded bundle (see the module docstring); answers requests and batch lists.

    Args:
        model: The chosen model (anything with ``recommend(users, k, exclude_seen)``).
        manifest: The bundle's manifest (``family``, ``exclude_seen``, ``default_k``, ...).
        trending: ``item_id, score, pop_rank`` of the fallback ranking.
        neighbours: ``item_id, neighbour, score`` of the session model.
        users: Ids of the users the model knows.
        items: Ids of the known items.
    """

    def __init__(
        self,
        model: Any,
        manifest: dict[str, Any],
        trending: pl.DataFrame,
        neighbours: pl.DataFrame,
        users: pl.Series,
        items: pl.Series,
    ) -> None:
        self.model = model
        self.manifest = manifest
        self.trending = trending.sort(POP_RANK)
        self.neighbours = neighbours
        self.users = users
        self.items = items
        self._known = frozenset(users.to_list())
        self.default_k = int(manifest.get("default_k", 10))
        self.max_k = int(manifest.get("max_k", 1000))
        self.exclude_seen = bool(manifest.get("exclude_seen", False))
        self.session_items = int(manifest.get("session_items", 5))
        self.session_decay = float(manifest.get("session_decay", 0.5))
        top = self.trending[SCORE].max() if self.trending.height else None
        self._trend_scale = 1.0 / top if top else 0.0
        self.cache_depth = int(manifest.get("cache_depth", 16))
        self.cache_max_users = int(manifest.get("cache_max_users", 500_000))
        self._lists: dict[str, list[tuple[str, float]]] = {}
        head = self.trending.head(self.max_k + TRENDING_SLACK)
        self._trend_items = head[ITEM].to_list()
        self._trend_shares = (head[SCORE] * self._trend_scale).to_list()

    # ------------------------------------------------------------------ bundle on disk
    @staticmethod
    def build(
        folder: Path,
        *,
        family: str,
        model_dir: Path,
        trending: pl.DataFrame,
        neighbours: pl.DataFrame,
        users: pl.Series,
        items: pl.Series,
        config: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Path:
        """Write a bundle into ``folder`` (created; must not exist) and return it.

        ``settings`` go to the manifest: ``exclude_seen``, ``default_k``, ``max_k``,
        ``session_items``, ``session_decay`` and anything descriptive (``model_name``, ...).
        """
        family_class(family)  # fail early for a family that could not be loaded back
        folder = Path(folder)
        if folder.exists():
            raise DataError(f"{folder} already exists; give a new folder for the bundle.")
        shutil.copytree(model_dir, folder / "model")
        trending.select(ITEM, SCORE, POP_RANK).write_parquet(folder / "trending.parquet")
        neighbours.select(ITEM, "neighbour", SCORE).write_parquet(folder / "neighbours.parquet")
        pl.DataFrame({USER: users.cast(pl.String).unique(maintain_order=True)}).write_parquet(
            folder / "users.parquet"
        )
        pl.DataFrame({ITEM: items.cast(pl.String).unique(maintain_order=True)}).write_parquet(
            folder / "items.parquet"
        )
        manifest = {"format_version": FORMAT_VERSION, "family": family, **settings}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        (folder / "config.json").write_text(json.dumps(config or {}, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder: Path) -> ServingModel:
        """Read a bundle written by :meth:`build`."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise DataError(f"{folder} is not a serving bundle: {MANIFEST} is missing.")
        manifest = json.loads((folder / MANIFEST).read_text())
        model = family_class(manifest["family"]).load(folder / "model")
        serving = cls(
            model,
            manifest,
            pl.read_parquet(folder / "trending.parquet"),
            pl.read_parquet(folder / "neighbours.parquet"),
            pl.read_parquet(folder / "users.parquet")[USER],
            pl.read_parquet(folder / "items.parquet")[ITEM],
        )
        serving.warm()
        return serving

    def warm(self, chunk: int = 20_000) -> None:
        """Keep every known user's top ``cache_depth`` model list in memory.

        Single requests of known users are then answered without calling the model. Skipped
        when ``cache_depth`` is 0 or there are more than ``cache_max_users`` users.
        """
        if not self.cache_depth or self.users.len() > self.cache_max_users:
            return
        for start in range(0, self.users.len(), chunk):
            users = self.users.slice(start, chunk).to_list()
            recs = self.model.recommend(users, k=self.cache_depth, exclude_seen=self.exclude_seen)
            lists = _as_polars(recs).sort(USER, RANK).group_by(USER, maintain_order=True)
            for user, items, scores in lists.agg(ITEM, SCORE).iter_rows():
                self._lists[user] = list(zip(items, scores, strict=True))
        logger.info("cached the top %d of %d users", self.cache_depth, len(self._lists))

    # ------------------------------------------------------------------ answering
    def predict(self, records: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
        """Validate request records and answer them (see :meth:`answer`)."""
        return self.answer(parse_requests(records, self.default_k, self.max_k))

    def answer(self, requests: Sequence[Request]) -> pl.DataFrame:
        """Top-``k`` lists of every request.

        Returns:
            ``user_id, item_id, score, rank`` sorted by request order then rank. Scores never
            increase with rank: the model's or session model's scores first, then trending
            fill scores below them.
        """
        cached = {
            r.user_id: self._lists[r.user_id]
            for r in requests
            if r.user_id in self._lists and r.k + len(r.exclude) <= self.cache_depth
        }
        known = [r for r in requests if r.user_id in self._known and r.user_id not in cached]
        unknown = [r for r in requests if r.user_id not in self._known and r.recent_items]
        personal = pl.concat([self._model_lists(known), self._session_lists(unknown)])
        return self._assemble(requests, personal, cached)

    def recommend_users(self, users: Sequence[str] | pl.Series, k: int = 10) -> pl.DataFrame:
        """Batch lists for ``users`` (known ones by the model, others by trending items)."""
        if not 1 <= k <= self.max_k:
            raise RequestError(f"k must be an integer from 1 to {self.max_k}; got {k!r}.", "k")
        ids = pl.Series(users, dtype=pl.String).unique(maintain_order=True).to_list()
        return self.answer([Request(user, k) for user in ids])

    def _model_lists(self, requests: Sequence[Request]) -> pl.DataFrame:
        """The model's lists, deep enough that ``k`` survive each request's exclusions."""
        parts = [_empty_lists()]
        buckets: dict[int, list[str]] = {}
        for r in requests:
            depth = min(1 << (r.k + len(r.exclude) - 1).bit_length(), max(self.items.len(), 1))
            buckets.setdefault(depth, []).append(r.user_id)
        for depth, users in buckets.items():
            recs = _as_polars(self.model.recommend(users, k=depth, exclude_seen=self.exclude_seen))
            parts.append(recs.select(USER, ITEM, SCORE, pl.col(RANK).alias(_POS)))
        return pl.concat(parts)

    def _session_lists(self, requests: Sequence[Request]) -> pl.DataFrame:
        """Co-visitation neighbours of each request's last recent items, newest weighing most."""
        if not requests:
            return _empty_lists()
        recent = (
            _pairs(requests, "recent_items")
            .with_columns((pl.col(_POS).max().over(USER) - pl.col(_POS)).alias("age"))
            .filter(pl.col("age") < self.session_items)
            .group_by(USER, ITEM)
            .agg(pl.col("age").min())
        )
        return (
            recent.join(self.neighbours, on=ITEM)
            .group_by(USER, "neighbour")
            .agg((pl.lit(self.session_decay).pow(pl.col("age")) * pl.col(SCORE)).sum().alias(SCORE))
            .sort([USER, SCORE, "neighbour"], descending=[False, True, False])
            .select(
                USER,
                pl.col("neighbour").alias(ITEM),
                SCORE,
                pl.int_range(1, pl.len() + 1).over(USER).cast(pl.Int64).alias(_POS),
            )
        )

    def _assemble(
        self,
        requests: Sequence[Request],
        personal: pl.DataFrame,
        cached: dict[str, list[tuple[str, float]]],
    ) -> pl.DataFrame:
        """Each request's ``k`` best personal items (exclusions removed), then trending fill."""
        lists = dict(cached)
        for user, item, score, _ in personal.sort(USER, _POS).iter_rows():
            lists.setdefault(user, []).append((item, score))
        columns: dict[str, list] = {USER: [], ITEM: [], SCORE: [], RANK: []}
        for r in requests:
            taken = set(r.exclude)
            chosen = [(i, s) for i, s in lists.get(r.user_id, ()) if i not in taken][: r.k]
            floor = min([0.0, *(s for _, s in chosen)])
            taken.update(i for i, _ in chosen)
            for item, share in zip(self._trend_items, self._trend_shares, strict=True):
                if len(chosen) >= r.k:
                    break
                if item not in taken:
                    chosen.append((item, share - 1.0 + floor))
            for rank, (item, score) in enumerate(chosen, start=1):
                columns[USER].append(r.user_id)
                columns[ITEM].append(item)
                columns[SCORE].append(score)
                columns[RANK].append(rank)
        return pl.DataFrame(
            columns, schema={USER: pl.String, ITEM: pl.String, SCORE: pl.Float64, RANK: pl.Int64}
        )


def _empty_lists() -> pl.DataFrame:
    return pl.DataFrame(
        schema={USER: pl.String, ITEM: pl.String, SCORE: pl.Float64, _POS: pl.Int64}
    )
