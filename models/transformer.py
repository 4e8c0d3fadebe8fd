"""A SASRec-style sequential transformer: config, model, and the fit/recommend/save/load estimator.

Read top to bottom: :class:`TransformerConfig` (every hyper-parameter), the network
(:class:`CausalSelfAttention`, :class:`Block`, :class:`SASRec`), then :class:`SequentialTransformer`
which trains the network on canonical events and answers ``recommend`` / ``score`` /
``user_state`` with pandas DataFrames.

Each user's most recent events form a right-padded window of ``max_len`` positions. The input at
a position is the sum of the item embedding (plus, optionally, the mean of the item's attribute
embeddings), a learned position embedding, and optionally event-type and time-gap embeddings.
Pre-LN causal self-attention blocks turn it into one hidden state per position; the score of item
``j`` after position ``t`` is the dot product of the hidden state with the same item table that
embeds the inputs. Training predicts the next item at every position (full or sampled softmax).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from models import losses, seqdata
from models.columns import EVENT_TYPES, ITEM, RANK, SCORE, USER
from models.errors import ConfigError, DataError, ShoprankError, require_columns

logger = logging.getLogger(__name__)

LOSSES = ("softmax", "sampled_softmax")
SAMPLERS = ("uniform", "popularity")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TransformerConfig:
    """Hyper-parameters of :class:`SequentialTransformer` (saved with every model).

    Attributes:
        hidden_size: Width ``d`` of embeddings and hidden states.
        n_blocks: Number of transformer blocks.
        n_heads: Attention heads per block (must divide ``hidden_size``).
        ffn_multiplier: Width of each block's feed-forward layer, in multiples of ``d``.
        dropout: Dropout on attention weights and on each residual branch.
        emb_dropout: Dropout on the summed input embeddings.
        max_len: Most recent events a user is represented by.
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay (matrices and embeddings only).
        batch_size: Users per training batch.
        epochs: Maximum number of epochs.
        loss: ``"softmax"`` (full cross-entropy over the catalogue) or ``"sampled_softmax"``.
        n_negatives: Negatives shared by every position of a batch (sampled softmax).
        negative_sampler: ``"uniform"`` or ``"popularity"`` (``(count + 1) ** popularity_alpha``).
        popularity_alpha: Exponent of the popularity sampler.
        logq_correction: Subtract ``log(n_negatives * q)`` from negative logits.
        use_event_type: Add an event-type embedding.
        use_time_gap: Add an embedding of the bucketised log time gap to the previous event.
        n_time_buckets: Number of time-gap buckets (padding and first event included).
        use_item_features: Add the mean of each item's attribute embeddings (category id and
            ``attributes`` of the catalogue given to ``fit``) to its item embedding.
        seed: Seed of weights, dropout, data order and negative sampling.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        compile: Compile the network with ``torch.compile``.
        bf16: bfloat16 autocast on CUDA.
        cpu_bf16: bfloat16 autocast on CPU too (faster on processors with native bf16, such as
            AMD Zen 4 or Intel Sapphire Rapids; slower on others).
        patience: Evaluations without a better validation NDCG@10 before stopping.
        eval_every: Evaluate on the validation targets every this many epochs.
        eval_batch_size: Users scored at once when evaluating or recommending.
        sort_chunk: Batches per length-sorted chunk when batching (1: plain shuffling).
        num_threads: CPU threads for torch (None: leave torch's setting).
    """

    hidden_size: int = 64
    n_blocks: int = 2
    n_heads: int = 2
    ffn_multiplier: int = 1
    dropout: float = 0.3
    emb_dropout: float = 0.3
    max_len: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 200
    loss: str = "sampled_softmax"
    n_negatives: int = 4096
    negative_sampler: str = "uniform"
    popularity_alpha: float = 0.75
    logq_correction: bool = True
    use_event_type: bool = True
    use_time_gap: bool = True
    n_time_buckets: int = 24
    use_item_features: bool = True
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    bf16: bool = True
    cpu_bf16: bool = False
    patience: int = 10
    eval_every: int = 1
    eval_batch_size: int = 1024
    sort_chunk: int = 8
    num_threads: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "loss": (self.loss in LOSSES, f"one of {LOSSES}"),
            "negative_sampler": (self.negative_sampler in SAMPLERS, f"one of {SAMPLERS}"),
            "device": (self.device in DEVICES, f"one of {DEVICES}"),
            "n_heads": (
                self.n_heads > 0 and self.hidden_size % self.n_heads == 0,
                "a positive divisor of hidden_size",
            ),
            "dropout": (0 <= self.dropout < 1 and 0 <= self.emb_dropout < 1, "in [0, 1)"),
            "n_time_buckets": (self.n_time_buckets >= 3, "at least 3"),
        }
        for name in (
            "hidden_size",
            "n_blocks",
            "max_len",
            "batch_size",
            "epochs",
            "n_negatives",
            "patience",
            "eval_every",
            "eval_batch_size",
        ):
            checks[name] = (getattr(self, name) >= 1, "a positive integer")
        bad = [
            f"{name} must be {rule} (got {getattr(self, name)!r})"
            for name, (ok, rule) in checks.items()
            if not ok
        ]
        if bad:
            raise ConfigError("invalid TransformerConfig: " + "; ".join(bad) + ".")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        """Build a config from a dict, naming unknown keys in the error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown TransformerConfig field(s): {', '.join(unknown)}; "
                f"known fields: {', '.join(sorted(known))}."
            )
        return cls(**values)


