"""Top-K ranking metrics, exactly as the evaluation protocol defines them.

Inputs are two tables: recommendations ``user_id, item_id, rank`` (rank 1 is the best; ``score``
is optional and ignored) and targets ``user_id, item_id`` (one or more relevant items per user).
The evaluated users are the users of ``targets``; a user without recommendations scores 0.
Everything is computed with one join of the recommendations with the targets and per-user
aggregations, so scoring 100k users takes about a second.

Per user with target set ``T`` and hit ranks ``r_1 < r_2 < ...`` within the top ``K``:

* ``ndcg@K``: ``sum_j 1 / log2(r_j + 1)`` divided by the ideal ``sum_{i <= min(K, |T|)} 1 /
  log2(i + 1)`` (binary gains);
* ``recall@K``: ``hits / min(K, |T|)``; ``recall_plain@K``: ``hits / |T|``;
* ``hitrate@K``: 1 if any hit;
* ``map@K``: ``sum_j (j / r_j) / min(K, |T|)``;
* ``mrr@K``: ``1 / r_1``.

Over all evaluated users' top-``K`` lists:

* ``coverage@K``: distinct recommended items / ``n_items``;
* ``novelty@K``: mean of ``-log2(p(item))`` over recommended (user, item) pairs, ``p`` the item's
  share of the interaction counts in ``item_popularity`` (an item missing there counts 1).

On cold targets (given ``item_popularity``), for each ``N`` in :data:`COLD_THRESHOLDS`:

* ``cold<N>.ndcg@K``, ``cold<N>.recall@K``: the same formulas with ``T`` the user's targets whose
  item has at most ``N`` interactions in ``item_popularity`` (an item missing there has 0), the
  same recommendation list, averaged over the users with at least one such target;
* ``cold<N>.users``: the number of those users. When it is 0 the two metrics are left out (not
  NaN, which MLflow and the tables would carry badly, nor 0, which reads as a model that fails).

With one target per user (leave-one-out) recall, plain recall and hit rate coincide.

Beside the means of :data:`SE_METRICS`, their standard errors over the evaluated users:
``se.ndcg@K`` is ``s / sqrt(n)``, ``s`` the users' sample standard deviation and ``n`` the users
(left out below 2 users). Two models on the same users differ by more than noise only when the
difference is several times the larger of their standard errors (a paired test needs the
per-user figures: :func:`per_user_metrics`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from models.columns import ITEM, RANK, USER
from models.errors import ConfigError, DataError, require_columns

COUNT = "count"
_CODE = "__code"
_INFO = "__information"  # a recommended item's self-information, for novelty
ACCURACY_METRICS: tuple[str, ...] = ("ndcg", "recall", "recall_plain", "hitrate", "map", "mrr")
COLD_THRESHOLDS: tuple[int, ...] = (0, 5)  # a cold target's item has at most N events
COLD_METRICS: tuple[str, ...] = ("ndcg", "recall")
_COLD_KEY = re.compile(r"cold(\d+)\.(.+)")  # cold5.ndcg@10 -> 5, ndcg@10
SE_METRICS: tuple[str, ...] = ("ndcg", "recall")  # reported with their standard error
SE_PREFIX = "se."


def _check_inputs(recs: pl.DataFrame, targets: pl.DataFrame, ks: Sequence[int]) -> None:
    require_columns(recs.columns, (USER, ITEM, RANK), "recommendations")
    require_columns(targets.columns, (USER, ITEM), "targets")
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ConfigError(f"ks must be a non-empty list of positive integers; got {list(ks)}.")
    if recs.height and recs[RANK].min() < 1:
        raise DataError(
            f"recommendations have rank values below 1 (min {recs[RANK].min()}); ranks are "
            "1-based positions in each user's list."
        )
    _check_distinct(recs, ITEM, "list the same item twice for a user",
                    "each list must hold distinct items")
    _check_distinct(recs, RANK, "give two items the same rank for a user",
                    "ranks are distinct positions 1, 2, ... in each user's list (break ties)")


def _check_distinct(recs: pl.DataFrame, column: str, problem: str, fix: str) -> None:
    """Raise :class:`DataError` when a (user, ``column``) pair repeats."""
    # hashing the pairs is a cheap first test; the exact search runs only when it fails
    if recs.select(pl.struct(USER, column).hash().n_unique()).item() == recs.height:
        return
    dupes = recs.filter(pl.struct(USER, column).is_duplicated())
    if dupes.height:
        example = dupes.row(0, named=True)
        raise DataError(
            f"recommendations {problem} ({dupes.height} rows, e.g. user {example[USER]!r}, "
            f"{column} {example[column]!r}); {fix}."
        )


def per_user_metrics(
    recs: pl.DataFrame, targets: pl.DataFrame, ks: Sequence[int] = (10, 20)
) -> pl.DataFrame:
    """Accuracy metrics per evaluated user (for paired tests and error analysis).

    Args:
        recs: ``user_id, item_id, rank`` (1-based).
        targets: ``user_id, item_id``; duplicates are counted once.
        ks: Cut-offs.

    Returns:
        ``user_id, n_targets`` and one column per metric and cut-off (``ndcg@10``, ...), one row
        per user of ``targets``, sorted by user.
    """
    _check_inputs(recs, targets, ks)
    return _per_user(recs, targets, ks)


def _per_user(recs: pl.DataFrame, targets: pl.DataFrame, ks: Sequence[int]) -> pl.DataFrame:
    """:func:`per_user_metrics` on inputs already checked."""
    k_max = max(ks)
    targets = targets.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String)).unique()
    users = targets.group_by(USER).agg(pl.len().alias("n_targets")).sort(USER)
    hits = (
        recs.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String), RANK)
        .filter(pl.col(RANK) <= k_max)
        .join(targets, on=[USER, ITEM], how="inner")
        .sort(USER, RANK)
        # j = 1 for a user's best-ranked hit, 2 for the next, ...; used by AP
        .with_columns(pl.int_range(1, pl.len() + 1).over(USER).alias("j"))
    )
    n_targets = users["n_targets"].to_numpy()
    columns: dict[str, np.ndarray] = {}
    for k in sorted(set(ks)):
        agg = (
            hits.filter(pl.col(RANK) <= k)
            .group_by(USER)
            .agg(
                pl.len().alias("hits"),
                (1.0 / (pl.col(RANK) + 1).log(2)).sum().alias("dcg"),
                (pl.col("j") / pl.col(RANK)).sum().alias("ap_sum"),
                (1.0 / pl.col(RANK).min()).alias("rr"),
            )
        )
        per = users.join(agg, on=USER, how="left", maintain_order="left").fill_null(0)
        n_hits = per["hits"].to_numpy().astype(np.float64)
        denom = np.minimum(k, n_targets)
        columns[f"ndcg@{k}"] = per["dcg"].to_numpy() / _ideal_dcg(k)[denom]
        columns[f"recall@{k}"] = n_hits / denom
        columns[f"recall_plain@{k}"] = n_hits / n_targets
        columns[f"hitrate@{k}"] = (n_hits > 0).astype(np.float64)
        columns[f"map@{k}"] = per["ap_sum"].to_numpy() / denom
        columns[f"mrr@{k}"] = per["rr"].to_numpy().astype(np.float64)
    return users.with_columns(pl.Series(name, values) for name, values in columns.items())


def _ideal_dcg(k: int) -> np.ndarray:
    """``out[m]`` = DCG of ``m`` hits at ranks 1..m, for ``m`` in ``0..k``."""
    return np.concatenate([[1.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])


def evaluate(
    recs: pl.DataFrame,
    targets: pl.DataFrame,
    ks: Sequence[int] = (10, 20),
    n_items: int | None = None,
    item_popularity: pl.DataFrame | None = None,
) -> dict[str, float]:
    """Mean metrics over the users of ``targets`` (see the module docstring for formulas).

    Args:
        recs: ``user_id, item_id, rank`` (1-based, distinct items per user).
        targets: ``user_id, item_id``.
        ks: Cut-offs.
        n_items: Catalogue size for ``coverage@K``; without it coverage is left out.
        item_popularity: ``item_id, count`` (interactions per item in the fitted history) for
            ``novelty@K`` and the ``cold<N>.*`` metrics; without it those are left out.

    Returns:
        Flat ``{"ndcg@10": ..., "recall@10": ..., ..., "users": n}``, then with
        ``item_popularity`` ``{"cold0.ndcg@10": ..., ..., "cold0.users": m, "cold5.ndcg@10": ...}``.
    """
    return merge_partials([partial_metrics(recs, targets, ks, item_popularity)], n_items)


def partial_metrics(
    recs: pl.DataFrame,
    targets: pl.DataFrame,
    ks: Sequence[int] = (10, 20),
    item_popularity: pl.DataFrame | None = None,
) -> dict[str, object]:
    """The sums behind :func:`evaluate` for one part of the users (for example one shard).

    Parts over disjoint users merge exactly with :func:`merge_partials`; ``item_popularity``
    must be the same (whole-history) table, in the same row order, for every part: a part's
    recommended items are codes over its rows (a bitset of catalogue / 8 bytes, or 4 bytes per
    distinct item when that is smaller; not an id string per item), plus the ids it lacks.
    """
    per_user = per_user_metrics(recs, targets, ks)
    part: dict[str, object] = {"users": per_user.height, "sums": {}, "items": {}, "novelty": {},
                               "cold": {}}
    for k in sorted(set(ks)):
        for metric in ACCURACY_METRICS:
            part["sums"][f"{metric}@{k}"] = float(per_user[f"{metric}@{k}"].sum())
    part["squares"] = {f"{metric}@{k}": float((per_user[f"{metric}@{k}"] ** 2).sum())
                       for k in sorted(set(ks)) for metric in SE_METRICS}
    top = recs.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String), RANK).join(
        per_user.select(USER), on=USER, how="semi"
    )
    if item_popularity is not None:  # looked up once for every k
        top = _with_information(top, item_popularity)
    for k in sorted(set(ks)):
        top_k = top.filter(pl.col(RANK) <= k)
        part["items"][k] = (top_k[ITEM].unique() if item_popularity is None
                            else _item_set(top_k, item_popularity.height))
        if item_popularity is not None:
            part["novelty"][k] = (float(top_k[_INFO].sum()), top_k.height)
    if item_popularity is not None:
        part["cold"] = _cold_sums(recs, targets, ks, item_popularity)
    return part


def _cold_sums(
    recs: pl.DataFrame, targets: pl.DataFrame, ks: Sequence[int], item_popularity: pl.DataFrame
) -> dict[int, dict[str, object]]:
    """Per threshold ``N``: the users with a cold target and their summed cold metrics."""
    require_columns(item_popularity.columns, (ITEM, COUNT), "item_popularity")
    targets = targets.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String))
    recs = recs.select(pl.col(USER).cast(pl.String), pl.col(ITEM).cast(pl.String), RANK)
    # only the targets' items are looked up: the table is the whole catalogue
    counts = item_popularity.select(pl.col(ITEM).cast(pl.String), COUNT).join(
        targets.select(ITEM).unique(), on=ITEM, how="semi"
    )
    cold: dict[int, dict[str, object]] = {}
    for n in COLD_THRESHOLDS:
        cold_targets = targets.join(counts.filter(pl.col(COUNT) > n), on=ITEM, how="anti")
        cold_recs = recs.join(cold_targets.select(USER), on=USER, how="semi")
        per_user = _per_user(cold_recs, cold_targets, ks)
        sums = {f"{metric}@{k}": float(per_user[f"{metric}@{k}"].sum())
                for k in sorted(set(ks)) for metric in COLD_METRICS}
        cold[n] = {"users": per_user.height, "sums": sums}
    return cold


def merge_partials(parts: Sequence[Mapping[str, object]], n_items: int | None = None
                   ) -> dict[str, float]:
    """:func:`evaluate`'s result from the :func:`partial_metrics` of disjoint sets of users."""
    users = sum(int(p["users"]) for p in parts)
    result: dict[str, float] = {}
    for key in parts[0]["sums"] if parts else ():
        result[key] = sum(p["sums"][key] for p in parts) / users if users else 0.0
    for k in parts[0]["items"] if parts else ():
        if n_items is not None:
            if n_items < 1:
                raise ConfigError(f"n_items must be a positive integer; got {n_items}.")
            result[f"coverage@{k}"] = _count_items([p["items"][k] for p in parts]) / n_items
        if parts[0]["novelty"]:
            total = sum(p["novelty"][k][0] for p in parts)
            count = sum(p["novelty"][k][1] for p in parts)
            result[f"novelty@{k}"] = total / count if count else 0.0
    result["users"] = float(users)
    if users > 1 and all("squares" in p for p in parts):  # older partials carry no squares
        for key in parts[0]["squares"]:
            squares = sum(p["squares"][key] for p in parts)
            variance = max(squares - users * result[key] ** 2, 0.0) / (users - 1)
            result[f"{SE_PREFIX}{key}"] = float(np.sqrt(variance / users))
    if parts and all(p.get("cold") for p in parts):
        result.update(_merge_cold(parts))
    return result


