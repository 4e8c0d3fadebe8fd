"""Answer recommendation requests from one packaged model: the logic behind the served pyfunc.

A *bundle* is a folder holding everything needed to answer a request without the training data:

* ``model/``: the chosen model's saved folder, loaded by the class its family names
  (:data:`FAMILIES`; a new model family plugs in with :func:`register_family`);
* ``trending.parquet``: the fallback ranking (recent popularity), ``item_id, score, pop_rank``;
* ``neighbours.parquet``: the session model, co-visitation neighbours ``item_id, neighbour,
  score``, which turns the ``recent_items`` of a user the model does not know into a list;
  ``session/``: the same as memory-mapped arrays (:class:`models.session_blend.
  SessionNeighbours`), what a server opens (bundles written before it existed get them built
  from the Parquet file when opened);
* ``users.parquet`` and ``items.parquet``: the users the model knows and the known items;
* ``lists/``: every known user's top ``max_k`` + :data:`EXCLUDE_SLACK` list, computed by the
  model when the bundle is written and memory-mapped when it is opened
  (:mod:`models.user_lists`);
* ``history/``: every known user's distinct history items (:class:`models.user_lists.UserItems`,
  memory-mapped), to tell a live session's new items from those the model has seen (bundles
  written before it existed have none: their users' whole sessions count);
* ``manifest.json`` (family, settings) and ``config.json`` (the resolved training config);
  a bundle of lists computed elsewhere (:meth:`ServingModel.build_from_lists`: the lists of a
  model scored shard by shard on a cluster) has no ``model/`` and says ``lists_only``: its
  requests are answered from the lists, deep ones too (fewer personal items, then trending);
* ``catalogue/``, after a catalogue update (:mod:`models.catalogue`): items that are not
  available (never returned) and each item's nearest new items, which a live session's counted
  items propose (blended by ``catalogue.new_item_weight``).

A request record has ``user_id``, optional ``k`` (default 10), optional ``recent_items`` (item ids
of a live session, newest last) and optional ``exclude`` (item ids never to return). Known users
are answered from their precomputed list. Of a known user's ``recent_items`` only the new ones
count, those not in the user's known history (a shop front end replays items the model has
seen): with none, the list is the precomputed one; with some, a model that reads sessions
(``recommend_session``: the transformer) answers with the new items appended to the user's
sequence, any other model's list is blended with the session model's list of the new items
(weighted reciprocal rank, ``session_weight``; :mod:`models.session_blend`). Unknown users get
the session model's list of their whole session when it has neighbours, else trending items;
every list is filled from trending items up to ``k``. The model itself is loaded only when a
request goes deeper than the precomputed lists. A malformed record raises :class:`RequestError`,
naming the record and the field.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from models.base import POP_RANK
from models.catalogue import read_catalogue_part
from models.columns import ITEM, RANK, SCORE, USER
from models.errors import ConfigError, DataError
from models.requests import Request, RequestError, parse_requests
from models.session_blend import VALID_LISTS, SessionNeighbours
from models.user_lists import UserItems, UserLists, as_lists_frame, blend

logger = logging.getLogger(__name__)

FAMILIES: dict[str, type | str] = {
    "popularity": "models.baselines:Popularity",
    "recent_popularity": "models.baselines:Popularity",
    "covisitation": "models.covisitation:CoVisitation",
    "buy_again": "models.baselines:BuyAgain",
    "transformer": "models.transformer:SequentialTransformer",
    "content": "models.content:ContentNeighbours",
}
"""Model family name -> class with ``load(path)`` and ``recommend(users, k, exclude_seen)``
(a class, or ``"module:Class"`` imported on first use)."""

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TRENDING_SLACK = 10_000
"""Trending items kept in memory beyond ``max_k`` for the fill of the lists."""
LISTS = "lists"
HISTORY = "history"
SESSION = "session"
DEFAULT_MAX_K = 200
"""Largest ``k`` a request may ask for, unless the bundle's ``max_k`` says otherwise."""
EXCLUDE_SLACK = 16
"""Entries precomputed beyond ``max_k``: ``k`` items survive that many excluded ones."""
DEFAULT_SESSION_WEIGHT = 0.5
"""Weight of the live session against a known user's model list (see ``blend``)."""
LEGACY_MAX_K, LEGACY_LIST_DEPTH = 1000, 16
"""What bundles written before precomputed lists existed meant (their lists are built at load)."""
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


