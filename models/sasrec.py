"""The network of the sequential transformer: its hyper-parameters and a SASRec-style model.

Read top to bottom: :class:`TransformerConfig` (every hyper-parameter), then the network
(:class:`CausalSelfAttention`, :class:`Block`, :class:`SASRec`). Training it is
:mod:`models.transformer_training`; the estimator that fits, recommends, saves and loads it is
:class:`models.transformer.SequentialTransformer`.

Each user's most recent events form a right-padded window of ``max_len`` positions. The input at
a position is the sum of the item representation, a learned position embedding, and optionally
event-type and time-gap embeddings. An item is represented by its id embedding plus, optionally,
the mean of its attribute embeddings and a learned projection of its catalogue text vector; an
item known only from the catalogue (no events) has no id embedding and is represented by its
text and attributes alone, which item-id dropout teaches the network to read; a fixed offset
(``new_item_offset``) moves such items up or down the lists.
Pre-LN causal self-attention blocks turn it into one hidden state per position; the score of item
``j`` after position ``t`` is the dot product of the hidden state with the same item table that
embeds the inputs. Training predicts the next item at every position (full or sampled softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.columns import EVENT_TYPES
from models.errors import ConfigError

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
        use_item_text: When ``fit`` is given item text vectors, add their learned projection to
            each item's embedding and rank the catalogue items without events too.
        item_id_dropout: With item text, the probability that training replaces an item's id
            embedding by zero (per occurrence, in inputs, targets and negatives), so that the
            text stands in for the id of an item without events.
        new_item_offset: Added to the score of every item without events in the fitted history
            (ranked by its text and attributes only): how far such items are moved up (above
            0) or down the lists. Chosen on validation by the transformer's study (see
            ``tasks.transformer.sequence.choose_new_item_offset``); 0 leaves scores as trained.
        seed: Seed of weights, dropout, data order and negative sampling.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        compile: Compile the network with ``torch.compile``.
        bf16: bfloat16 autocast on CUDA.
        cpu_bf16: bfloat16 autocast on CPU too (faster on processors with native bf16, such as
            AMD Zen 4 or Intel Sapphire Rapids; slower on others).
        patience: Evaluations without a better validation value of the monitored metric (the
            run's primary metric under its protocol, else next-item NDCG@10) before stopping.
        eval_every: Evaluate on the validation targets every this many epochs.
        eval_batch_size: Users scored at once when evaluating or recommending (fewer when
            the catalogue is large: one block of scores stays within 256 MiB).
        sort_chunk: Batches per length-sorted chunk when batching (1: plain shuffling).
        ann_min_items: From this many items on, ``recommend`` takes each user's top-K from an
            HNSW graph over the item table (:mod:`models.ann`; the graph is saved with the
            model) instead of scoring the whole catalogue; 0: always the whole catalogue.
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
    use_item_text: bool = True
    item_id_dropout: float = 0.25
    new_item_offset: float = 0.0
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
    ann_min_items: int = 0

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
            "item_id_dropout": (0 <= self.item_id_dropout < 1, "in [0, 1)"),
            "new_item_offset": (math.isfinite(self.new_item_offset), "a finite number"),
            "n_time_buckets": (self.n_time_buckets >= 3, "at least 3"),
            "ann_min_items": (self.ann_min_items >= 0, "0 or more"),
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
        item_text: ``(n_items + 1, D)`` float32 text vector per item (zero rows: none), or None.
        n_id_items: Items ``1..n_id_items`` have an id embedding (those with events); the
            others are represented by their text and attributes only (default: every item).
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        n_items: int,
        item_attrs: torch.Tensor | None,
        item_text: torch.Tensor | None = None,
        n_id_items: int | None = None,
    ) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.id_dropout = cfg.item_id_dropout if item_text is not None else 0.0
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
        self.text_proj = None
        if item_text is not None:
            self.register_buffer("item_text", item_text, persistent=False)
            self.text_proj = nn.Linear(item_text.shape[1], d, bias=False)
        # 1 for items with an id embedding; the others' rows stay zero and get no gradient
        has_id = torch.arange(n_items + 1) <= (n_items if n_id_items is None else n_id_items)
        has_id[0] = False
        self.register_buffer("has_id", has_id, persistent=False)
        self.drop = Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(d)
        self.apply(self._init_weights)
        with torch.no_grad():
            self.item_emb.weight[~has_id] = 0.0

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

        The item's id embedding (zero for an item without one, and in training zero with
        probability ``item_id_dropout``), plus the mean embedding of its attributes and the
        projection of its text vector (when there are any).
        """
        keep = self.has_id[ids]  # (*S,)
        if self.training and self.id_dropout > 0:
            keep = keep & (torch.rand(ids.shape, device=ids.device) >= self.id_dropout)
        x = self.item_emb(ids) * keep.unsqueeze(-1)  # (*S, d)
        if self.attr_emb is not None:
            attrs = self.item_attrs[ids.reshape(-1)]  # (prod S, A)
            x = x + self.attr_emb(attrs).view(x.shape)  # mean over non-padding attributes
        if self.text_proj is not None:
            if ids.numel() >= self.item_text.shape[0]:  # the whole table is cheaper to project
                x = x + self.text_proj(self.item_text)[ids]  # (*S, d)
            else:
                x = x + self.text_proj(self.item_text[ids])  # (*S, d)
        return x

    def item_table(self, n_items: int | None = None) -> torch.Tensor:
        """Item representations ``(n_items + 1, d)`` (default: every item); row 0 is padding."""
        rows = self.item_emb.num_embeddings if n_items is None else n_items + 1
        return self.embed_items(torch.arange(rows, device=self.item_emb.weight.device))

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
