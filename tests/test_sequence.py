"""The transformer in the pipeline: Optuna study with per-epoch pruning, refit, candidate source."""

from __future__ import annotations

import optuna
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from pydantic import ValidationError

from models.columns import ITEM, USER
from tasks.data.demo_data import generate_shop
from tasks.data.shards import shard_of
from tasks.ranking.rank_tables import external_candidates
from tasks.ranking.reranker import RankerConfig, RankingPipeline, training_windows
from tasks.ranking.study import TrialLogger
from tasks.ranking.tune import tune_and_evaluate_lgbm
from tasks.splitting.split import cut_times, time_split
from tasks.transformer.sequence import (
    SearchSpace,
    SequenceConfig,
    SequenceSource,
    _Objective,
    full_metrics,
    ranker_sources,
    study_name,
    tune_and_evaluate_transformer,
)

TINY_SPACE = {"hidden_size": [16], "n_blocks": [1], "n_heads": [1], "max_len": [10],
              "n_negatives": [64], "epochs": [2, 4]}


@pytest.fixture(scope="module")
def shop():
    events, items = generate_shop(8_000, seed=3)
    return time_split(events, *cut_times(events)), items


def _config(storage: str, **overrides) -> SequenceConfig:
    settings = {"n_trials": 2, "storage": storage, "space": TINY_SPACE,
                "model": {"num_threads": 1, "device": "cpu"}, **overrides}
    return SequenceConfig.model_validate(settings)


def test_study_reports_every_epoch_and_a_rerun_resumes(shop, tmp_path):
    split, items = shop
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = _config(storage)
    result = tune_and_evaluate_transformer(split, items, config, None, tmp_path,
                                           n_items=items.height)
    assert {"ndcg@10", "recall@20", "coverage@10"} <= set(result["valid"])
    assert 0 <= result["test"]["ndcg@10"] <= 1
    assert 1 <= result["best_epoch"] <= 4
    study = optuna.load_study(study_name=result["study_name"], storage=storage)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert completed
    for trial in completed:  # the pruner saw the validation NDCG of every epoch trained
        assert sorted(trial.intermediate_values) == list(
            range(1, len(trial.intermediate_values) + 1))
    again = tune_and_evaluate_transformer(split, items, config, None, tmp_path,
                                          n_items=items.height)
    assert again["n_trials"] == 2  # resumed: no trial added
    assert again["best_params"] == result["best_params"]


def test_a_study_under_other_evaluation_settings_is_another_study(shop):
    split, items = shop
    config = _config("sqlite://")
    names = {study_name(split, config, [10, 20], False, items),
             study_name(split, config, [10, 20], True, items),  # seen items removed
             study_name(split, config, [20, 50], False, items),  # other cut-offs
             study_name(split, config, [10, 20], False, items.head(10)),  # another catalogue
             study_name(split, config, [10, 20], False, None),
             study_name(split, config, [10, 20], False, items, "recall@20")}  # another metric
    assert len(names) == 6
    assert study_name(split, config, [10, 20], False, items) == study_name(
        split, config, [10, 20], False, items, "ndcg@10")  # the default primary metric
    assert study_name(split, config, [10, 20], False, items) == study_name(
        split, config.model_copy(update={"n_trials": 9}), [10, 20], False, items)  # the budget


def test_pruner_stops_a_trial_after_an_epoch(shop, tmp_path):
    split, items = shop
    config = _config("unused", space={**TINY_SPACE, "epochs": [4, 4]})
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=1.0, n_warmup_steps=1))
    objective = _Objective(split, items, config, TrialLogger(None, "transformer"), [10], False,
                           None)
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert 1 <= len(trial.intermediate_values) < 4  # stopped before its 4 epochs


@pytest.mark.parametrize("primary", ["ndcg@10", "recall@20"])
def test_early_stopping_pruning_and_the_trial_value_follow_the_primary_metric(shop, primary):
    split, items = shop  # the time split: seen items are kept, targets are the window's items
    assert split.protocol == "time"
    config = _config("unused", space={**TINY_SPACE, "epochs": [4, 4]}, patience=4)
    study = optuna.create_study(direction="maximize")
    objective = _Objective(split, items, config, TrialLogger(None, "transformer"), [10, 20], False,
                           items.height, primary)
    study.optimize(objective, n_trials=1)
    model, trial = objective.best_model, study.trials[0]
    # the trial's value is the run's own validation scoring of the kept weights
    scored = full_metrics(model, split.train, split.valid_targets, [10, 20], False, items.height)
    assert trial.value == scored[primary]
    # every epoch, early stopping and the pruner saw that metric under the same protocol
    per_epoch = {h["epoch"]: h[primary] for h in model.history_}
    assert trial.intermediate_values == per_epoch
    assert model.best_epoch_ == max(per_epoch, key=lambda e: (per_epoch[e], -e))
    assert per_epoch[model.best_epoch_] == pytest.approx(trial.value, abs=1e-12)
    # with the seen items removed the same model scores otherwise: the protocol decides
    removed = full_metrics(model, split.train, split.valid_targets, [10, 20], True, items.height)
    assert removed[primary] != scored[primary]


