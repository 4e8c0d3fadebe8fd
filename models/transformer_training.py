"""Training and validating the sequential transformer: what ``SequentialTransformer.fit`` runs.

:func:`train` runs the epochs: length-sorted batches of each user's last ``max_len + 1`` events
(:func:`train_epoch`), the next-item loss at every position (full softmax, or sampled softmax
with uniform or popularity negatives and the logQ correction: :func:`next_item_loss`), AdamW,
and after every ``eval_every`` epochs a validation; the weights of the epoch with the best value of
the monitored metric are kept (:class:`EarlyStopping`). The validation is the caller's (for
example the run's evaluation protocol and metrics), else the full-catalogue Recall@10 / NDCG@10
of held-out next items with seen items filtered (:func:`next_item_validation`).
Every function takes the estimator whose network and fitted sequences it trains.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from models import losses, seqdata
from models.columns import ITEM, USER
from models.errors import ConfigError, DataError, require_columns
from models.sasrec import TransformerConfig

if TYPE_CHECKING:
    from models.transformer import SequentialTransformer

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """The torch device of a ``device`` setting (``auto``: CUDA when torch sees one)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device='cuda' was asked for but torch sees no CUDA device; "
            "use device='auto' or 'cpu', or install a CUDA build of torch."
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def adamw(model: nn.Module, cfg: TransformerConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and embeddings, none on biases and layer norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


@dataclass
class EarlyStopping:
    """Keeps the weights of the best validation ``metric``; says when patience runs out."""

    patience: int
    metric: str = "ndcg@10"
    best: float = -math.inf
    best_epoch: int = 0
    waited: int = 0
    state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> bool:
        """Record an epoch's metrics; True when ``patience`` evaluations brought no gain."""
        if self.metric not in metrics:  # an epoch without validation
            return False
        if metrics[self.metric] > self.best:
            self.best, self.best_epoch, self.waited = metrics[self.metric], epoch, 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.waited += 1
        return self.waited >= self.patience


def train(
    est: SequentialTransformer,
    validate: Callable[[], dict[str, float]] | None,
    on_epoch: Callable[[int, dict[str, float]], bool] | None,
    monitor: str = "ndcg@10",
) -> None:
    """Train ``est.model_`` for up to ``epochs`` epochs; keep the best validated weights.

    ``validate()``: the validation metrics of the current weights, every ``eval_every`` epochs
    (None: no validation, the last epoch's weights); ``monitor``: the one whose best epoch is
    kept; ``on_epoch(epoch, metrics)`` returning True stops early (an Optuna pruner).
    """
    cfg, model = est.config, est.model_
    data = training_tensors(est)
    forward = torch.compile(model, dynamic=True) if cfg.compile else model
    optimizer = adamw(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator(device=est.device_)
    generator.manual_seed(cfg.seed)
    sampler = negative_sampler(est, generator)
    stopper = EarlyStopping(cfg.patience, monitor)
    for epoch in range(1, cfg.epochs + 1):
        trained = train_epoch(est, forward, optimizer, data, rng, sampler)
        metrics = {"epoch": epoch, **trained}
        if validate is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            metrics.update(validated(validate, monitor))
        est.history_.append(metrics)
        shown = [k for k in metrics if k in trained or k == monitor]
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {metrics[k]:.4g}" for k in shown))
        stop = stopper.update(epoch, metrics, model)
        if (on_epoch is not None and on_epoch(epoch, metrics)) or stop:
            break
    if stopper.state is not None:
        model.load_state_dict(stopper.state)
    est.best_epoch_ = stopper.best_epoch or len(est.history_)
    model.eval()


def train_epoch(
    est: SequentialTransformer,
    forward: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    data: dict[str, Any],
    rng: np.random.Generator,
    sampler: Callable[[], tuple[torch.Tensor, ...]],
) -> dict[str, float]:
    """One pass over the training windows in length-sorted batches; no host sync inside."""
    cfg, start = est.config, time.perf_counter()
    plan = seqdata.epoch_plan(data["lengths"], cfg.batch_size, rng, cfg.sort_chunk)
    rows, flat = est._tensor(plan.rows), est._tensor(plan.targets)
    est.model_.train()
    total = torch.zeros((), device=est.device_)
    for b in range(len(plan)):
        r = rows[plan.row_bounds[b] : plan.row_bounds[b + 1]]  # (B,)
        f = flat[plan.target_bounds[b] : plan.target_bounds[b + 1]]  # (N,)
        w = int(plan.widths[b])
        with est._autocast():
            # The full softmax needs every item with events (the only possible targets);
            # sampled softmax embeds only what it uses.
            table = (est.model_.item_table(est.n_event_items_) if cfg.loss == "softmax"
                     else None)  # (V, d)
            h = forward(
                data["items"][r, :w], data["types"][r, :w], data["gaps"][r, :w], table
            )  # (B, w, d)
            h = h.reshape(-1, h.shape[-1])[f]  # (N, d)
            loss = next_item_loss(est, h, data["targets"][r, :w].reshape(-1)[f], table, sampler)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    mean_loss = float(total) / max(len(plan), 1)  # the one host sync of the epoch
    seconds = time.perf_counter() - start
    return {
        "loss": mean_loss,
        "epoch_s": seconds,
        "samples_per_s": len(plan.rows) / seconds,
        "positions_per_s": len(plan.targets) / seconds,
    }


def validated(validate: Callable[[], dict[str, float]], monitor: str) -> dict[str, float]:
    """The metrics of ``validate()``, which must include ``monitor`` (else ConfigError)."""
    metrics = validate()
    if monitor not in metrics:
        raise ConfigError(
            f"early stopping monitors {monitor!r}, which the validation does not compute; "
            f"choose one of {', '.join(sorted(metrics))}."
        )
    return metrics


def training_tensors(est: SequentialTransformer) -> dict[str, Any]:
    """Windows of ``max_len + 1`` events: inputs are the first ``max_len``, targets shifted."""
    seqs = est.sequences_
    rows = np.flatnonzero(seqs.lengths >= 2)
    if len(rows) == 0:
        raise DataError(
            "no user has two or more events, so there is no next item to learn; "
            "give events with sequences of at least two events per user."
        )
    items, types, gaps, lengths = seqdata.padded_tail(seqs, rows, est.config.max_len + 1)
    return {
        "items": est._tensor(items[:, :-1]),
        "types": est._tensor(types[:, :-1]),
        "gaps": est._tensor(gaps[:, :-1]),
        "targets": est._tensor(items[:, 1:]),
        "lengths": lengths - 1,
    }


def negative_sampler(est: SequentialTransformer, generator: torch.Generator
                     ) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Draws of ``n_negatives`` items and their log-probabilities (uniform or by popularity).

    Only items with events are drawn: an item known only by its text is never a target in
    training, and drawing it would teach the network to push it down (and, in a catalogue of
    many such items, leave few informative negatives).
    """
    cfg, n_items = est.config, est.n_event_items_
    if cfg.negative_sampler == "popularity":
        counts = est._tensor(est.popularity_[: n_items + 1])
        probs = losses.popularity_probs(counts, cfg.popularity_alpha)
        return lambda: losses.popularity_negatives(probs, cfg.n_negatives, generator)
    return lambda: losses.uniform_negatives(n_items, cfg.n_negatives, generator, est.device_)


def next_item_loss(
    est: SequentialTransformer,
    h: torch.Tensor,
    target: torch.Tensor,
    table: torch.Tensor | None,
    sampler: Callable[[], tuple[torch.Tensor, ...]],
) -> torch.Tensor:
    """Next-item loss of hidden states ``h`` ``(N, d)`` for targets ``(N,)``."""
    cfg, model = est.config, est.model_
    if cfg.loss == "softmax":
        return losses.full_softmax_loss(h, table, target)
    neg_ids, neg_logq = sampler()  # (M,), (M,)
    correction = (
        losses.expected_count_logq(neg_logq, cfg.n_negatives) if cfg.logq_correction else None
    )
    return losses.sampled_softmax_loss(
        h,
        model.embed_items(target),
        model.embed_items(neg_ids),
        None,
        correction,
        pos_ids=target,
        neg_ids=neg_ids,
    )


def next_item_validation(est: SequentialTransformer, valid_targets: Any
                         ) -> Callable[[], dict[str, float]] | None:
    """The built-in validation: Recall@10 / NDCG@10 of held-out next items (None without)."""
    cases = validation_cases(est, valid_targets)
    return None if cases is None else lambda: evaluate(est, *cases)


def validation_cases(est: SequentialTransformer, valid_targets: Any
                     ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Fitted-history rows and target indices of the validation cases (others are misses)."""
    if valid_targets is None:
        return None
    frame = seqdata.as_pandas(valid_targets, "valid_targets")
    require_columns(frame.columns, (USER, ITEM), "valid_targets")
    rows = est.sequences_.rows(frame[USER])
    targets = pd.Index(est.item_ids_).get_indexer(frame[ITEM].astype(str)) + 1
    keep = (rows >= 0) & (targets > 0)
    return rows[keep], targets[keep], max(len(frame), 1)


@torch.no_grad()
def evaluate(
    est: SequentialTransformer, rows: np.ndarray, targets: np.ndarray, n_cases: int, k: int = 10
) -> dict[str, float]:
    """Recall@k and NDCG@k of held-out next items (seen items filtered, full catalogue)."""
    hits = torch.zeros((), device=est.device_)
    gains = torch.zeros((), device=est.device_)
    for chunk in est._length_chunks(est.sequences_, rows, scored=True):
        scores = est._masked_scores(est.sequences_, rows[chunk], exclude_seen=True)
        target_score = scores.gather(1, est._tensor(targets[chunk])[:, None])  # (B, 1)
        rank = (scores > target_score).sum(1)  # (B,) 0-based
        hit = (rank < k) & torch.isfinite(target_score[:, 0])
        hits += hit.sum()
        gains += (hit / torch.log2(rank + 2.0)).sum()
    return {f"recall@{k}": float(hits) / n_cases, f"ndcg@{k}": float(gains) / n_cases}
