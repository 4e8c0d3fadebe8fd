"""Tests of the sequential transformer: losses, samplers, sequence data, network, estimator."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import math

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
import torch.nn.functional as F

import models.transformer as transformer_module
from models import losses, seqdata, transformer_training
from models.columns import (
    ATTRIBUTES,
    CATEGORY,
    EVENT_TYPE,
    ITEM,
    RANK,
    SCORE,
    TIMESTAMP,
    TITLE,
    USER,
)
from models.errors import ConfigError, DataError, MissingColumnsError
from models.item_text import VECTOR, WordLlamaEncoder, encode_items
from models.transformer import SASRec, SequentialTransformer, TransformerConfig
from tasks.transformer.sequence import (
    NEW_ITEM_OFFSETS,
    SequenceConfig,
    catalogue_vectors,
    choose_new_item_offset,
    fit_final,
    offset_figure,
)

T0 = pd.Timestamp("2024-01-01", tz="UTC")
N_TOY_ITEMS = 30


def _events(rows: list[tuple[str, str]], event_type: str = "view") -> pd.DataFrame:
    """Events from ordered (user, item) pairs, one minute apart."""
    frame = pd.DataFrame(rows, columns=[USER, ITEM])
    frame[EVENT_TYPE] = event_type
    frame[TIMESTAMP] = T0 + pd.to_timedelta(np.arange(len(frame)), unit="min")
    return frame


def _toy_sequences(n_users: int = 300, seed: int = 0) -> pd.DataFrame:
    """Each user walks the catalogue: item i is always followed by item i + 1 (mod 30)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start, length = rng.integers(0, N_TOY_ITEMS), rng.integers(4, 12)
        rows += [(f"u{u}", f"i{(start + p) % N_TOY_ITEMS}") for p in range(length)]
    return _events(rows)


def _tiny(**overrides: object) -> TransformerConfig:
    values = dict(
        hidden_size=32,
        n_blocks=1,
        n_heads=2,
        dropout=0.0,
        emb_dropout=0.0,
        max_len=12,
        lr=1e-2,
        batch_size=64,
        epochs=15,
        n_negatives=16,
        device="cpu",
        num_threads=1,
        eval_every=5,
        seed=3,
    )
    values.update(overrides)
    return TransformerConfig(**values)


@pytest.fixture(scope="module")
def toy() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Toy events split into training events and each user's held-out last item."""
    events = _toy_sequences()
    last = events.groupby(USER).tail(1)
    return events.drop(last.index), last[[USER, ITEM]].reset_index(drop=True)


@pytest.fixture(scope="module")
def fitted(toy: tuple[pd.DataFrame, pd.DataFrame]) -> SequentialTransformer:
    train, valid = toy
    return SequentialTransformer(_tiny()).fit(train, valid_targets=valid)


# ---------------------------------------------------------------- losses and samplers
def test_sampled_softmax_matches_hand_computation() -> None:
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pos = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # positive logits 2 and 2
    neg = torch.tensor([[1.0, 1.0], [0.0, -1.0]])  # negative logits row 0: 1, 0; row 1: 2, -2
    expected = (
        (-2 + math.log(math.exp(2) + math.exp(1) + math.exp(0)))
        + (-2 + math.log(math.exp(2) + math.exp(2) + math.exp(-2)))
    ) / 2
    loss = losses.sampled_softmax_loss(h, pos, neg)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_sampled_softmax_logq_correction_and_accidental_hits() -> None:
    h = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[2.0, 0.0]])
    neg = torch.tensor([[1.0, 0.0], [0.5, 0.0], [2.0, 0.0]])  # logits 1, 0.5, 2
    logq = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    correction = losses.expected_count_logq(logq, n_draws=3)  # log(3 q)
    loss = losses.sampled_softmax_loss(
        h,
        pos,
        neg,
        None,
        correction,
        None,
        pos_ids=torch.tensor([7]),
        neg_ids=torch.tensor([4, 5, 7]),
    )
    # The third negative is the positive itself: removed. The others: s - log(3 q).
    z = math.exp(2) + math.exp(1 - math.log(1.5)) + math.exp(0.5 - math.log(0.75))
    assert loss.item() == pytest.approx(-2 + math.log(z), rel=1e-6)
    pos_corrected = losses.sampled_softmax_loss(h, pos, neg[:1], torch.tensor([1.0]), None)
    assert pos_corrected.item() == pytest.approx(-1 + math.log(math.exp(1) + math.exp(1)))