class Dropout(nn.Module):
    """Dropout; on CPU the mask comes from ``rand_like`` (about twice as fast as bernoulli)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``."""
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        keep = torch.rand_like(x) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees positions ``<= t`` only."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.resid_drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, L, d)`` -> ``(B, L, d)``."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # each (B, L, d)
        q, k, v = (
            t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v)
        )  # each (B, h, L, d/h)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, h, L, d/h)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, d)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + ffn(ln(x))``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(cfg)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_multiplier * d),
            nn.GELU(),
            nn.Linear(cfg.ffn_multiplier * d, d),
            Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, L, d)`` -> ``(B, L, d)``."""
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class SASRec(nn.Module):
    """The network: embeddings, causal blocks, final layer norm; shared item table for scoring.

    Args:
        cfg: Hyper-parameters.
        n_items: Catalogue size (item indices ``1..n_items``; 0 is padding).
        item_attrs: ``(n_items + 1, A)`` attribute indices per item (0 = none), or None.
    """

    def __init__(
        self, cfg: TransformerConfig, n_items: int, item_attrs: torch.Tensor | None
    ) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.type_emb = (
            nn.Embedding(len(EVENT_TYPES) + 1, d, padding_idx=0) if cfg.use_event_type else None
        )
        self.gap_emb = (
            nn.Embedding(cfg.n_time_buckets, d, padding_idx=0) if cfg.use_time_gap else None
        )
        self.attr_emb = None
        if item_attrs is not None and int(item_attrs.max()) > 0:
            self.register_buffer("item_attrs", item_attrs, persistent=False)
            self.attr_emb = nn.EmbeddingBag(
                int(item_attrs.max()) + 1, d, mode="mean", padding_idx=0
            )
        self.drop = Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(d)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding | nn.EmbeddingBag):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def embed_items(self, ids: torch.Tensor) -> torch.Tensor:
        """Item representations of ``ids`` (any shape ``S``) -> ``(*S, d)``.

        The item embedding plus the mean embedding of the item's attributes (when there are any).
        """
        x = self.item_emb(ids)  # (*S, d)
        if self.attr_emb is not None:
            attrs = self.item_attrs[ids.reshape(-1)]  # (prod S, A)
            x = x + self.attr_emb(attrs).view(x.shape)  # mean over non-padding attributes
        return x

    def item_table(self) -> torch.Tensor:
        """All item representations ``(n_items + 1, d)``; row 0 is padding."""
        return self.embed_items(
            torch.arange(self.item_emb.num_embeddings, device=self.item_emb.weight.device)
        )

    def forward(
        self,
        items: torch.Tensor,
        types: torch.Tensor,
        gaps: torch.Tensor,
        table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden state per position.

        Args:
            items: ``(B, L)`` item indices, right-padded with 0.
            types: ``(B, L)`` event type indices.
            gaps: ``(B, L)`` time-gap buckets.
            table: The item table to embed inputs from (when None, only the rows of ``items``
                are computed).

        Returns:
            ``(B, L, d)``; rows at padded positions are meaningless.
        """
        x = self.embed_items(items) if table is None else table[items]  # (B, L, d)
        x = x + self.pos_emb(torch.arange(items.shape[1], device=items.device))[None]
        if self.type_emb is not None:
            x = x + self.type_emb(types)
        if self.gap_emb is not None:
            x = x + self.gap_emb(gaps)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