class ServingModel:
    """A loaded bundle (see the module docstring); answers requests and batch lists.

    Args:
        load_model: Loads the chosen model (anything with ``recommend(users, k, exclude_seen)``);
            called on first use only: known users are answered from ``lists``.
        manifest: The bundle's manifest (``family``, ``exclude_seen``, ``default_k``, ...).
        trending: ``item_id, score, pop_rank`` of the fallback ranking.
        neighbours: ``item_id, neighbour, score`` of the session model, or its arrays already
            built (:class:`SessionNeighbours`; the table is then read from ``folder`` if asked
            for: :attr:`neighbours`).
        users: Ids of the users the model knows.
        items: Ids of the known items.
        lists: The known users' precomputed top lists.
        folder: The bundle's folder, when it was loaded from one.
        history: The known users' history items, rows as in ``lists`` (None: every session
            item of a known user counts).
    """

    def __init__(
        self,
        load_model: Callable[[], Any],
        manifest: dict[str, Any],
        trending: pl.DataFrame,
        neighbours: pl.DataFrame | SessionNeighbours,
        users: pl.Series,
        items: pl.Series,
        lists: UserLists,
        folder: Path | None = None,
        history: UserItems | None = None,
    ) -> None:
        if history is not None and len(history) != len(lists):
            raise DataError(f"the bundle's history has {len(history)} users and its lists "
                            f"{len(lists)}; rebuild the bundle.")
        self.folder = folder
        self.history = history
        self._load_model = load_model
        self._model: Any = None
        self.manifest = manifest
        self.trending = trending.sort(POP_RANK)
        if isinstance(neighbours, SessionNeighbours):
            self._neighbours, self._session_neighbours = None, neighbours
        else:
            self._neighbours = neighbours
            self._session_neighbours = SessionNeighbours(neighbours)
        self.users = users
        self.items = items
        self.lists = lists
        self.default_k = int(manifest.get("default_k", 10))
        self.max_k = int(manifest.get("max_k", LEGACY_MAX_K))
        self.exclude_seen = bool(manifest.get("exclude_seen", False))
        self.session_items = int(manifest.get("session_items", 5))
        self.session_decay = float(manifest.get("session_decay", 0.5))
        self.session_weight = float(manifest.get("session_weight", DEFAULT_SESSION_WEIGHT))
        self.list_depth = int(manifest.get("list_depth", LEGACY_LIST_DEPTH))
        self.session_model = bool(manifest.get("session_model", False))
        self.lists_only = bool(manifest.get("lists_only", False))
        self.unavailable, links = read_catalogue_part(folder) if folder else (set(), None)
        self._new_links = None if links is None else SessionNeighbours(links)
        self.new_item_weight = float(manifest.get("catalogue", {}).get("new_item_weight", 0.0))
        top = self.trending[SCORE].max() if self.trending.height else None
        self._trend_scale = 1.0 / top if top else 0.0
        head = self.trending.head(self.max_k + TRENDING_SLACK)
        self._trend_items = head[ITEM].to_list()
        self._trend_shares = (head[SCORE] * self._trend_scale).to_list()

    @property
    def neighbours(self) -> pl.DataFrame:
        """``item_id, neighbour, score`` of the session model (read from the bundle if needed)."""
        if self._neighbours is None:
            if self.folder is None:
                raise DataError("this served model has no neighbours table to read.")
            self._neighbours = pl.read_parquet(self.folder / "neighbours.parquet")
        return self._neighbours

    @property
    def model(self) -> Any:
        """The chosen model, loaded on first use."""
        if self._model is None:
            self._model = self._load_model()
        return self._model

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
        history: pl.DataFrame | None = None,
        **settings: Any,
    ) -> Path:
        """Write a bundle into ``folder`` (created; must not exist) and return it.

        ``settings`` go to the manifest: ``exclude_seen``, ``default_k``, ``max_k``,
        ``session_items``, ``session_decay``, ``session_weight`` and anything descriptive
        (``model_name``, ...). Every known user's top ``max_k`` + :data:`EXCLUDE_SLACK` list is
        computed here, once, and stored under ``lists/`` (see :mod:`models.user_lists`).
        ``history`` (``user_id, item_id``: the events the model was fitted on) gives each known
        user's distinct items, stored under ``history/``: only session items outside them count
        (None: none stored, every session item counts). The model folder's validation lists
        (:data:`models.session_blend.VALID_LISTS`) are not copied.
        """
        loader_class = family_class(family)  # fail early for a family that cannot be loaded
        folder = Path(folder)
        if folder.exists():
            raise DataError(f"{folder} already exists; give a new folder for the bundle.")
        shutil.copytree(model_dir, folder / "model", ignore=shutil.ignore_patterns(VALID_LISTS))
        trending.select(ITEM, SCORE, POP_RANK).write_parquet(folder / "trending.parquet")
        neighbours.select(ITEM, "neighbour", SCORE).write_parquet(folder / "neighbours.parquet")
        SessionNeighbours(neighbours).save(folder / SESSION)
        users = users.cast(pl.String).unique(maintain_order=True)
        items = items.cast(pl.String).unique(maintain_order=True)
        pl.DataFrame({USER: users}).write_parquet(folder / "users.parquet")
        pl.DataFrame({ITEM: items}).write_parquet(folder / "items.parquet")
        settings.setdefault("max_k", DEFAULT_MAX_K)
        depth = int(settings["max_k"]) + EXCLUDE_SLACK
        model = loader_class.load(folder / "model")
        recommend = _recommender(model, bool(settings.get("exclude_seen", False)))
        start = time.perf_counter()
        lists = UserLists.compute(recommend, users, items, depth)
        lists.save(folder / LISTS)
        logger.info("precomputed the top %d of %d users in %.1f s (%.1f MB)", depth, len(lists),
                    time.perf_counter() - start, lists.nbytes / 1e6)
        if history is not None:
            known = UserItems.build(users, history)
            known.save(folder / HISTORY)
            logger.info("stored the history items of %d users (%.1f MB)", len(known),
                        known.nbytes / 1e6)
        manifest = {"format_version": FORMAT_VERSION, "family": family, "list_depth": depth,
                    "session_model": hasattr(loader_class, "recommend_session"), **settings}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        (folder / "config.json").write_text(json.dumps(config or {}, indent=2, default=str))
        return folder

    @staticmethod
    def build_from_lists(
        folder: Path,
        *,
        family: str,
        lists: Path,
        trending: pl.DataFrame | Path,
        neighbours: pl.DataFrame | Path,
        items: pl.Series,
        history: Path | None = None,
        config: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Path:
        """Write a bundle around lists already computed (a folder :class:`UserLists` opens).

        The known users are those of ``lists`` (their order); ``history``: their history items
        (a folder :class:`UserItems` opens, rows as in the lists), or None. Both folders are
        moved into the bundle. No model is kept: the manifest says ``lists_only`` and every
        request is answered from the lists (see the module docstring); ``settings`` as in
        :meth:`build`, ``max_k`` at most the lists' depth minus :data:`EXCLUDE_SLACK`.
        ``trending`` and ``neighbours`` may be Parquet files, streamed into the bundle.
        """
        folder = Path(folder)
        if folder.exists():
            raise DataError(f"{folder} already exists; give a new folder for the bundle.")
        known = UserLists.open(lists)
        depth = max(known.depth, 1)
        settings.setdefault("max_k", max(depth - EXCLUDE_SLACK, 1))
        if int(settings["max_k"]) > depth:
            raise ConfigError(f"max_k {settings['max_k']} is deeper than the lists ({depth}): "
                              "compute them deeper or lower serve.max_k.")
        folder.mkdir(parents=True)
        for table, columns, name in ((trending, (ITEM, SCORE, POP_RANK), "trending.parquet"),
                                     (neighbours, (ITEM, "neighbour", SCORE),
                                      "neighbours.parquet")):
            frame = pl.scan_parquet(table) if isinstance(table, Path) else table.lazy()
            frame.select(columns).sink_parquet(folder / name)
        SessionNeighbours.from_parquet(folder / "neighbours.parquet").save(folder / SESSION)
        pl.DataFrame({USER: known.users}).write_parquet(folder / "users.parquet")
        items = pl.concat([items.cast(pl.String), pl.Series(known.vocabulary, dtype=pl.String)])
        pl.DataFrame({ITEM: items.unique(maintain_order=True)}).write_parquet(
            folder / "items.parquet")
        shutil.move(str(lists), str(folder / LISTS))
        if history is not None:
            shutil.move(str(history), str(folder / HISTORY))
        manifest = {"format_version": FORMAT_VERSION, "family": family, "list_depth": depth,
                    "session_model": False, "lists_only": True, **settings}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        (folder / "config.json").write_text(json.dumps(config or {}, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder: Path) -> ServingModel:
        """Open a bundle written by :meth:`build`.

        The lists and the history are memory-mapped and the model is loaded on first use. A
        bundle written before lists existed gets them computed now, to the depth it was written
        for; one written before the history existed counts every session item.
        """
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise DataError(f"{folder} is not a serving bundle: {MANIFEST} is missing.")
        manifest = json.loads((folder / MANIFEST).read_text())

        def load_model() -> Any:  # the family's module (lightgbm, torch) is imported only here
            if manifest.get("lists_only"):
                raise DataError(f"{folder} holds lists only (computed shard by shard), no model.")
            return family_class(manifest["family"]).load(folder / "model")

        users = pl.read_parquet(folder / "users.parquet")[USER]
        items = pl.read_parquet(folder / "items.parquet")[ITEM]
        if (folder / LISTS).is_dir():
            lists = UserLists.open(folder / LISTS)
        else:
            recommend = _recommender(load_model(), bool(manifest.get("exclude_seen", False)))
            lists = UserLists.compute(recommend, users, items, LEGACY_LIST_DEPTH)
        history = UserItems.open(folder / HISTORY) if (folder / HISTORY).is_dir() else None
        session = (SessionNeighbours.open(folder / SESSION) if (folder / SESSION).is_dir()
                   else pl.read_parquet(folder / "neighbours.parquet"))
        serving = cls(load_model, manifest, pl.read_parquet(folder / "trending.parquet"),
                      session, users, items, lists, folder, history)
        if serving.session_model:  # it answers every live session: load it now, not mid-traffic
            serving.model  # noqa: B018
        return serving

    # ------------------------------------------------------------------ answering
    def predict(self, records: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
        """Validate request records and answer them (see :meth:`answer`)."""
        return self.answer(parse_requests(records, self.default_k, self.max_k))

    def answer(self, requests: Sequence[Request]) -> pl.DataFrame:
        """Top-``k`` lists of every request.

        A known user's list is read from the precomputed lists (the model runs only when ``k``
        plus the exclusions go deeper). Of a known user's ``recent_items`` only those outside
        the user's history count (:meth:`session_items_of`); with some, the request is answered by
        the model itself when it reads sessions (``recommend_session``), else the list is
        blended with the session model's (:func:`models.user_lists.blend`,
        ``session_weight``); an unknown user with ``recent_items`` gets the session model's
        list; then trending items fill.

        Returns:
            ``user_id, item_id, score, rank`` sorted by request order then rank. Scores never
            increase with rank: the model's (or blended, or session) scores first, then
            trending fill scores below them.
        """
        lists: dict[str, list[tuple[str, float]]] = {}
        deep = []
        for r in requests:
            if r.user_id not in self.lists:
                continue
            if r.k + len(r.exclude) <= self.list_depth or self.lists_only:
                lists[r.user_id] = self.lists.get(r.user_id)
            else:
                deep.append(r)
        lists.update(_grouped(self._model_lists(deep)))
        sessions = {r.user_id: self.session_items_of(r) for r in requests if r.recent_items}
        live: dict[str, list[tuple[str, float]]] = {}
        if self.session_model:
            live = _grouped(self._model_session_lists(
                [r for r in requests if sessions.get(r.user_id) and r.user_id in self.lists],
                sessions))
            lists.update(live)
        for r in requests:
            recent = sessions.get(r.user_id)
            if not recent or r.user_id in live:
                continue
            session = self._session_list(recent)
            if session:
                own = lists.get(r.user_id)
                lists[r.user_id] = session if own is None else blend(
                    own, session[: self.list_depth], self.session_weight)
        if self._new_links is not None and self.new_item_weight > 0:
            self._add_new_items(requests, sessions, lists)
        return self._assemble(requests, lists)

    def _add_new_items(self, requests: Sequence[Request], sessions: Mapping[str, list[str]],
                       lists: dict[str, list[tuple[str, float]]]) -> None:
        """Blend into each session's list the new items nearest its counted items (in place)."""
        for r in requests:
            recent = sessions.get(r.user_id)
            proposed = self._new_links.session_list(  # type: ignore[union-attr]
                recent, self.session_items, self.session_decay) if recent else None
            if proposed:
                own = lists.get(r.user_id)
                lists[r.user_id] = proposed if not own else blend(
                    own, proposed[: self.list_depth], self.new_item_weight)

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
            recs = as_lists_frame(
                self.model.recommend(users, k=depth, exclude_seen=self.exclude_seen))
            parts.append(recs.select(USER, ITEM, SCORE, pl.col(RANK).alias(_POS)))
        return pl.concat(parts)

    def session_items_of(self, request: Request) -> list[str]:
        """The items of ``request``'s session that count, newest last.

        A known user's items not in their history (every item when the bundle holds no
        history); an unknown user's every item.
        """
        recent = list(request.recent_items)
        row = self.lists.row(request.user_id)
        if row is None or self.history is None:
            return recent
        return self.history.unseen(row, recent)

    def _model_session_lists(self, requests: Sequence[Request],
                             sessions: Mapping[str, Sequence[str]]) -> pl.DataFrame:
        """A session-aware model's own lists for known users' live ``sessions`` (by user)."""
        if not requests:
            return _empty_lists()
        depth = max(r.k + len(r.exclude) for r in requests)
        recs = self.model.recommend_session(
            [r.user_id for r in requests], [list(sessions[r.user_id]) for r in requests],
            k=depth, exclude_seen=self.exclude_seen)
        return as_lists_frame(recs).select(USER, ITEM, SCORE, pl.col(RANK).alias(_POS))

    def _session_list(self, recent: Sequence[str]) -> list[tuple[str, float]]:
        """Co-visitation neighbours of a session's newest ``session_items`` items.

        Weighted by ``session_decay`` (:meth:`models.session_blend.SessionNeighbours.session_list`).
        """
        return self._session_neighbours.session_list(recent, self.session_items,
                                                     self.session_decay)

    def _assemble(
        self, requests: Sequence[Request], lists: dict[str, list[tuple[str, float]]]
    ) -> pl.DataFrame:
        """Each request's ``k`` best personal items (exclusions removed), then trending fill."""
        columns: dict[str, list] = {USER: [], ITEM: [], SCORE: [], RANK: []}
        for r in requests:
            taken = set(r.exclude)
            gone = self.unavailable
            chosen = [(i, s) for i, s in lists.get(r.user_id, ())
                      if i not in taken and i not in gone][: r.k]
            floor = min([0.0, *(s for _, s in chosen)])
            taken.update(i for i, _ in chosen)
            for item, share in zip(self._trend_items, self._trend_shares, strict=True):
                if len(chosen) >= r.k:
                    break
                if item not in taken and item not in gone:
                    chosen.append((item, share - 1.0 + floor))
            for rank, (item, score) in enumerate(chosen, start=1):
                columns[USER].append(r.user_id)
                columns[ITEM].append(item)
                columns[SCORE].append(score)
                columns[RANK].append(rank)
        return pl.DataFrame(
            columns, schema={USER: pl.String, ITEM: pl.String, SCORE: pl.Float64, RANK: pl.Int64}
        )


def _recommender(model: Any, exclude_seen: bool) -> Callable[[list[str], int], Any]:
    def recommend(users: list[str], k: int) -> Any:
        return model.recommend(users, k=k, exclude_seen=exclude_seen)

    return recommend


def _grouped(frame: pl.DataFrame) -> dict[str, list[tuple[str, float]]]:
    """``user -> [(item, score), ...]`` of a ``user_id, item_id, score, __pos`` frame."""
    lists: dict[str, list[tuple[str, float]]] = {}
    for user, item, score, _ in frame.sort(USER, _POS).iter_rows():
        lists.setdefault(user, []).append((item, score))
    return lists


def _empty_lists() -> pl.DataFrame:
    return pl.DataFrame(
        schema={USER: pl.String, ITEM: pl.String, SCORE: pl.Float64, _POS: pl.Int64}
    )