def test_losses_average_over_mask_only() -> None:
    h, pos, neg = torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 3)
    mask = torch.tensor([True, False, True, False])
    masked = losses.sampled_softmax_loss(h, pos, neg, mask=mask)
    assert masked.item() == pytest.approx(
        losses.sampled_softmax_loss(h[mask], pos[mask], neg).item(), rel=1e-6
    )


def test_full_softmax_equals_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    h, table = torch.randn(6, 4, generator=gen), torch.randn(9, 4, generator=gen)
    targets = torch.tensor([1, 8, 3, 3, 5, 2])
    expected = F.cross_entropy(h @ table[1:].T, targets - 1)
    assert losses.full_softmax_loss(h, table, targets).item() == pytest.approx(expected.item())


def test_uniform_negatives_range_logq_and_determinism() -> None:
    ids, logq = losses.uniform_negatives(50, 1000, torch.Generator().manual_seed(1))
    again, _ = losses.uniform_negatives(50, 1000, torch.Generator().manual_seed(1))
    assert ids.shape == logq.shape == (1000,)
    assert ids.dtype == torch.int64
    assert int(ids.min()) >= 1
    assert int(ids.max()) <= 50
    assert len(torch.unique(ids)) == 50
    assert torch.equal(ids, again)
    assert torch.allclose(logq, torch.full((1000,), -math.log(50)))


def test_popularity_negatives_follow_their_probabilities() -> None:
    counts = torch.tensor([100, 0, 1, 3, 7])  # entry 0 is padding
    probs = losses.popularity_probs(counts, alpha=1.0)
    assert probs[0] == 0
    assert probs.sum().item() == pytest.approx(1.0)
    assert probs[1:].tolist() == pytest.approx([1 / 15, 2 / 15, 4 / 15, 8 / 15])
    ids, logq = losses.popularity_negatives(probs, 20000, torch.Generator().manual_seed(2))
    again, _ = losses.popularity_negatives(probs, 20000, torch.Generator().manual_seed(2))
    assert torch.equal(ids, again)
    assert int(ids.min()) >= 1
    assert torch.allclose(logq, torch.log(probs[ids]))
    share = torch.bincount(ids, minlength=5)[1:].double() / 20000
    assert share.tolist() == pytest.approx([1 / 15, 2 / 15, 4 / 15, 8 / 15], abs=0.02)
    assert losses.popularity_probs(counts, alpha=0.0)[1:].tolist() == pytest.approx([0.25] * 4)


# ---------------------------------------------------------------- sequence data
def test_sequences_padding_and_time_gaps() -> None:
    events = _events([("b", "x"), ("a", "y"), ("b", "y"), ("b", "z")])
    events.loc[3, TIMESTAMP] = events.loc[2, TIMESTAMP] + pd.Timedelta(seconds=7)
    item_ids = seqdata.item_vocabulary(events)
    seqs = seqdata.build_sequences(events, item_ids, n_time_buckets=10)
    assert seqs.users.tolist() == ["a", "b"]
    assert seqs.offsets.tolist() == [0, 1, 4]
    assert item_ids[seqs.items - 1].tolist() == ["y", "x", "y", "z"]
    # first events -> 1; 120 s -> 2 + floor(log2(121)) = 8; 7 s -> 2 + 3 = 5
    assert seqs.gaps.tolist() == [1, 1, 8, 5]
    items, types, gaps, lengths = seqdata.padded_tail(seqs, np.array([1, 0]), width=2)
    assert lengths.tolist() == [2, 1]
    assert items.tolist() == [[2, 3], [2, 0]]
    assert gaps.tolist() == [[8, 5], [1, 0]]
    assert types.tolist() == [[1, 1], [1, 0]]  # "view" is event type 1
    which, seen = seqdata.seen_pairs(seqs, np.array([1, -1, 0]))
    assert which.tolist() == [0, 0, 0, 2]
    assert seen.tolist() == [1, 2, 3, 2]


def test_epoch_plan_covers_every_row_once_with_tight_widths() -> None:
    lengths = np.random.default_rng(0).integers(1, 30, size=103)
    plan = seqdata.epoch_plan(lengths, batch_size=10, rng=np.random.default_rng(1))
    again = seqdata.epoch_plan(lengths, batch_size=10, rng=np.random.default_rng(1))
    assert sorted(plan.rows.tolist()) == list(range(103))
    assert np.array_equal(plan.rows, again.rows)
    assert len(plan.targets) == lengths.sum()
    for b in range(len(plan)):
        rows = plan.rows[plan.row_bounds[b] : plan.row_bounds[b + 1]]
        assert plan.widths[b] == lengths[rows].max()