def _merge_cold(parts: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """The ``cold<N>.*`` metrics: sums over the parts divided by their cold users."""
    result: dict[str, float] = {}
    for n in parts[0]["cold"]:
        users = sum(int(p["cold"][n]["users"]) for p in parts)
        for key in parts[0]["cold"][n]["sums"] if users else ():
            result[f"cold{n}.{key}"] = sum(p["cold"][n]["sums"][key] for p in parts) / users
        result[f"cold{n}.users"] = float(users)
    return result


def _with_information(top: pl.DataFrame, item_popularity: pl.DataFrame) -> pl.DataFrame:
    """``top`` with the self-information ``-log2(count / total)`` of each recommended item.

    And with each item's row number in ``item_popularity`` (its code for :func:`_item_set`;
    null when it is not there). An item missing from ``item_popularity`` counts once. Only the
    recommended items are joined: the table is the whole catalogue, the part a few of its items.
    """
    require_columns(item_popularity.columns, (ITEM, COUNT), "item_popularity")
    if top.is_empty():
        return top.with_columns(pl.lit(0.0).alias(_INFO), pl.lit(None, pl.UInt32).alias(_CODE))
    total = float(item_popularity[COUNT].cast(pl.Float64).sum())
    if total <= 0:
        raise DataError("item_popularity counts sum to zero; give positive interaction counts.")
    counts = item_popularity.select(pl.col(ITEM).cast(pl.String), pl.col(COUNT).cast(pl.Float64))
    counts = counts.with_row_index(_CODE).join(top.select(ITEM).unique(), on=ITEM, how="semi")
    return top.join(counts, on=ITEM, how="left").with_columns(
        -(pl.col(COUNT).fill_null(1.0).clip(lower_bound=1.0) / total).log(2).alias(_INFO)
    ).drop(COUNT)


def _item_set(top_k: pl.DataFrame, n_codes: int) -> dict[str, object]:
    """The distinct items of ``top_k`` by their codes, the rows of ``item_popularity``.

    The codes are a bitset over the table (catalogue / 8 bytes) or, when fewer than one in 32
    rows is recommended, the sorted codes (4 bytes each), whichever is smaller, whatever the
    number of users; ids not in the table are kept as they are (:func:`_count_items` merges).
    """
    codes = np.unique(top_k[_CODE].drop_nulls().to_numpy()).astype(np.uint32)
    if 32 * len(codes) >= n_codes:
        mask = np.zeros(n_codes, dtype=bool)
        mask[codes] = True
        codes = np.packbits(mask)
    return {"n_codes": n_codes, "codes": codes,
            "others": top_k.filter(pl.col(_CODE).is_null())[ITEM].unique()}


def _count_items(sets: Sequence[object]) -> int:
    """The distinct items of the parts' sets: id series, or :func:`_item_set`'s codes."""
    if all(isinstance(found, pl.Series) for found in sets):  # parts without item_popularity
        return pl.concat(sets).n_unique()
    if any(isinstance(found, pl.Series) for found in sets):
        raise DataError("some parts hold their items as ids and others as codes (parts scored "
                        "with and without item_popularity, or by two versions of shoprank, as "
                        "a run resumed across an upgrade): score every part alike, or start "
                        "the run afresh.")
    n_codes = sets[0]["n_codes"]
    mask = np.zeros(n_codes, dtype=bool)
    for found in sets:
        codes = found["codes"]
        if found["n_codes"] != n_codes:
            raise DataError("the parts' item_popularity tables differ: give every part the same "
                            "whole-history table.")
        if codes.dtype == np.uint8:  # a bitset
            mask |= np.unpackbits(codes, count=n_codes).astype(bool)
        else:
            mask[codes] = True
    others = pl.concat([found["others"] for found in sets]).n_unique()
    return int(mask.sum()) + others


def metrics_table(
    results: Mapping[str, Mapping[str, float]], digits: int = 4, metrics: Sequence[str] = ()
) -> str:
    """Format results as a markdown table: one row per model, one column per metric key.

    Args:
        results: ``{model name: evaluate(...) output}``.
        digits: Decimals shown.
        metrics: Columns to show, in order; default every key seen except the ``cold<N>.*``
            ones (:func:`cold_metrics_table` shows those) and the standard errors, in
            first-seen order with ``users`` last.

    Returns:
        The table as a markdown string (empty cells for metrics a model lacks); a metric with
        a standard error reads ``mean ± se``.
    """
    if not metrics:
        seen: dict[str, None] = {}
        for values in results.values():
            seen.update(dict.fromkeys(m for m in values if not _COLD_KEY.fullmatch(m)
                                      and not m.startswith(SE_PREFIX)))
        metrics = [m for m in seen if m != "users"] + (["users"] if "users" in seen else [])
    lines = [
        "| model | " + " | ".join(metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for name, values in results.items():
        cells = [_format(values.get(m), digits, m == "users", values.get(SE_PREFIX + m))
                 for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cold_metrics_table(results: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """The ``cold<N>.*`` metrics as a markdown table of their own, one row per model and ``N``.

    Args:
        results: ``{model name: evaluate(...) output}``.
        digits: Decimals shown.

    Returns:
        Rows ``model (item events <= N)`` with columns ``ndcg@K``, ``recall@K`` and ``users`` (the
        users with a cold target); an empty string when no model has cold metrics.
    """
    rows: dict[str, dict[str, float]] = {}
    for name, values in results.items():
        for key, value in values.items():
            if match := _COLD_KEY.fullmatch(key):
                rows.setdefault(f"{name} (item events <= {match[1]})", {})[match[2]] = value
    return metrics_table(rows, digits) if rows else ""


def _format(value: float | None, digits: int, integer: bool, se: float | None = None) -> str:
    if value is None:
        return ""
    if integer:
        return f"{int(value)}"
    return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")