def test_saved_source_proposes_the_same_items(shop, tmp_path):
    split, items = shop
    config = _config(f"sqlite:///{tmp_path / 'optuna.db'}", n_trials=1)
    result = tune_and_evaluate_transformer(split, items, config, None, tmp_path)
    earliest = training_windows(split, 2)[-1][0]
    training, serving = ranker_sources(split, items, result, config, earliest)
    users = split.test_targets[USER].unique().sort().head(20)
    proposed = serving(split.test_history, users)["seq"]
    assert proposed.columns == [USER, ITEM, "score"]
    assert proposed.group_by(USER).len()["len"].max() <= config.n_candidates
    serving.save(tmp_path / "source")
    loaded = SequenceSource.load(tmp_path / "source")
    assert loaded(split.test_history, users)["seq"].equals(proposed)
    # asked shard by shard about the shard's users (engine dask): what one call proposes
    parts = []
    for shard in range(3):
        own = users.filter(shard_of(users, 3) == shard)
        history = split.test_history.filter(pl.col(USER).is_in(own.implode()))
        parts.append(external_candidates(tmp_path / "source", history, own)[0]["seq"])
    assert_frame_equal(pl.concat(parts).sort(USER, ITEM), proposed.sort(USER, ITEM))
    # the training source never saw anything after the earliest window's history
    assert training.model.sequences_.items.size < serving.model.sequences_.items.size


def test_ranker_keeps_the_transformer_source_for_serving(shop, tmp_path):
    split, items = shop
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    seq_config = _config(storage, n_trials=1)
    seq = tune_and_evaluate_transformer(split, items, seq_config, None, tmp_path)
    ranker = RankerConfig(n_trials=1, num_boost_round=20, early_stopping_rounds=5,
                          extra_windows=1, storage=storage, num_threads=1)
    earliest = training_windows(split, ranker.extra_windows)[-1][0]
    external, source = ranker_sources(split, items, seq, seq_config, earliest)
    result = tune_and_evaluate_lgbm(split, items, ranker, None, tmp_path, external=external,
                                    source=source)
    assert "seq" in result["candidate_recall"]["test"]
    assert result["study_name"].startswith("lgbm_ranker-seq-")  # not the study without it
    pipe = RankingPipeline.load(tmp_path / "models" / "lgbm_ranker")
    assert isinstance(pipe.source, SequenceSource)
    users = split.test_targets[USER].unique().sort().head(10)
    frame = pipe.candidate_frame(users)
    assert "rank_seq" in frame.columns
    assert frame["rank_seq"].is_not_null().any()
    recs = pipe.recommend(users, k=5)
    assert recs.group_by(USER).len()["len"].to_list() == [5] * users.len()


def test_search_space_errors_name_the_problem():
    with pytest.raises(ValidationError, match="n_heads must divide"):
        SearchSpace(hidden_size=[30], n_heads=[4])
    with pytest.raises(ValidationError, match="dropout"):
        SearchSpace(dropout=(0.5, 0.1))


def test_time_budget_stops_a_running_trial_after_its_epoch(shop, tmp_path):
    split, items = shop
    config = _config(f"sqlite:///{tmp_path / 'optuna.db'}", n_trials=3, timeout_s=0.001,
                     space={**TINY_SPACE, "epochs": [4, 4]})
    result = tune_and_evaluate_transformer(split, items, config, None, tmp_path)
    assert result["n_trials"] == 1  # no trial starts after the budget
    assert result["best_epoch"] == 1  # and the running one stopped after one epoch


def test_the_selection_holdout_trains_nothing_in_the_transformer(shop, tmp_path):
    from tasks.splitting.split import Selection
    from tests.test_tune import altered_selection

    split, items = shop
    selection = Selection(0.3, seed=11)
    runs = [tune_and_evaluate_transformer(s, items, _config("sqlite://"), None, tmp_path / str(i),
                                          n_items=items.height, selection=selection)
            for i, s in enumerate((split, altered_selection(split, items, selection)))]
    assert runs[0]["best_params"] == runs[1]["best_params"]
    assert runs[0]["best_epoch"] == runs[1]["best_epoch"]  # early stopping did not see them
    assert runs[0]["test"] == runs[1]["test"]
    assert runs[0]["valid"] != runs[1]["valid"]
    assert runs[0]["valid"]["users"] == selection.targets(split)["user_id"].n_unique()