def test_item_attribute_matrix_from_category_and_attributes() -> None:
    items = pd.DataFrame(
        {ITEM: ["x", "y", "q"], CATEGORY: ["c1", None, "c1"], ATTRIBUTES: [["a", "b"], ["b"], []]}
    )
    matrix, names = seqdata.item_attribute_matrix(items, np.array(["x", "y", "z"]))
    assert matrix.shape == (4, 3)
    assert matrix[0].tolist() == [0, 0, 0]
    assert sorted(names[matrix[1][matrix[1] > 0] - 1]) == ["attr:a", "attr:b", "category:c1"]
    assert names[matrix[2][matrix[2] > 0] - 1].tolist() == ["attr:b"]
    assert matrix[3].tolist() == [0, 0, 0]


# ---------------------------------------------------------------- network
def _network(**overrides: object) -> SASRec:
    torch.manual_seed(0)
    attrs = torch.tensor([[0, 0], [1, 2], [2, 0], [3, 0], [1, 0], [0, 0], [2, 3]])
    return SASRec(_tiny(**overrides), n_items=6, item_attrs=attrs).eval()


def test_outputs_are_causal() -> None:
    net = _network()
    items = torch.tensor([[1, 2, 3, 4, 5, 6]])
    other = items.clone()
    other[0, 3] = 2
    types, gaps = torch.ones_like(items), torch.full_like(items, 2)
    out, changed = net(items, types, gaps), net(other, types, gaps)
    assert torch.allclose(out[0, :3], changed[0, :3], atol=1e-6)
    assert not torch.allclose(out[0, 3:], changed[0, 3:])


def test_padding_does_not_change_real_positions() -> None:
    net = _network()
    short = torch.tensor([[3, 1, 2]])
    padded = torch.tensor([[3, 1, 2, 0, 0, 0], [5, 4, 3, 2, 1, 6]])
    out = net(short, torch.ones_like(short), torch.ones_like(short))
    batch = net(padded, (padded > 0).long(), (padded > 0).long())
    assert torch.allclose(out[0], batch[0, :3], atol=1e-6)