SESSION_GAPS = (86_400.0, 60.0)
"""Seconds assumed before a live session's first item and between its items."""


class NotFittedError(ShoprankError):
    """The estimator was used before ``fit`` or ``load``."""


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device='cuda' was asked for but torch sees no CUDA device; "
            "use device='auto' or 'cpu', or install a CUDA build of torch."
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _optimizer(model: nn.Module, cfg: TransformerConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and embeddings, none on biases and layer norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


@dataclass
class _EarlyStopping:
    """Keeps the weights of the best validation NDCG@10; says when patience runs out."""

    patience: int
    best: float = -math.inf
    best_epoch: int = 0
    waited: int = 0
    state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> bool:
        """Record an epoch's metrics; True when ``patience`` evaluations brought no gain."""
        if "ndcg@10" not in metrics:
            return False
        if metrics["ndcg@10"] > self.best:
            self.best, self.best_epoch, self.waited = metrics["ndcg@10"], epoch, 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.waited += 1
        return self.waited >= self.patience


class SequentialTransformer:
    """Sequential recommender: trains :class:`SASRec` on canonical events (pandas or polars).

    Args:
        config: Hyper-parameters (defaults when None).

    Attributes:
        history_: One dict of metrics per epoch (``epoch, loss, epoch_s, samples_per_s`` and,
            with validation targets, ``recall@10, ndcg@10``).
        best_epoch_: Epoch whose weights were kept (best validation NDCG@10, else the last).
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
    ) -> Self:
        """Train on canonical events.

        Args:
            events: ``user_id, item_id, event_type, timestamp``.
            valid_targets: ``user_id, item_id``, one held-out next item per user, for the
                per-epoch validation metrics and early stopping (seen items filtered).
            items: Catalogue (``item_id``; optional ``category_id``, ``attributes``): its
                attributes feed the item features. Only items of ``events`` are ranked.
            on_epoch: Called as ``on_epoch(epoch, metrics)`` after every epoch; returning True
                stops training (e.g. an Optuna pruner).
        """
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        events = seqdata.as_pandas(events, "events")
        seqdata.check_events(events)
        catalogue = None if items is None else seqdata.as_pandas(items, "items")
        if catalogue is not None:
            require_columns(catalogue.columns, (ITEM,), "items")
        self.item_ids_ = seqdata.item_vocabulary(events)
        self.sequences_ = seqdata.build_sequences(events, self.item_ids_, cfg.n_time_buckets)
        self.item_attrs_, self.attribute_names_ = seqdata.item_attribute_matrix(
            catalogue if cfg.use_item_features else None, self.item_ids_
        )
        self.popularity_ = np.bincount(self.sequences_.items, minlength=len(self.item_ids_) + 1)
        self.device_ = _resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model_ = self._build_model()
        self.history_: list[dict[str, float]] = []
        self._train(self._validation_cases(valid_targets), on_epoch)
        return self

    def _build_model(self) -> SASRec:
        attrs = torch.from_numpy(self.item_attrs_) if self.item_attrs_.max() > 0 else None
        return SASRec(self.config, len(self.item_ids_), attrs).to(self.device_)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device_)

    def _autocast(self) -> Any:
        cfg = self.config
        enabled = cfg.bf16 if self.device_.type == "cuda" else cfg.cpu_bf16
        return torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=enabled)

    def _training_tensors(self) -> dict[str, Any]:
        """Windows of ``max_len + 1`` events: inputs are the first ``max_len``, targets shifted."""
        seqs = self.sequences_
        rows = np.flatnonzero(seqs.lengths >= 2)
        if len(rows) == 0:
            raise DataError(
                "no user has two or more events, so there is no next item to learn; "
                "give events with sequences of at least two events per user."
            )
        items, types, gaps, lengths = seqdata.padded_tail(seqs, rows, self.config.max_len + 1)
        return {
            "items": self._tensor(items[:, :-1]),
            "types": self._tensor(types[:, :-1]),
            "gaps": self._tensor(gaps[:, :-1]),
            "targets": self._tensor(items[:, 1:]),
            "lengths": lengths - 1,
        }

    def _validation_cases(self, valid_targets: Any) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Fitted-history rows and target indices of the validation cases (others are misses)."""
        if valid_targets is None:
            return None
        frame = seqdata.as_pandas(valid_targets, "valid_targets")
        require_columns(frame.columns, (USER, ITEM), "valid_targets")
        rows = self.sequences_.rows(frame[USER])
        targets = pd.Index(self.item_ids_).get_indexer(frame[ITEM].astype(str)) + 1
        keep = (rows >= 0) & (targets > 0)
        return rows[keep], targets[keep], max(len(frame), 1)

    def _sampler(self, generator: torch.Generator) -> Callable[[], tuple[torch.Tensor, ...]]:
        cfg, n_items = self.config, len(self.item_ids_)
        if cfg.negative_sampler == "popularity":
            probs = losses.popularity_probs(self._tensor(self.popularity_), cfg.popularity_alpha)
            return lambda: losses.popularity_negatives(probs, cfg.n_negatives, generator)
        return lambda: losses.uniform_negatives(n_items, cfg.n_negatives, generator, self.device_)

    def _loss(
        self,
        h: torch.Tensor,
        target: torch.Tensor,
        table: torch.Tensor | None,
        sampler: Callable[[], tuple[torch.Tensor, ...]],
    ) -> torch.Tensor:
        """Next-item loss of hidden states ``h`` ``(N, d)`` for targets ``(N,)``."""
        cfg, model = self.config, self.model_
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

    def _train(
        self,
        valid: tuple[np.ndarray, np.ndarray, int] | None,
        on_epoch: Callable[[int, dict[str, float]], bool] | None,
    ) -> None:
        cfg, model = self.config, self.model_
        data = self._training_tensors()
        forward = torch.compile(model, dynamic=True) if cfg.compile else model
        optimizer = _optimizer(model, cfg)
        rng = np.random.default_rng(cfg.seed)
        generator = torch.Generator(device=self.device_)
        generator.manual_seed(cfg.seed)
        sampler = self._sampler(generator)
        stopper = _EarlyStopping(cfg.patience)
        for epoch in range(1, cfg.epochs + 1):
            metrics = {"epoch": epoch, **self._train_epoch(forward, optimizer, data, rng, sampler)}
            if valid is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                metrics.update(self._evaluate(*valid))
            self.history_.append(metrics)
            logger.info(
                "epoch %d: %s",
                epoch,
                ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"),
            )
            stop = stopper.update(epoch, metrics, model)
            if (on_epoch is not None and on_epoch(epoch, metrics)) or stop:
                break
        if stopper.state is not None:
            model.load_state_dict(stopper.state)
        self.best_epoch_ = stopper.best_epoch or len(self.history_)
        model.eval()

    def _train_epoch(
        self,
        forward: Callable[..., torch.Tensor],
        optimizer: torch.optim.Optimizer,
        data: dict[str, Any],
        rng: np.random.Generator,
        sampler: Callable[[], tuple[torch.Tensor, ...]],
    ) -> dict[str, float]:
        """One pass over the training windows in length-sorted batches; no host sync inside."""
        cfg, start = self.config, time.perf_counter()
        plan = seqdata.epoch_plan(data["lengths"], cfg.batch_size, rng, cfg.sort_chunk)
        rows, flat = self._tensor(plan.rows), self._tensor(plan.targets)
        self.model_.train()
        total = torch.zeros((), device=self.device_)
        for b in range(len(plan)):
            r = rows[plan.row_bounds[b] : plan.row_bounds[b + 1]]  # (B,)
            f = flat[plan.target_bounds[b] : plan.target_bounds[b + 1]]  # (N,)
            w = int(plan.widths[b])
            with self._autocast():
                # The full softmax needs every item; sampled softmax embeds only what it uses.
                table = self.model_.item_table() if cfg.loss == "softmax" else None  # (V, d)
                h = forward(
                    data["items"][r, :w], data["types"][r, :w], data["gaps"][r, :w], table
                )  # (B, w, d)
                h = h.reshape(-1, h.shape[-1])[f]  # (N, d)
                loss = self._loss(h, data["targets"][r, :w].reshape(-1)[f], table, sampler)
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

    # ------------------------------------------------------------------ scoring
    def _length_chunks(self, seqs: seqdata.Sequences, rows: np.ndarray) -> list[np.ndarray]:
        """Positions into ``rows`` in length-sorted chunks of ``eval_batch_size``."""
        order = np.argsort(seqs.lengths[rows], kind="stable")
        size = self.config.eval_batch_size
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
        scores[:, 0] = -math.inf
        if exclude_seen:
            which, seen = seqdata.seen_pairs(seqs, rows)
            scores[self._tensor(which), self._tensor(seen)] = -math.inf
        return scores

    @torch.no_grad()
    def _evaluate(
        self, rows: np.ndarray, targets: np.ndarray, n_cases: int, k: int = 10
    ) -> dict[str, float]:
        """Recall@k and NDCG@k of held-out next items (seen items filtered, full catalogue)."""
        hits = torch.zeros((), device=self.device_)
        gains = torch.zeros((), device=self.device_)
        for chunk in self._length_chunks(self.sequences_, rows):
            scores = self._masked_scores(self.sequences_, rows[chunk], exclude_seen=True)
            target_score = scores.gather(1, self._tensor(targets[chunk])[:, None])  # (B, 1)
            rank = (scores > target_score).sum(1)  # (B,) 0-based
            hit = (rank < k) & torch.isfinite(target_score[:, 0])
            hits += hit.sum()
            gains += (hit / torch.log2(rank + 2.0)).sum()
        return {f"recall@{k}": float(hits) / n_cases, f"ndcg@{k}": float(gains) / n_cases}

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
        self, users: Any, k: int = 10, exclude_seen: bool = True, history: Any = None
    ) -> pd.DataFrame:
        """Top-``k`` items of the full catalogue per user.

        Args:
            users: User ids (duplicates are answered once).
            k: List length.
            exclude_seen: Never return items of the user's (fitted or given) history.
            history: Events that represent the users instead of the fitted ones (e.g. the
                training events plus the validation items), without refitting.

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
        for chunk in self._length_chunks(seqs, rows[known]):
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

    def _popular(self, positions: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """Fallback lists: the ``k`` most popular fitted items for each of ``positions``."""
        order = np.argsort(-self.popularity_[1:], kind="stable")[:k] + 1
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
        values[item_index < 0] = np.nan
        return frame.assign(**{SCORE: values}).reset_index(drop=True)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write config, metrics history, weights, id mappings and fitted sequences to a folder."""
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
        )
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
        model.sequences_ = seqdata.Sequences(
            *(arrays[n] for n in ("users", "offsets", "items", "types", "gaps"))
        )
        model.history_, model.best_epoch_ = meta["history"], meta["best_epoch"]
        model.device_ = _resolve_device(model.config.device)
        model.model_ = model._build_model()
        weights = torch.load(path / "model.pt", map_location=model.device_, weights_only=True)
        model.model_.load_state_dict(weights)
        model.model_.eval()
        return model
