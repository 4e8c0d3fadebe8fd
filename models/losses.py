"""Next-item losses and negative samplers for sequential recommenders.

Shapes: ``N`` scored positions (flattened), ``d`` hidden size, ``M`` shared negatives,
``V = n_items + 1`` rows of the item table (row 0 is padding and never a candidate).

Sampled softmax approximates the full softmax over the catalogue with ``M`` negatives drawn once
per batch and shared by all positions. With ``q(j)`` the probability that one draw returns item
``j``, the log-partition ``log sum_j exp(s_j)`` is estimated by
``log(exp(s_pos) + sum_k exp(s_k - log(M q(k))))``: each negative's logit is corrected by the log
of its expected count in the sample ("log-Q correction"). Without the correction, frequently
drawn items are over-penalised (popularity sampling) or the negatives are under-weighted
(uniform sampling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (all when ``mask`` is None)."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def full_softmax_loss(
    seq_repr: torch.Tensor,
    item_table: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the next item over the whole catalogue.

    Args:
        seq_repr: Hidden states, ``(N, d)``.
        item_table: Item embeddings including the padding row 0, ``(V, d)``.
        targets: Target item indices in ``1..V-1``, ``(N,)``.
        mask: Optional ``(N,)`` bool; only true positions count.

    Returns:
        Scalar mean loss (float32).
    """
    logits = seq_repr @ item_table[1:].T  # (N, V-1): padding is never a candidate
    losses = F.cross_entropy(logits.float(), targets - 1, reduction="none")  # (N,)
    return _masked_mean(losses, mask)


def sampled_softmax_loss(
    seq_repr: torch.Tensor,
    pos_emb: torch.Tensor,
    neg_emb: torch.Tensor,
    pos_logq: torch.Tensor | None = None,
    neg_logq: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    pos_ids: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy of each positive against ``M`` shared negatives.

    The logit of a positive is ``<h, e_pos> - pos_logq`` and of a negative
    ``<h, e_neg> - neg_logq``; the loss is ``-log softmax`` of the positive among them. Pass
    ``neg_logq = log(M * q(neg))`` (see :func:`expected_count_logq`) for the log-Q corrected
    estimate of the full softmax, and ``None`` for no correction. When ids are given, a negative
    equal to the position's positive ("accidental hit") is removed from that position's softmax.

    Args:
        seq_repr: Hidden states ``h``, ``(N, d)``.
        pos_emb: Embedding of each position's positive item, ``(N, d)``.
        neg_emb: Embeddings of the shared negatives, ``(M, d)``.
        pos_logq: Correction subtracted from the positive logits, ``(N,)``, or None.
        neg_logq: Correction subtracted from the negative logits, ``(M,)``, or None.
        mask: Optional ``(N,)`` bool; only true positions count.
        pos_ids: Positive item ids, ``(N,)`` (with ``neg_ids``: removes accidental hits).
        neg_ids: Negative item ids, ``(M,)``.

    Returns:
        Scalar mean loss (float32).
    """
    pos_logits = (seq_repr * pos_emb).sum(-1).float()  # (N,)
    if pos_logq is not None:
        pos_logits = pos_logits - pos_logq
    if neg_logq is None:
        neg_logits = (seq_repr @ neg_emb.T).float()  # (N, M)
    else:  # the correction rides along as the bias of one fused matrix product
        neg_logits = torch.addmm(-neg_logq[None, :].to(seq_repr.dtype), seq_repr, neg_emb.T)
        neg_logits = neg_logits.float()
    if pos_ids is not None and neg_ids is not None:
        hit = pos_ids[:, None] == neg_ids[None, :]  # (N, M)
        neg_logits = neg_logits.masked_fill(hit, float("-inf"))
    # log(exp(pos) + sum exp(neg)) without concatenating the (N, 1 + M) logits
    losses = torch.logaddexp(pos_logits, torch.logsumexp(neg_logits, dim=1)) - pos_logits
    return _masked_mean(losses, mask)


def expected_count_logq(logq: torch.Tensor, n_draws: int) -> torch.Tensor:
    """``log(n_draws * q)``: the log expected count of an item among ``n_draws`` draws."""
    return logq + math.log(n_draws)


def uniform_negatives(
    n_items: int,
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` item indices uniformly from ``1..n_items``, with replacement.

    Args:
        n_items: Catalogue size (indices ``1..n_items``; 0 is padding and never drawn).
        n: Number of draws.
        generator: Source of randomness (its device decides where sampling runs).
        device: Device of the result (defaults to the generator's device, else CPU).

    Returns:
        ``(ids, logq)``: int64 ``(n,)`` item indices and float32 ``(n,)`` log-probabilities of
        one draw, all ``-log(n_items)``.
    """
    device = device if device is not None else (generator.device if generator else "cpu")
    ids = torch.randint(1, n_items + 1, (n,), generator=generator, device=device)
    logq = torch.full((n,), -math.log(n_items), device=device)
    return ids, logq


def popularity_probs(counts: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Compute sampling probabilities ``q(j) ~ (count_j + 1) ** alpha`` over item indices.

    Args:
        counts: Interaction count per item index, ``(V,)``; entry 0 (padding) is ignored.
        alpha: Flattening exponent: 1 is proportional to popularity, 0 is uniform.

    Returns:
        float32 ``(V,)`` probabilities with ``q(0) = 0``, summing to 1.
    """
    weights = (counts.double() + 1.0) ** alpha
    weights[0] = 0.0
    return (weights / weights.sum()).float()


def popularity_negatives(
    probs: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` item indices with replacement from ``probs`` (see :func:`popularity_probs`).

    Args:
        probs: Probabilities over item indices, ``(V,)``, with ``probs[0] == 0``.
        n: Number of draws.
        generator: Source of randomness, on the device of ``probs``.

    Returns:
        ``(ids, logq)``: int64 ``(n,)`` item indices and float32 ``(n,)`` log-probabilities of
        one draw.
    """
    ids = torch.multinomial(probs, n, replacement=True, generator=generator)
    return ids, torch.log(probs[ids])
