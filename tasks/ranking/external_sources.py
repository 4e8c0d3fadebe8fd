"""External candidate sources of the re-ranker beyond its built-in ones, and how they are kept.

An external source is called with a history and users and proposes ``user_id, item_id, score``
under its name; the pipeline turns each into the features ``rank_<name>`` and ``score_<name>``
(:mod:`tasks.ranking.candidate_sources`). Two exist: the transformer's nearest items (``seq``,
:class:`tasks.transformer.sequence.SequenceSource`) and the catalogue items nearest in text
space to the user's recent items (``content``, :class:`ContentSource`: the one source that can
propose an item with no events), with its nearest items among those nobody has touched yet
(``content_new``). :class:`SourceSet` holds several and saves each in a folder of
its own; :func:`load_source` reads either a set or a single transformer source saved before sets
existed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from models.columns import ITEM, SCORE, USER
from models.content import ContentNeighbours

CONTENT_SOURCE = "content"
NEW_SOURCE = "content_new"
SET_FILE = "sources.json"


class ContentSource:
    """The content model as a candidate source: each user's nearest items in text space.

    It learns nothing from targets (only the item vectors and the history it is called with),
    so the same source serves every training window, the test window and serving.

    Args:
        vectors: ``item_id, vector`` of the catalogue (:func:`models.item_text.encode_items`).
        n: Items proposed per user.
        exclude_seen: Leave out the items of each user's history.
        encoder: The encoder spec that made ``vectors`` (kept in the saved source).
        n_new: Items proposed per user among those without any event in the history it is
            called with (source ``content_new``; 0: none). In the whole catalogue the nearest
            items are mostly ones with events, so new items rarely reach the candidates
            through ``content`` alone.
    """

    name = CONTENT_SOURCE

    def __init__(self, vectors: pl.DataFrame, n: int, exclude_seen: bool, encoder: str,
                 n_new: int = 0) -> None:
        self.vectors, self.n, self.exclude_seen, self.encoder = vectors, n, exclude_seen, encoder
        self.n_new = n_new

    def __call__(self, history: pl.DataFrame, users: Any) -> dict[str, pl.DataFrame]:
        """The content neighbours of each user's latest items in ``history`` (none for others).

        With ``n_new``, also ``content_new``: the nearest items nobody has an event on.
        """
        users = pl.Series(USER, users, dtype=pl.String).unique(maintain_order=True)
        events = history.join(users.to_frame(), on=USER, how="semi")
        names = [self.name, NEW_SOURCE] if self.n_new else [self.name]
        if events.is_empty():
            return dict.fromkeys(names, pl.DataFrame(
                schema={USER: pl.String, ITEM: pl.String, SCORE: pl.Float64}))
        model = ContentNeighbours().with_vectors(self.vectors).fit(events)
        recs = model.recommend(users, k=self.n, exclude_seen=self.exclude_seen)
        out = {self.name: recs.filter(pl.col(SCORE) > 0).select(USER, ITEM, SCORE)}
        if self.n_new:
            untouched = self.vectors[ITEM].filter(
                ~self.vectors[ITEM].is_in(history[ITEM].unique().implode()))
            new = model.among(untouched).recommend(users, k=self.n_new, exclude_seen=False)
            out[NEW_SOURCE] = new.filter(pl.col(SCORE) > 0).select(USER, ITEM, SCORE)
        return out

    def save(self, path: Path) -> None:
        """The vectors and the settings into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vectors.write_parquet(path / "vectors.parquet")
        (path / "source.json").write_text(json.dumps(
            {"n": self.n, "exclude_seen": self.exclude_seen, "encoder": self.encoder,
             "n_new": self.n_new}))

    @classmethod
    def load(cls, path: Path) -> ContentSource:
        """Read a source written by :meth:`save`."""
        meta = json.loads((Path(path) / "source.json").read_text())
        return cls(pl.read_parquet(Path(path) / "vectors.parquet"), meta["n"],
                   meta["exclude_seen"], meta["encoder"], meta.get("n_new", 0))


class SourceSet:
    """Several external sources called as one: their proposals under their own names."""

    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources

    def __call__(self, history: pl.DataFrame, users: Any) -> dict[str, pl.DataFrame]:
        """Every source's ``user_id, item_id, score`` for ``users`` given ``history``."""
        proposed: dict[str, pl.DataFrame] = {}
        for source in self.sources:
            proposed.update(source(history, users))
        return proposed

    def save(self, path: Path) -> None:
        """Each source in ``path/<name>/`` and the list in ``sources.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for source in self.sources:
            source.save(path / source.name)
        (path / SET_FILE).write_text(json.dumps({"sources": [s.name for s in self.sources]}))


def load_source(path: Path) -> Any:
    """The source saved in ``path``: a :class:`SourceSet`, or one transformer source."""
    from tasks.transformer.sequence import SOURCE_NAME, SequenceSource

    path = Path(path)
    if not (path / SET_FILE).is_file():  # a pipeline saved with the transformer's alone
        return SequenceSource.load(path)
    kinds = {SOURCE_NAME: SequenceSource, CONTENT_SOURCE: ContentSource}
    names = json.loads((path / SET_FILE).read_text())["sources"]
    return SourceSet([kinds[name].load(path / name) for name in names])


def content_vectors(source: Any) -> pl.DataFrame | None:
    """The item vectors of the :class:`ContentSource` that is or is in ``source``, else None.

    The re-ranker computes its text-similarity features from them (:mod:`tasks.ranking.features`),
    so a pipeline fed by the content source also scores every candidate by its text.
    """
    if isinstance(source, ContentSource):
        return source.vectors
    if isinstance(source, SourceSet):
        return next((s.vectors for s in source.sources if isinstance(s, ContentSource)), None)
    return None


def combined(*sources: Any) -> Any:
    """The given sources (None left out) as one: None, a set, or the transformer's alone.

    The transformer's source alone keeps the layout pipelines had before sets existed.
    """
    from tasks.transformer.sequence import SOURCE_NAME

    present = [s for s in sources if s is not None]
    if not present:
        return None
    if len(present) == 1 and present[0].name == SOURCE_NAME:
        return present[0]
    return SourceSet(present)