# ---------------------------------------------------------------- estimator
def test_learns_a_sequential_pattern(
    fitted: SequentialTransformer, toy: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    _, valid = toy
    top1 = fitted.recommend(valid[USER], k=1)
    hits = top1.merge(valid, on=[USER, ITEM])
    assert len(hits) / len(valid) > 0.9
    assert fitted.history_[-1]["recall@10"] > 0.9
    assert {"loss", "epoch_s", "samples_per_s", "ndcg@10"} <= set(fitted.history_[-1])


def test_early_stopping_keeps_the_best_epoch_of_the_monitored_metric(
    toy: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    """A caller's validation (its protocol and metrics) decides the epoch kept, not NDCG@10."""
    train, _ = toy
    scripted = {"ndcg@10": [0.1, 0.4, 0.2, 0.3], "recall@20": [0.5, 0.1, 0.2, 0.6]}
    seen: list[int] = []

    def validate(model: SequentialTransformer) -> dict[str, float]:
        seen.append(len(model.history_) + 1)  # the epoch just trained
        return {name: values[len(seen) - 1] for name, values in scripted.items()}

    for monitor, best in (("ndcg@10", 2), ("recall@20", 4)):
        seen.clear()
        model = SequentialTransformer(_tiny(epochs=4, eval_every=1, patience=9)).fit(
            train, validate=validate, monitor=monitor)
        assert seen == [1, 2, 3, 4]
        assert model.best_epoch_ == best
        assert [h[monitor] for h in model.history_] == scripted[monitor]
    seen.clear()
    with pytest.raises(ConfigError, match="mrr@10.*ndcg@10, recall@20"):
        SequentialTransformer(_tiny(epochs=1)).fit(train, validate=validate, monitor="mrr@10")
    with pytest.raises(ConfigError, match="not both"):
        SequentialTransformer(_tiny(epochs=1)).fit(train, train[[USER, ITEM]], validate=validate)


def test_same_seed_gives_identical_scores_on_cpu(toy: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, valid = toy
    cfg = _tiny(epochs=2, dropout=0.2, emb_dropout=0.2)
    first = SequentialTransformer(cfg).fit(train).recommend(valid[USER], k=5)
    second = SequentialTransformer(cfg).fit(train).recommend(valid[USER], k=5)
    pd.testing.assert_frame_equal(first, second)


def test_save_then_load_scores_identically(
    fitted: SequentialTransformer, toy: tuple[pd.DataFrame, pd.DataFrame], tmp_path: object
) -> None:
    _, valid = toy
    fitted.save(tmp_path / "model")
    loaded = SequentialTransformer.load(tmp_path / "model")
    pd.testing.assert_frame_equal(
        fitted.recommend(valid[USER], k=5), loaded.recommend(valid[USER], k=5)
    )
    np.testing.assert_array_equal(fitted.user_state(valid[USER]), loaded.user_state(valid[USER]))
    assert loaded.config == fitted.config
    assert loaded.history_ == fitted.history_
    # fitted without item text: the folder holds what it always held, and loads without text
    with np.load(tmp_path / "model" / "state.npz") as state:
        assert "item_text" not in state.files
    assert loaded.item_text_ is None
    assert loaded.model_.text_proj is None


def test_recommend_excludes_seen_items(
    fitted: SequentialTransformer, toy: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    train, _ = toy
    recs = fitted.recommend(train[USER].unique(), k=10)
    assert not recs.merge(train[[USER, ITEM]], on=[USER, ITEM]).shape[0]
    assert recs.groupby(USER)[RANK].apply(list).map(lambda r: r == list(range(1, 11))).all()
    assert (recs.groupby(USER)[SCORE].diff().dropna() <= 0).all()
    with_seen = fitted.recommend(train[USER].unique(), k=10, exclude_seen=False)
    assert with_seen.merge(train[[USER, ITEM]], on=[USER, ITEM]).shape[0] > 0


def test_a_large_catalogue_is_scored_in_smaller_blocks_with_the_same_results(
    fitted: SequentialTransformer, toy: tuple[pd.DataFrame, pd.DataFrame],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A (users x catalogue) block of scores is bounded: the lists and metrics do not change."""
    _, valid = toy
    rows, targets, n_cases = transformer_training.validation_cases(fitted, valid)
    lists = fitted.recommend(valid[USER], k=5)
    metrics = transformer_training.evaluate(fitted, rows, targets, n_cases)
    n_items = len(fitted.item_ids_) + 1
    monkeypatch.setattr(transformer_module, "SCORE_BLOCK", 3 * n_items)
    assert [len(c) for c in fitted._length_chunks(fitted.sequences_, rows, scored=True)][0] == 3
    pd.testing.assert_frame_equal(fitted.recommend(valid[USER], k=5), lists)
    assert transformer_training.evaluate(fitted, rows, targets, n_cases) == pytest.approx(
        metrics, abs=1e-6)


def test_history_overrides_the_fitted_history(
    fitted: SequentialTransformer, toy: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    train, valid = toy
    history = pd.concat(
        [train, valid.assign(**{EVENT_TYPE: "view", TIMESTAMP: T0 + pd.Timedelta(days=1)})]
    )
    recs = fitted.recommend(valid[USER], k=1, history=history)
    assert not recs.merge(valid, on=[USER, ITEM]).shape[0]  # the added item is now seen
    nxt = valid.assign(**{ITEM: valid[ITEM].map(lambda i: f"i{(int(i[1:]) + 1) % N_TOY_ITEMS}")})
    assert len(recs.merge(nxt, on=[USER, ITEM])) / len(valid) > 0.8


def test_unknown_users_get_popular_items(
    fitted: SequentialTransformer, toy: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    train, _ = toy
    recs = fitted.recommend(["nobody", "u0"], k=3)
    popular = train[ITEM].value_counts().sort_index().sort_values(ascending=False, kind="stable")
    assert recs[recs[USER] == "nobody"][ITEM].tolist() == popular.index[:3].tolist()
    assert recs[USER].tolist() == ["nobody"] * 3 + ["u0"] * 3
    states = fitted.user_state(["nobody", "u0"])
    assert np.isnan(states[0]).all()
    assert np.isfinite(states[1]).all()


def test_score_matches_recommend_and_user_state(fitted: SequentialTransformer) -> None:
    recs = fitted.recommend(["u1", "u2"], k=4)
    candidates = pd.concat([recs[[USER, ITEM]], pd.DataFrame({USER: ["u1"], ITEM: ["unknown"]})])
    scored = fitted.score(None, candidates)
    np.testing.assert_allclose(scored[SCORE].to_numpy()[:-1], recs[SCORE].to_numpy(), rtol=1e-5)
    assert np.isnan(scored[SCORE].iloc[-1])
    ids, vectors = fitted.item_vectors()
    state = fitted.user_state(["u1"])[0]
    best = ids[
        np.argmax(np.where(np.isin(ids, recs[recs[USER] == "u1"][ITEM]), vectors @ state, -np.inf))
    ]
    assert best == recs[(recs[USER] == "u1") & (recs[RANK] == 1)][ITEM].item()
    assert set(fitted.score(["u2"], candidates)[USER]) == {"u2"}


class _FrameLike:
    """An object that converts itself to pandas, as polars frames do."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame

    def to_pandas(self) -> pd.DataFrame:
        return self.frame


def test_accepts_frames_with_to_pandas_and_item_features(
    toy: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    train, _ = toy
    items = pd.DataFrame(
        {
            ITEM: [f"i{i}" for i in range(N_TOY_ITEMS + 2)],
            CATEGORY: [f"c{i % 3}" for i in range(N_TOY_ITEMS + 2)],
        }
    )
    model = SequentialTransformer(_tiny(epochs=1)).fit(_FrameLike(train), items=_FrameLike(items))
    assert model.model_.attr_emb is not None
    assert len(model.item_ids_) == N_TOY_ITEMS  # catalogue-only items are never ranked
    assert len(model.recommend(["u0"], k=5)) == 5
    assert not set(model.recommend(["u0"], k=N_TOY_ITEMS)[ITEM]) & {
        f"i{N_TOY_ITEMS}", f"i{N_TOY_ITEMS + 1}"}


def test_invalid_inputs_raise_named_errors() -> None:
    with pytest.raises(ConfigError, match="loss"):
        TransformerConfig(loss="hinge")
    with pytest.raises(ConfigError, match="unknown TransformerConfig field"):
        TransformerConfig.from_dict({"hidden": 3})
    with pytest.raises(MissingColumnsError, match="timestamp"):
        SequentialTransformer(_tiny()).fit(
            pd.DataFrame({USER: ["a"], ITEM: ["x"], EVENT_TYPE: ["view"]})
        )
    with pytest.raises(DataError, match="two or more events"):
        SequentialTransformer(_tiny()).fit(_events([("a", "x"), ("b", "y")]))
    with pytest.raises(DataError, match="event_type"):
        SequentialTransformer(_tiny()).fit(_events([("a", "x")], event_type="click"))
    with pytest.raises(ConfigError, match="k must be"):
        SequentialTransformer(_tiny(epochs=1)).fit(_toy_sequences(20)).recommend(["u0"], k=0)


def test_real_beauty_slice_trains_and_ranks(shared_data: object) -> None:
    rows = []
    with gzip.open(shared_data / "amazon_s3rec" / "Beauty.txt.gz", "rt") as handle:
        for _, line in zip(range(400), handle, strict=False):
            user, *items = line.split()
            rows += [(user, item) for item in items]
    events = _events(rows, event_type="purchase")
    last = events.groupby(USER).tail(1)
    model = SequentialTransformer(_tiny(epochs=2, max_len=50, n_negatives=64))
    model.fit(events.drop(last.index), valid_targets=last[[USER, ITEM]])
    assert len(model.history_) == 2
    assert 0 <= model.history_[-1]["ndcg@10"] <= 1
    recs = model.recommend(last[USER], k=10)
    assert len(recs) == 10 * last[USER].nunique()


def test_a_live_session_extends_the_fitted_sequence(
    fitted: SequentialTransformer, toy: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    train, _ = toy
    users = ["u0", "u1", "u2"]
    sessions = [["i3", "i4"], ["not-an-item", "i10"], ["i20"]]
    live = fitted.recommend_session(users, sessions, k=5, exclude_seen=False)
    # the same as the events appended as views, a day after the last event then a minute apart
    extra = []
    for user, session in zip(users, sessions, strict=True):
        last = train.loc[train[USER] == user, TIMESTAMP].max()
        known = [i for i in session if i != "not-an-item"]
        for j, item in enumerate(known):
            extra.append({USER: user, ITEM: item, EVENT_TYPE: "view",
                          TIMESTAMP: last + pd.Timedelta(days=1) + pd.Timedelta(minutes=j)})
    history = pd.concat([train, pd.DataFrame(extra)], ignore_index=True)
    expected = fitted.recommend(users, k=5, exclude_seen=False, history=history)
    assert live[[USER, ITEM, RANK]].equals(expected[[USER, ITEM, RANK]])
    assert np.allclose(live[SCORE], expected[SCORE], atol=1e-5)
    # the next item of the walk is on top: the session, not the old history, decides
    assert live.loc[(live[USER] == "u0") & (live[RANK] == 1), ITEM].item() == "i5"
    assert fitted.recommend_session(["nobody", "u0"], [["i1"], ["nothing"]], k=3).empty


# ---------------------------------------------------------------- item text
TEXT_GROUPS = ("red wool sweater", "garden water hose", "steel kitchen knife",
               "leather running shoes")
PER_GROUP = 8
N_TEXT_USERS = 160


def _group_of(user: pd.Series) -> pd.Series:
    return user.str[1:].astype(int) % len(TEXT_GROUPS)


@pytest.fixture(scope="module")
def text_shop() -> tuple[pd.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Users who stay in one group of items; titles cluster by group.

    Returns events, the catalogue and its item vectors. The catalogue has one more item per
    group, ``g<k>-new``, that no event mentions, titled like its group.
    """
    rng = np.random.default_rng(0)
    rows = []
    for u in range(N_TEXT_USERS):
        group = u % len(TEXT_GROUPS)
        picked = rng.choice(PER_GROUP, rng.integers(4, 7), replace=False)
        rows += [(f"u{u}", f"g{group}-{j}") for j in picked]
    suffixes = [*map(str, range(PER_GROUP)), "new"]
    catalogue = pl.DataFrame({
        ITEM: [f"g{g}-{j}" for g in range(len(TEXT_GROUPS)) for j in suffixes],
        TITLE: [f"{name} model {j}" for name in TEXT_GROUPS for j in suffixes],
    })
    return _events(rows), catalogue, encode_items(catalogue, WordLlamaEncoder())


@pytest.fixture(scope="module")
def text_fitted(text_shop: tuple[pd.DataFrame, pl.DataFrame, pl.DataFrame]
                ) -> SequentialTransformer:
    events, _, vectors = text_shop
    return SequentialTransformer(_tiny()).fit(events, item_vectors=vectors)


def test_vocabulary_puts_catalogue_only_items_after_the_event_items() -> None:
    events = _events([("a", "y"), ("a", "x")])
    item_ids = seqdata.item_vocabulary(events, np.array(["w", "x", "z", "w"]))
    assert item_ids.tolist() == ["x", "y", "w", "z"]
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    matrix = seqdata.item_vector_matrix(np.array(["z", "x", "q"]), vectors, item_ids)
    assert matrix.dtype == np.float32
    assert matrix.tolist() == [[0, 0], [0, 1], [0, 0], [0, 0], [1, 0]]


def test_items_without_events_are_ranked_by_their_text(
    text_fitted: SequentialTransformer, text_shop: tuple[pd.DataFrame, pl.DataFrame, pl.DataFrame]
) -> None:
    """A new item ranks first among the new items for the users of its group, and is offered."""
    events, _, _ = text_shop
    model = text_fitted
    new_items = [f"g{g}-new" for g in range(len(TEXT_GROUPS))]
    assert model.item_ids_[: model.n_event_items_].tolist() == seqdata.item_vocabulary(
        events).tolist()  # event items keep their indices; the new ones follow
    assert sorted(model.item_ids_[model.n_event_items_ :]) == new_items
    never_trained = model.model_.item_emb.weight[model.n_event_items_ + 1 :]
    assert not never_trained.abs().sum()  # no id embedding: text (and attributes) only
    users = pd.Series([f"u{u}" for u in range(N_TEXT_USERS)])
    pairs = pd.DataFrame([(u, i) for u in users for i in new_items], columns=[USER, ITEM])
    scored = model.score(None, pairs)
    assert np.isfinite(scored[SCORE]).all()
    best = scored.loc[scored.groupby(USER)[SCORE].idxmax()]
    assert (best[ITEM] == "g" + _group_of(best[USER]).astype(str) + "-new").mean() > 0.9
    recs = model.recommend(users, k=5)
    own_new = recs[recs[ITEM] == "g" + _group_of(recs[USER]).astype(str) + "-new"]
    assert own_new[USER].nunique() / len(users) > 0.8
    ids, table = model.item_vectors()
    assert set(new_items) <= set(ids)
    assert np.isfinite(table).all()


def _with_offset(model: SequentialTransformer, offset: float) -> SequentialTransformer:
    moved = copy.copy(model)
    moved.config = dataclasses.replace(model.config, new_item_offset=offset)
    return moved


def test_the_new_item_offset_moves_only_the_items_without_events(
    text_fitted: SequentialTransformer, tmp_path: object
) -> None:
    users = [f"u{u}" for u in range(N_TEXT_USERS)]
    new_items = {f"g{g}-new" for g in range(len(TEXT_GROUPS))}
    pairs = pd.DataFrame([(u, i) for u in users[:8] for i in text_fitted.item_ids_],
                         columns=[USER, ITEM])
    plain = text_fitted.score(None, pairs)[SCORE]
    raised = _with_offset(text_fitted, 2.5)
    moved = raised.score(None, pairs)[SCORE] - plain
    is_new = pairs[ITEM].isin(new_items)
    np.testing.assert_allclose(moved[is_new], 2.5, atol=1e-5)
    np.testing.assert_allclose(moved[~is_new], 0.0, atol=1e-6)
    # far up: a new item heads every list; far down: none is offered
    top = _with_offset(text_fitted, 50.0).recommend(users, k=1, exclude_seen=False)
    assert top[ITEM].isin(new_items).all()
    low = _with_offset(text_fitted, -50.0).recommend(users, k=5, exclude_seen=False)
    assert not low[ITEM].isin(new_items).any()
    # the offset is part of the saved model
    raised.save(tmp_path / "raised")
    loaded = SequentialTransformer.load(tmp_path / "raised")
    assert loaded.config.new_item_offset == 2.5
    pd.testing.assert_frame_equal(loaded.recommend(users[:10], k=6),
                                  raised.recommend(users[:10], k=6))
    with pytest.raises(ConfigError, match="new_item_offset"):
        TransformerConfig(new_item_offset=math.inf)


def test_the_new_item_offset_is_the_largest_within_the_allowed_loss(
    text_fitted: SequentialTransformer, text_shop: tuple[pd.DataFrame, pl.DataFrame, pl.DataFrame]
) -> None:
    """Targets: each user's group's new item and one item the user had; scored at K = 1, 2."""
    events, _, _ = text_shop
    history = pl.from_pandas(events)
    users = [f"u{u}" for u in range(N_TEXT_USERS)]
    own = events.groupby(USER)[ITEM].first()
    targets = pl.DataFrame({
        USER: users * 2,
        ITEM: [f"g{u % len(TEXT_GROUPS)}-new" for u in range(N_TEXT_USERS)]
        + [own[u] for u in users]})
    model = copy.deepcopy(text_fitted)
    offset, metrics, grid = choose_new_item_offset(
        model, history, targets, [1, 2], False, None, "ndcg@2", 0.0)
    assert [row["offset"] for row in grid] == list(NEW_ITEM_OFFSETS)
    best = max(row["ndcg@2"] for row in grid)
    assert [row["ndcg@2"] for row in grid if row["offset"] == offset] == [best]
    assert max(row["offset"] for row in grid if row["ndcg@2"] == best) == offset
    assert model.config.new_item_offset == offset
    assert metrics["ndcg@2"] == best
    colds = [row["cold0.recall@2"] for row in grid]
    assert colds == sorted(colds)  # higher offsets, more new items
    assert colds[-1] > colds[0]
    figure = offset_figure(grid, offset)  # the trade-off as logged to the run
    assert len(figure.axes[0].lines) == 4  # NDCG, cold and warm Recall, the chosen offset
    anything, _, _ = choose_new_item_offset(
        model, history, targets, [1, 2], False, None, "ndcg@2", 0.99)
    assert anything == NEW_ITEM_OFFSETS[-1]
    # every target on an item with events: nothing to choose
    warm = targets.filter(~pl.col(ITEM).str.ends_with("-new"))
    assert choose_new_item_offset(model, history, warm, [1, 2], False, None, "ndcg@2",
                                  0.99)[0] == 0.0


def test_negatives_are_drawn_from_items_with_events(text_fitted: SequentialTransformer) -> None:
    for sampler in ("uniform", "popularity"):
        model = copy.copy(text_fitted)
        model.config = dataclasses.replace(model.config, negative_sampler=sampler,
                                           n_negatives=5000)
        draw = transformer_training.negative_sampler(model, torch.Generator().manual_seed(0))
        ids, logq = draw()
        assert int(ids.min()) >= 1
        assert int(ids.max()) == model.n_event_items_  # never an item known only by its text
        assert torch.isfinite(logq).all()


def test_item_text_round_trips_through_save_and_load(
    text_fitted: SequentialTransformer, tmp_path: object
) -> None:
    text_fitted.save(tmp_path / "model")
    loaded = SequentialTransformer.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.item_text_, text_fitted.item_text_)
    users = [f"u{u}" for u in range(12)]
    pd.testing.assert_frame_equal(text_fitted.recommend(users, k=6), loaded.recommend(users, k=6))
    pairs = pd.DataFrame({USER: users, ITEM: [f"g{u % 4}-new" for u in range(12)]})
    pd.testing.assert_frame_equal(text_fitted.score(None, pairs), loaded.score(None, pairs))


def test_item_text_off_or_absent_ranks_event_items_only(
    text_shop: tuple[pd.DataFrame, pl.DataFrame, pl.DataFrame],
) -> None:
    events, catalogue, vectors = text_shop
    off = SequentialTransformer(_tiny(epochs=1, use_item_text=False)).fit(
        events, item_vectors=vectors)
    assert len(off.item_ids_) == off.n_event_items_ == events[ITEM].nunique()
    assert off.item_text_ is None
    assert off.model_.text_proj is None
    with pytest.raises(MissingColumnsError, match=VECTOR):
        SequentialTransformer(_tiny(epochs=1)).fit(events, item_vectors=vectors.drop(VECTOR))
    with pytest.raises(ConfigError, match="item_id_dropout"):
        TransformerConfig(item_id_dropout=1.0)
    # the pipeline encodes the catalogue only with an encoder and words to read
    settings = {"model": {"num_threads": 1, "device": "cpu", "n_negatives": 16}}
    assert catalogue_vectors(catalogue, SequenceConfig(**settings)) is None
    with_encoder = SequenceConfig(content_encoder="wordllama", **settings)
    assert catalogue_vectors(catalogue.select(ITEM), with_encoder) is None
    params = {"hidden_size": 16, "n_blocks": 1, "n_heads": 1, "max_len": 8}
    refit = fit_final(pl.from_pandas(events), catalogue, with_encoder, params, epochs=1)
    assert "g0-new" in set(refit.item_ids_)


def test_a_graph_of_the_item_table_gives_the_exact_lists_and_is_saved(
    text_fitted: SequentialTransformer, tmp_path: object
) -> None:
    """On a small catalogue the HNSW graph finds every best item: the lists of exact scoring."""
    users = pd.Series([f"u{u}" for u in range(N_TEXT_USERS)])
    for offset in (0.0, 1.5):  # the offset is a column of the graph's table
        exact = _with_offset(text_fitted, offset)
        graphed = copy.copy(exact)
        graphed.config = dataclasses.replace(exact.config, ann_min_items=1)
        assert exact._item_graph() is None
        assert graphed._item_graph() is not None
        for seen in (True, False):
            want = exact.recommend(users, k=5, exclude_seen=seen)
            got = graphed.recommend(users, k=5, exclude_seen=seen)
            pd.testing.assert_frame_equal(got[[USER, ITEM, RANK]], want[[USER, ITEM, RANK]])
            np.testing.assert_allclose(got[SCORE], want[SCORE], rtol=1e-4, atol=1e-5)
    graphed.save(tmp_path / "graphed")
    exact.save(tmp_path / "exact")
    assert (tmp_path / "graphed" / transformer_module.GRAPH_FILE).is_file()
    assert not (tmp_path / "exact" / transformer_module.GRAPH_FILE).exists()
    loaded = SequentialTransformer.load(tmp_path / "graphed")
    assert loaded.graph_offset_ == 1.5  # read with the model, not built again
    pd.testing.assert_frame_equal(loaded.recommend(users, k=5), graphed.recommend(users, k=5))
    moved = _with_offset(loaded, 0.0)  # another offset: a graph of its own
    plain = _with_offset(text_fitted, 0.0)
    pd.testing.assert_frame_equal(moved.recommend(users, k=5)[[USER, ITEM]],
                                  plain.recommend(users, k=5)[[USER, ITEM]])
