"""The sequential transformer as an estimator: fit, recommend, score, save and load.

:class:`SequentialTransformer` trains the SASRec-style network of :mod:`models.sasrec` (its
hyper-parameters: :class:`~models.sasrec.TransformerConfig`) on canonical events with the loop of
:mod:`models.transformer_training`, and answers ``recommend`` / ``recommend_session`` /
``score`` / ``user_state`` with pandas DataFrames, like the other families' estimators.

Given the catalogue's item text vectors (:func:`models.item_text.encode_items`), it ranks the
catalogue items without events too: they follow the event items in its vocabulary and are
represented by the projection of their text (and their attributes).

With ``ann_min_items`` set and a catalogue at least that large, ``recommend`` takes each user's
top-K from an HNSW graph over the item table (:class:`models.ann.Graph`, built once and saved
with the model) instead of scoring every item: approximate, and far cheaper per user on a
catalogue of hundreds of thousands of items.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import torch

from models import seqdata, transformer_training
from models.ann import Graph
from models.columns import EVENT_TYPES, ITEM, RANK, SCORE, USER
from models.errors import ConfigError, DataError, ShoprankError, require_columns
from models.item_text import VECTOR
from models.sasrec import SASRec, TransformerConfig

__all__ = ["SASRec", "SequentialTransformer", "TransformerConfig"]

logger = logging.getLogger(__name__)

SESSION_GAPS = (86_400.0, 60.0)
# Floats in one (users x catalogue) block of scores: 256 MiB, whatever the catalogue's size.
GRAPH_FILE = "item_graph.faiss"  # the HNSW graph of the item table, with ann_min_items
GRAPH_EF_CONSTRUCTION = 200
"""Candidates kept while an item is linked into the graph (faiss's efConstruction). The item
table of a trained transformer is harder to search than text vectors: on 500,000 items its
recall@200 against exact lists was 0.975 with the content graph's 80 and 0.993 with 200, at
4 x n candidates per search, for a build of 130 s instead of 67
(``benchmarks/transformer_graph.py``, BENCHMARKS.md)."""
GRAPH_EF_PER_RESULT = 4
"""Candidates a search keeps per wanted item (efSearch / n): 1.4 s per 1,000 users against 6.5
for every item scored, at 500,000 items."""
SCORE_BLOCK = 1 << 26
"""Seconds assumed before a live session's first item and between its items."""


class NotFittedError(ShoprankError):
    """The estimator was used before ``fit`` or ``load``."""


class SequentialTransformer:
    """Sequential recommender: trains :class:`SASRec` on canonical events (pandas or polars).

    Args:
        config: Hyper-parameters (defaults when None).

    Attributes:
        history_: One dict of metrics per epoch (``epoch, loss, epoch_s, samples_per_s`` and,
            in a validated epoch, the validation's metrics: ``recall@10, ndcg@10`` of
            ``valid_targets``, or those of ``validate``).
        best_epoch_: Epoch whose weights were kept (best validation ``monitor``, else the last).
    """

    def __init__(self, config: TransformerConfig | None = None) -> None:
        self.config = config if config is not None else TransformerConfig()

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        events: Any,
        valid_targets: Any = None,
        items: Any = None,
        on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
        validate: Callable[[SequentialTransformer], dict[str, float]] | None = None,
        monitor: str = "ndcg@10",
        item_vectors: Any = None,
    ) -> Self:
        """Train on canonical events.

        Args:
            events: ``user_id, item_id, event_type, timestamp``.
            valid_targets: ``user_id, item_id``, one held-out next item per user, for the
                per-epoch validation metrics and early stopping: Recall@10 and NDCG@10 of the
                full catalogue, seen items filtered.
            items: Catalogue (``item_id``; optional ``category_id``, ``attributes``): its
                attributes feed the item features. Only items of ``events`` are ranked, unless
                ``item_vectors`` are given.
            on_epoch: Called as ``on_epoch(epoch, metrics)`` after every epoch; returning True
                stops training (e.g. an Optuna pruner).
            validate: Instead of ``valid_targets``, your validation: ``validate(self)`` returns
                the metrics of the current weights (e.g. under a run's evaluation protocol),
                called every ``eval_every`` epochs for ``history_``, ``on_epoch`` and early
                stopping.
            monitor: The validation metric whose best epoch's weights are kept.
            item_vectors: ``item_id, vector`` (pandas or polars; e.g.
                :func:`models.item_text.encode_items`): with ``use_item_text``, each item's
                text vector feeds its representation, and every item with a non-zero vector is
                ranked, events or not.
        """
        if validate is not None and valid_targets is not None:
            raise ConfigError("give valid_targets (the built-in next-item validation) or "
                              "validate (your own), not both.")
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        events = seqdata.as_pandas(events, "events")
        seqdata.check_events(events)
        catalogue = None if items is None else seqdata.as_pandas(items, "items")
        if catalogue is not None:
            require_columns(catalogue.columns, (ITEM,), "items")
        use_text = item_vectors is not None and cfg.use_item_text
        text = text_vectors(item_vectors) if use_text else None
        if text is None:
            self.item_ids_, self.item_text_ = seqdata.item_vocabulary(events), None
        else:
            ids, vectors = text
            self.item_ids_ = seqdata.item_vocabulary(events, ids[np.abs(vectors).sum(1) > 0])
            self.item_text_ = seqdata.item_vector_matrix(ids, vectors, self.item_ids_)
        self.sequences_ = seqdata.build_sequences(events, self.item_ids_, cfg.n_time_buckets)
        self.item_attrs_, self.attribute_names_ = seqdata.item_attribute_matrix(
            catalogue if cfg.use_item_features else None, self.item_ids_
        )
        self.popularity_ = np.bincount(self.sequences_.items, minlength=len(self.item_ids_) + 1)
        self.device_ = transformer_training.resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model_ = self._build_model()
        self.history_: list[dict[str, float]] = []
        validation = (partial(validate, self) if validate is not None
                      else transformer_training.next_item_validation(self, valid_targets))
        transformer_training.train(self, validation, on_epoch, monitor)
        return self

    @property
    def n_event_items_(self) -> int:
        """Items with fitted events: indices ``1..n_event_items_`` (the others follow them)."""
        return int(np.count_nonzero(self.popularity_[1:]))

    def _build_model(self) -> SASRec:
        attrs = torch.from_numpy(self.item_attrs_) if self.item_attrs_.max() > 0 else None
        text = None if self.item_text_ is None else torch.from_numpy(self.item_text_)
        return SASRec(
            self.config, len(self.item_ids_), attrs, text, self.n_event_items_
        ).to(self.device_)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device_)

    def _autocast(self) -> Any:
        cfg = self.config
        enabled = cfg.bf16 if self.device_.type == "cuda" else cfg.cpu_bf16
        return torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------------ scoring
    def _length_chunks(
        self, seqs: seqdata.Sequences, rows: np.ndarray, scored: bool = False
    ) -> list[np.ndarray]:
        """Positions into ``rows`` in length-sorted chunks of ``eval_batch_size``.

        ``scored``: each row is scored against the whole catalogue, so a chunk also keeps its
        ``(B, V)`` scores within ``SCORE_BLOCK`` floats (fewer rows for a large catalogue).
        """
        order = np.argsort(seqs.lengths[rows], kind="stable")
        size = self.config.eval_batch_size
        if scored:
            size = max(1, min(size, SCORE_BLOCK // (len(self.item_ids_) + 1)))
        return [order[s : s + size] for s in range(0, len(order), size)]

    @torch.no_grad()
    def _states(self, seqs: seqdata.Sequences, rows: np.ndarray) -> torch.Tensor:
        """Hidden state after each selected user's last event, ``(B, d)`` float32."""
        self.model_.eval()
        items, types, gaps, lengths = seqdata.padded_tail(seqs, rows, self.config.max_len)
        w = int(lengths.max())
        with self._autocast():
            h = self.model_(
                self._tensor(items[:, :w]), self._tensor(types[:, :w]), self._tensor(gaps[:, :w])
            )  # (B, w, d)
        return h[torch.arange(len(rows), device=self.device_), self._tensor(lengths - 1)].float()

    @torch.no_grad()
    def _masked_scores(
        self, seqs: seqdata.Sequences, rows: np.ndarray, exclude_seen: bool
    ) -> torch.Tensor:
        """Scores of the whole catalogue ``(B, V)``; padding (and seen items) at ``-inf``."""
        table = self.model_.item_table().float()  # (V, d)
        scores = self._states(seqs, rows) @ table.T  # (B, V)
        if self.config.new_item_offset:  # the items without events follow those with events
            scores[:, self.n_event_items_ + 1 :] += self.config.new_item_offset
        scores[:, 0] = -math.inf
        if exclude_seen:
            which, seen = seqdata.seen_pairs(seqs, rows)
            scores[self._tensor(which), self._tensor(seen)] = -math.inf
        return scores

    # ------------------------------------------------------------------ public scoring API
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(
                "this SequentialTransformer is not fitted: call fit(events) or "
                "SequentialTransformer.load(path) before recommending or saving."
            )

    def _history(self, history: Any) -> seqdata.Sequences:
        """Return the fitted sequences, or those of ``history`` encoded with the fitted items."""
        if history is None:
            return self.sequences_
        events = seqdata.as_pandas(history, "history")
        seqdata.check_events(events)
        return seqdata.build_sequences(events, self.item_ids_, self.config.n_time_buckets)

    def recommend(
        self, users: Any, k: int = 10, exclude_seen: bool = True, history: Any = None,
        exact: bool = False,
    ) -> pd.DataFrame:
        """Top-``k`` items of the full catalogue per user.

        Args:
            users: User ids (duplicates are answered once).
            k: List length.
            exclude_seen: Never return items of the user's (fitted or given) history.
            history: Events that represent the users instead of the fitted ones (e.g. the
                training events plus the validation items), without refitting.
            exact: Score the whole catalogue even where ``config.ann_min_items`` would take
                the lists from the item graph (validation while training, whose weights change
                every epoch).

        Returns:
            ``user_id, item_id, score, rank`` (rank 1 is best) in the order of ``users``. Users
            without a known item in their history get the most popular items (score = the
            item's share of the fitted events).
        """
        self._check_fitted()
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ConfigError(f"k must be a positive integer; got {k!r}.")
        users = seqdata.as_id_series(users).drop_duplicates().reset_index(drop=True)
        seqs = self._history(history)
        rows = seqs.rows(users)
        known = np.flatnonzero(rows >= 0)
        parts = [self._popular(np.flatnonzero(rows < 0), k)]
        graph = None if exact else self._item_graph()
        for chunk in self._length_chunks(seqs, rows[known], scored=graph is None):
            if graph is not None:
                parts.append(self._graph_top(graph, seqs, rows[known[chunk]], known[chunk], k,
                                             exclude_seen))
                continue
            scores = self._masked_scores(seqs, rows[known[chunk]], exclude_seen)
            top = torch.topk(scores, min(int(k), scores.shape[1]), dim=1)
            values, index = top.values.cpu().numpy(), top.indices.cpu().numpy()
            real = np.isfinite(values)
            parts.append((np.repeat(known[chunk], real.sum(1)), index[real], values[real]))
        position, item, score = (np.concatenate(p) for p in zip(*parts, strict=True))
        frame = pd.DataFrame(
            {"p": position, ITEM: self.item_ids_[item - 1], SCORE: score.astype(np.float64)}
        )
        frame = frame.sort_values(["p", SCORE], ascending=[True, False], kind="stable")
        frame[RANK] = frame.groupby("p").cumcount().astype(np.int64) + 1
        frame.insert(0, USER, users.to_numpy()[frame["p"].to_numpy()])
        return frame.drop(columns="p").reset_index(drop=True)

    def recommend_session(
        self, users: list[str], sessions: list[list[str]], k: int = 10, exclude_seen: bool = True
    ) -> pd.DataFrame:
        """Top-``k`` of known users whose live session extends their fitted sequence.

        Each session's known items (newest last) are appended to the user's events as views,
        the first :data:`SESSION_GAPS` ``[0]`` seconds after the user's last fitted event and the
        next ones ``[1]`` apart (a live session carries no times); the model reads the whole
        sequence again. Users it does not know, and sessions without a known item, are left out
        of the answer (the caller falls back).

        Returns:
            ``user_id, item_id, score, rank`` like :meth:`recommend`.
        """
        self._check_fitted()
        seqs, index = self.sequences_, pd.Index(self.item_ids_)
        rows = seqs.rows(pd.Series(users, dtype=str))
        buckets = [min(2 + int(math.log2(1.0 + g)), self.config.n_time_buckets - 1)
                   for g in SESSION_GAPS]
        view = EVENT_TYPES.index("view") + 1
        parts: list[tuple[np.ndarray, ...]] = []
        kept = []
        for position, (row, session) in enumerate(zip(rows, sessions, strict=True)):
            extra = index.get_indexer(list(session))
            extra = extra[extra >= 0] + 1
            if row < 0 or not len(extra):
                continue
            span = slice(seqs.offsets[row], seqs.offsets[row + 1])
            gaps = np.full(len(extra), buckets[1], dtype=seqs.gaps.dtype)
            gaps[0] = buckets[0]
            parts.append((np.concatenate([seqs.items[span], extra]),
                          np.concatenate([seqs.types[span], np.full(len(extra), view)]),
                          np.concatenate([seqs.gaps[span], gaps])))
            kept.append(position)
        if not kept:
            return pd.DataFrame({USER: [], ITEM: [], SCORE: [], RANK: []})
        lengths = [len(items) for items, _, _ in parts]
        extended = seqdata.Sequences(
            users=np.asarray(users, dtype=str)[kept],
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(seqs.offsets.dtype),
            items=np.concatenate([p[0] for p in parts]).astype(seqs.items.dtype),
            types=np.concatenate([p[1] for p in parts]).astype(seqs.types.dtype),
            gaps=np.concatenate([p[2] for p in parts]).astype(seqs.gaps.dtype))
        scores = self._masked_scores(extended, np.arange(len(kept)), exclude_seen)
        top = torch.topk(scores, min(int(k), scores.shape[1]), dim=1)
        values, items = top.values.float().cpu().numpy(), top.indices.cpu().numpy()
        real = np.isfinite(values)
        return pd.DataFrame({
            USER: np.repeat(extended.users, real.sum(1)),
            ITEM: self.item_ids_[items[real] - 1],
            SCORE: values[real].astype(np.float64),
            RANK: (np.cumsum(real, axis=1)[real]).astype(np.int64),
        })

    def _item_graph(self) -> Graph | None:
        """The HNSW graph of the scored item table, or None below ``config.ann_min_items``.

        The table's rows are the items' vectors, one column added: ``new_item_offset`` for the
        items without events, 0 for the others; a query is the user's state and 1, so the
        graph's inner product is the score :meth:`_masked_scores` gives. Built once per offset.
        """
        minimum = self.config.ann_min_items
        if not minimum or len(self.item_ids_) < minimum:
            return None
        offset = float(self.config.new_item_offset)
        if getattr(self, "graph_key_", None) != (offset, self._weights_version()):
            self.graph_ = Graph(self._graph_base(), ef_construction=GRAPH_EF_CONSTRUCTION,
                                ef_per_result=GRAPH_EF_PER_RESULT)
            self.graph_key_ = (offset, self._weights_version())
        return self.graph_

    @property
    def graph_offset_(self) -> float:
        """The new-item offset the current item graph was built with."""
        return self.graph_key_[0]

    def _weights_version(self) -> tuple[int, ...]:
        """A key that changes whenever a weight changes in place (a training step).

        So a graph of older weights is never used.
        """
        return tuple(weight._version for weight in self.model_.parameters())

    @torch.no_grad()
    def _graph_base(self) -> np.ndarray:
        """The rows of the item graph, ``(n_items, d + 2)``, all of one norm.

        Each item's vector (no padding row), its offset column, and a last column that brings
        every row to the largest row's norm: a query ``(state, 1, 0)`` then has the item's
        score as inner product, and on rows of one norm the inner product orders as the cosine,
        which an HNSW graph searches well (on the raw rows, whose norms differ, it finds half
        of the best 200 items of a 500,000-item table; ``benchmarks/transformer_graph.py``).
        """
        table = self.model_.item_table()[1:].float().cpu().numpy()
        offsets = np.zeros((len(table), 1), dtype=np.float32)
        offsets[self.n_event_items_:] = self.config.new_item_offset
        rows = np.hstack([table, offsets]).astype(np.float64)
        squares = (rows**2).sum(axis=1, keepdims=True)
        lift = np.sqrt(np.maximum(squares.max() - squares, 0.0))
        return np.hstack([rows, lift]).astype(np.float32)

    def _graph_top(self, graph: Graph, seqs: seqdata.Sequences, rows: np.ndarray,
                   positions: np.ndarray, k: int, exclude_seen: bool) -> tuple[np.ndarray, ...]:
        """``(positions, item indices, scores)`` of the rows' top ``k`` from the graph.

        The graph is asked for ``k`` plus the most distinct seen items of a row, so that ``k``
        remain once the seen ones are removed.
        """
        states = self._states(seqs, rows).cpu().numpy()
        queries = np.hstack([states, np.ones((len(rows), 1), dtype=np.float32),
                             np.zeros((len(rows), 1), dtype=np.float32)])
        width = np.int64(len(self.item_ids_) + 1)
        seen = np.empty(0, dtype=np.int64)
        if exclude_seen:
            which, items = seqdata.seen_pairs(seqs, rows)
            seen = np.unique(which.astype(np.int64) * width + items)
        extra = int(np.bincount(seen // width).max()) if len(seen) else 0
        found, scores = graph.search(queries, k + extra)
        items = found + 1  # the graph's rows are the items without the padding row
        if len(seen):
            keys = np.arange(len(rows), dtype=np.int64)[:, None] * width + items
            scores = np.where(np.isin(keys, seen), -np.inf, scores)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        values = np.take_along_axis(scores, order, axis=1)
        items = np.take_along_axis(items, order, axis=1)
        real = np.isfinite(values)
        return np.repeat(positions, real.sum(1)), items[real], values[real]

    def _popular(self, positions: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """Fallback lists: the ``k`` most popular fitted items for each of ``positions``."""
        order = np.argsort(-self.popularity_[1:], kind="stable")[: min(k, self.n_event_items_)] + 1
        share = self.popularity_[order] / max(int(self.popularity_.sum()), 1)
        n = len(positions)
        return np.repeat(positions, len(order)), np.tile(order, n), np.tile(share, n)

    def user_state(self, users: Any, history: Any = None) -> np.ndarray:
        """Hidden state after each user's last event, ``(len(users), d)`` float32.

        Scoring items is the dot product with :meth:`item_vectors`. Users without a known item
        in their history get a row of NaN.
        """
        self._check_fitted()
        users = seqdata.as_id_series(users)
        seqs = self._history(history)
        rows = seqs.rows(users)
        out = np.full((len(users), self.config.hidden_size), np.nan, dtype=np.float32)
        known = np.flatnonzero(rows >= 0)
        for chunk in self._length_chunks(seqs, rows[known]):
            out[known[chunk]] = self._states(seqs, rows[known[chunk]]).cpu().numpy()
        return out

    @torch.no_grad()
    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(item_ids, vectors)``: the item table used for scoring, ``(n_items, d)`` float32."""
        self._check_fitted()
        return self.item_ids_, self.model_.item_table()[1:].float().cpu().numpy()

    def score(self, users: Any, candidates: Any, history: Any = None) -> pd.DataFrame:
        """Score given ``(user_id, item_id)`` pairs (the ranker role).

        Args:
            users: Users whose candidate rows are scored (None: every user in ``candidates``).
            candidates: ``user_id, item_id`` pairs (extra columns are kept).
            history: Events that represent the users instead of the fitted ones.

        Returns:
            ``candidates`` (rows of ``users``) with a ``score`` column; NaN for users without
            a known history item and for items outside the fitted catalogue.
        """
        self._check_fitted()
        frame = seqdata.as_pandas(candidates, "candidates")
        require_columns(frame.columns, (USER, ITEM), "candidates")
        if users is not None:
            frame = frame[frame[USER].astype(str).isin(set(seqdata.as_id_series(users)))]
        user_ids = frame[USER].astype(str)
        distinct = pd.Index(user_ids.unique())
        states = self.user_state(pd.Series(distinct), history)  # (U, d)
        item_index = pd.Index(self.item_ids_).get_indexer(frame[ITEM].astype(str))  # -1: unknown
        _, vectors = self.item_vectors()
        values = np.einsum(
            "nd,nd->n", states[distinct.get_indexer(user_ids)], vectors[np.maximum(item_index, 0)]
        ).astype(np.float64)
        values[item_index >= self.n_event_items_] += self.config.new_item_offset
        values[item_index < 0] = np.nan
        return frame.assign(**{SCORE: values}).reset_index(drop=True)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write config, history, weights, id mappings, sequences and item text to a folder.

        The item text vectors are written when the model was fitted with them.
        """
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": 1,
            "config": asdict(self.config),
            "history": self.history_,
            "best_epoch": self.best_epoch_,
        }
        (path / "config.json").write_text(json.dumps(meta, indent=2))
        torch.save(self.model_.state_dict(), path / "model.pt")
        seqs = self.sequences_
        text = {} if self.item_text_ is None else {"item_text": self.item_text_}
        np.savez_compressed(
            path / "state.npz",
            item_ids=self.item_ids_,
            attribute_names=self.attribute_names_,
            item_attrs=self.item_attrs_,
            popularity=self.popularity_,
            users=seqs.users,
            offsets=seqs.offsets,
            items=seqs.items,
            types=seqs.types,
            gaps=seqs.gaps,
            **text,
        )
        graph = self._item_graph()  # built here once, not by every process that loads it
        (path / GRAPH_FILE).unlink(missing_ok=True)
        if graph is not None:
            graph.save(path / GRAPH_FILE)
            meta["graph_offset"] = self.graph_offset_
            (path / "config.json").write_text(json.dumps(meta, indent=2))
        logger.info("saved SequentialTransformer to %s", path)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a model written by :meth:`save`; it scores exactly as the saved one."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise DataError(
                f"{path} is not a saved SequentialTransformer: config.json is "
                "missing. Give the folder that SequentialTransformer.save() wrote."
            )
        meta = json.loads((path / "config.json").read_text())
        model = cls(TransformerConfig.from_dict(meta["config"]))
        with np.load(path / "state.npz", allow_pickle=False) as state:
            arrays = {name: state[name] for name in state.files}
        model.item_ids_, model.attribute_names_ = arrays["item_ids"], arrays["attribute_names"]
        model.item_attrs_, model.popularity_ = arrays["item_attrs"], arrays["popularity"]
        model.item_text_ = arrays.get("item_text")  # absent: fitted without text vectors
        model.sequences_ = seqdata.Sequences(
            *(arrays[n] for n in ("users", "offsets", "items", "types", "gaps"))
        )
        model.history_, model.best_epoch_ = meta["history"], meta["best_epoch"]
        model.device_ = transformer_training.resolve_device(model.config.device)
        model.model_ = model._build_model()
        weights = torch.load(path / "model.pt", map_location=model.device_, weights_only=True)
        model.model_.load_state_dict(weights)
        model.model_.eval()
        if (path / GRAPH_FILE).is_file() and meta.get("graph_offset") == float(
                model.config.new_item_offset):
            model.graph_ = Graph.load(path / GRAPH_FILE, model._graph_base(),
                                      GRAPH_EF_PER_RESULT)
            model.graph_key_ = (meta["graph_offset"], model._weights_version())
        return model


def text_vectors(frame: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(item ids (N,), float32 vectors (N, D))`` of an ``item_id, vector`` frame.

    Raises:
        DataError: Not a pandas or polars frame, ids repeat, or vectors are ragged or not finite.
    """
    frame = seqdata.as_pandas(frame, "item_vectors") if not hasattr(frame, "columns") else frame
    require_columns(frame.columns, (ITEM, VECTOR), "item_vectors")
    ids = seqdata.as_id_series(frame[ITEM]).to_numpy(dtype=str)
    values = frame[VECTOR].to_numpy()  # polars Array: (N, D); pandas or polars List: objects
    try:
        vectors = np.asarray(np.stack(values) if values.dtype == object else values, np.float32)
    except ValueError as err:
        raise DataError("item_vectors must hold vectors of one length.") from err
    if vectors.ndim != 2 or len(vectors) != len(ids) or not np.isfinite(vectors).all():
        raise DataError("item_vectors must hold one finite vector of one length per item_id.")
    if len(np.unique(ids)) != len(ids):
        raise DataError("item_vectors has repeated item_id values: give one vector per item.")
    return ids, vectors
