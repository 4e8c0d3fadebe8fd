"""New and unavailable items in a served bundle, without retraining: a catalogue update.

A shop launches items every day; a model fitted yesterday knows none of today's. A catalogue
update rewrites a serving bundle (:mod:`models.serving`) from the shop's current catalogue and
its item vectors (:mod:`models.item_text`), leaving the model itself as it is:

* **new items**, catalogue items with a vector that the bundle's model does not know, reach
  - the known users' precomputed lists: each user's nearest new items in text space (cosine with
    the mean vector of the user's history items) that are at least as near as the model's own
    top items are (:data:`BAR_DEPTH`), fused with the model's list by weighted reciprocal rank
    (:func:`models.user_lists.blend`, weight ``new_item_weight``);
  - live sessions: ``catalogue/links.parquet`` holds each catalogue item's nearest new items
    (cosine); the counted items of a request's session propose them, fused the same way, for
    every family (one that reads sessions included);
  - sessions on new items: each new item's nearest known items join the session model's
    neighbours (cosine times the median of the known items' best co-visitation score), so a
    visitor who has viewed only new items still gets a list;
* **unavailable items** (``available`` false in the catalogue) are never returned
  (``catalogue/unavailable.parquet``).

Nearest items come from :func:`models.ann.nearest`: exact products below 100,000 candidate
items, an approximate HNSW graph from there on.

The model's own lists, items and neighbours are kept under ``catalogue/base/``, so a later update
starts again from them (an item new in one update and still unknown to the model stays new).
The manifest's ``catalogue`` entry says what changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from models.ann import nearest, searcher
from models.columns import ITEM, SCORE
from models.errors import DataError
from models.item_text import VECTOR
from models.session_blend import NEIGHBOUR, SessionNeighbours
from models.user_lists import UserItems, UserLists, blend

FOLDER = "catalogue"
BASE = "base"
LINKS = "links.parquet"
UNAVAILABLE = "unavailable.parquet"
BAR_DEPTH = 10
"""A new item joins a known user's list only when its cosine with the user's profile reaches the
median cosine of the model's top ``BAR_DEPTH`` items for that user: as close to the user's items
as what the model already recommends."""
DEFAULT_NEW_ITEM_WEIGHT = 0.4
"""Weight of the new items' list against the model's (0.4: the best new item lands near rank 7
of a top 10 when it matches the user's items)."""
_BLOCK_CELLS = 1 << 24  # users x new items per block of profiles (64 MiB of cosines)


def update_bundle(bundle: Path, out: Path, vectors: pl.DataFrame,
                  unavailable: pl.Series | None = None, *,
                  new_item_weight: float = DEFAULT_NEW_ITEM_WEIGHT, per_user: int = 20,
                  links: int = 20, bar_depth: int = BAR_DEPTH,
                  note: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write into the new folder ``out`` the bundle ``bundle`` updated for a catalogue.

    Args:
        bundle: A serving bundle (:meth:`models.serving.ServingModel.build`).
        out: The updated bundle's folder (must not exist).
        vectors: ``item_id, vector`` of every catalogue item (unit vectors).
        unavailable: Item ids never to return.
        new_item_weight: Weight of the new items' list in the blends (0: lists unchanged).
        per_user: New items proposed to each known user, at most.
        bar_depth: A new item must be as near the user's items as the median of the model's
            top ``bar_depth`` items (0: no bar).
        links: New items linked to each catalogue item, and known items to each new item.
        note: Written into the manifest's ``catalogue`` entry (the catalogue's digest, ...).

    Returns:
        The manifest's ``catalogue`` entry: counts of new, unavailable and reached items.
    """
    bundle, out = Path(bundle), Path(out)
    if out.exists():
        raise DataError(f"{out} already exists; give a new folder for the updated bundle.")
    if not 0.0 <= new_item_weight <= 1.0:
        raise DataError(f"new_item_weight must lie in [0, 1]; got {new_item_weight}.")
    base = bundle / FOLDER / BASE if (bundle / FOLDER / BASE).is_dir() else bundle
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns(FOLDER, "lists", "session",
                                                               "neighbours.parquet",
                                                               "items.parquet"))
    kept = out / FOLDER / BASE
    kept.mkdir(parents=True)
    shutil.copytree(base / "lists", kept / "lists")
    for name in ("neighbours.parquet", "items.parquet"):
        shutil.copy(base / name, kept / name)

    known = pl.read_parquet(kept / "items.parquet")[ITEM]
    matrix = vectors[VECTOR].to_numpy().astype(np.float32, copy=False)
    ids = vectors[ITEM].cast(pl.String)
    is_new = ~ids.is_in(known.implode()).to_numpy()
    if unavailable is not None:  # an unavailable item is proposed to nobody
        is_new &= ~ids.is_in(unavailable.cast(pl.String).implode()).to_numpy()
    new_ids, new_matrix = ids.filter(pl.Series(is_new)), matrix[is_new]

    lists = UserLists.open(kept / "lists")
    history = UserItems.open(out / "history") if (out / "history").is_dir() else None
    reached = _user_lists(lists, history, ids, matrix, new_ids, new_matrix, per_user,
                          new_item_weight, bar_depth, out / "lists")
    neighbours = pl.read_parquet(kept / "neighbours.parquet")
    _links(ids, matrix, new_ids, new_matrix, links).write_parquet(out / FOLDER / LINKS)
    linked = _with_new_items(neighbours, known, ids, matrix, new_ids, new_matrix, links)
    linked.write_parquet(out / "neighbours.parquet")
    SessionNeighbours(linked).save(out / "session")  # what a server opens (models.serving)
    pl.DataFrame({ITEM: pl.concat([known, new_ids])}).write_parquet(out / "items.parquet")
    gone = (unavailable if unavailable is not None else pl.Series([], dtype=pl.String))
    pl.DataFrame({ITEM: gone.cast(pl.String).unique().sort()}).write_parquet(
        out / FOLDER / UNAVAILABLE)

    entry = {**(note or {}), "new_items": int(new_ids.len()), "unavailable": int(gone.n_unique()),
             "users_reached": reached, "new_item_weight": new_item_weight, "per_user": per_user,
             "links": links}
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["catalogue"] = entry
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return entry


def _rows_of(ids: pl.Series, wanted: np.ndarray) -> np.ndarray:
    """Rows of ``wanted`` item ids in ``ids`` (-1 for ids without a vector)."""
    table = pl.DataFrame({ITEM: ids, "row": np.arange(ids.len(), dtype=np.int64)})
    found = pl.DataFrame({ITEM: pl.Series(wanted, dtype=pl.String)}).join(
        table, on=ITEM, how="left", maintain_order="left")
    return found["row"].fill_null(-1).to_numpy()


def _user_lists(lists: UserLists, history: UserItems | None, ids: pl.Series, matrix: np.ndarray,
                new_ids: pl.Series, new_matrix: np.ndarray, per_user: int, weight: float,
                bar_depth: int, folder: Path) -> int:
    """The known users' lists with their nearest new items blended in; users reached."""
    n_users, depth = len(lists), lists.depth
    if history is None or new_ids.len() == 0 or weight == 0.0 or per_user < 1:
        UserLists(lists.users, np.asarray(lists.offsets), np.asarray(lists.codes),
                  np.asarray(lists.scores), pl.Series(lists.vocabulary, dtype=pl.String)
                  ).save(folder)
        return 0
    item_rows = _rows_of(ids, history.vocabulary)  # history code -> vector row
    list_rows = _rows_of(ids, lists.vocabulary)  # list code -> vector row
    old = pl.Series(lists.vocabulary, dtype=pl.String)
    vocabulary = pl.concat([old, new_ids.filter(~new_ids.is_in(old.implode()))])
    code_of = {item: code for code, item in enumerate(vocabulary.to_list())}
    offsets, codes, scores, reached = [0], [], [], 0
    step = max(1, _BLOCK_CELLS // max(1, new_ids.len()))
    new_list, search = new_ids.to_list(), searcher(new_matrix)
    for start in range(0, n_users, step):
        rows = range(start, min(start + step, n_users))
        profile = np.zeros((len(rows), matrix.shape[1]), dtype=np.float32)
        for j, row in enumerate(rows):
            own = item_rows[history.codes[history.offsets[row]:history.offsets[row + 1]]]
            own = own[own >= 0]
            if own.size:
                profile[j] = matrix[own].mean(axis=0)
        index, cosine = search(profile, per_user)
        for j, row in enumerate(rows):
            bar = _bar(profile[j], matrix, list_rows[
                lists.codes[lists.offsets[row]:lists.offsets[row] + bar_depth]])
            proposed = [(new_list[i], float(c)) for i, c in zip(index[j], cosine[j], strict=True)
                        if c > 0 and c >= bar]
            model = lists.get(lists.users[row])
            merged = blend(model, proposed, weight)[:depth] if proposed else model
            fresh = {item for item, _ in proposed}
            reached += any(item in fresh for item, _ in merged[:10])
            codes.extend(code_of[item] for item, _ in merged)
            scores.extend(score for _, score in merged)
            offsets.append(offsets[-1] + len(merged))
    UserLists(lists.users, np.asarray(offsets, dtype=np.int64), np.asarray(codes, dtype=np.int32),
              np.asarray(scores, dtype=np.float64), vocabulary).save(folder)
    return reached


def _bar(profile: np.ndarray, matrix: np.ndarray, rows: np.ndarray) -> float:
    """The median cosine of a user's profile with the model's top items (0 without vectors)."""
    rows = rows[rows >= 0]
    return float(np.median(matrix[rows] @ profile)) if rows.size else -1.0


def _links(ids: pl.Series, matrix: np.ndarray, new_ids: pl.Series, new_matrix: np.ndarray,
           n: int) -> pl.DataFrame:
    """``item_id, neighbour, score``: every catalogue item's nearest new items (not itself)."""
    index, cosine = nearest(matrix, new_matrix, n + 1)
    frame = pl.DataFrame({ITEM: np.repeat(ids.to_numpy(), index.shape[1]),
                          NEIGHBOUR: new_ids.to_numpy()[index.ravel()] if index.size else [],
                          SCORE: cosine.ravel().astype(np.float64)},
                         schema={ITEM: pl.String, NEIGHBOUR: pl.String, SCORE: pl.Float64})
    frame = frame.filter((pl.col(ITEM) != pl.col(NEIGHBOUR)) & (pl.col(SCORE) > 0))
    return frame.filter(pl.int_range(pl.len()).over(ITEM) < n)


def _with_new_items(neighbours: pl.DataFrame, known: pl.Series, ids: pl.Series,
                    matrix: np.ndarray, new_ids: pl.Series, new_matrix: np.ndarray, n: int
                    ) -> pl.DataFrame:
    """The session model's neighbours plus each new item's nearest known items."""
    rows = _rows_of(ids, known.to_numpy())
    rows = rows[rows >= 0]
    if new_ids.len() == 0 or rows.size == 0:
        return neighbours
    scale = neighbours.group_by(ITEM).agg(pl.col(SCORE).max())[SCORE].median() or 1.0
    index, cosine = nearest(new_matrix, matrix[rows], n)
    added = pl.DataFrame({ITEM: np.repeat(new_ids.to_numpy(), index.shape[1]),
                          NEIGHBOUR: ids.to_numpy()[rows][index.ravel()],
                          SCORE: cosine.ravel().astype(np.float64) * float(scale)},
                         schema={ITEM: pl.String, NEIGHBOUR: pl.String, SCORE: pl.Float64})
    return pl.concat([neighbours.select(ITEM, NEIGHBOUR, SCORE),
                      added.filter(pl.col(SCORE) > 0)])


def read_catalogue_part(folder: Path) -> tuple[set[str], pl.DataFrame | None]:
    """A bundle's unavailable items and new-item links (empty and None without an update)."""
    part = Path(folder) / FOLDER
    unavailable = (set(pl.read_parquet(part / UNAVAILABLE)[ITEM].to_list())
                   if (part / UNAVAILABLE).is_file() else set())
    links = pl.read_parquet(part / LINKS) if (part / LINKS).is_file() else None
    return unavailable, links

