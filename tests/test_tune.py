from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import polars as pl
import pytest

from tasks.data.demo_data import generate_shop
from tasks.ranking.reranker import RankerConfig, RankingPipeline
from tasks.ranking.study import NEW_ITEM_OFFSETS, finished_trials
from tasks.ranking.tune import tune_and_evaluate_lgbm
from tasks.splitting.split import cut_times, time_split

ROOT = Path(__file__).resolve().parents[1]
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.fixture(scope="module")
def shop():
    events, items = generate_shop(4_000, seed=3)
    return time_split(events, *cut_times(events)), items


def _config(storage: str, **overrides) -> RankerConfig:
    settings = {"n_trials": 3, "num_boost_round": 40, "early_stopping_rounds": 10,
                "extra_windows": 1, "num_threads": 1, "check_features": False,
                "pruner_startup_trials": 2, "pruner_warmup_rounds": 5, "storage": storage,
                "seed": 11}
    return RankerConfig.model_validate({**settings, **overrides})


def test_tune_logs_trials_as_nested_runs_and_repeats_with_the_seed(shop, tmp_path, mlflow_store):
    from mlflow import MlflowClient

    from tasks import tracking

    split, items = shop
    client = MlflowClient(mlflow_store)
    experiment = tracking.ensure_experiment("tiny-shop", mlflow_store)
    parent = client.create_run(experiment).info.run_id
    config = _config(f"sqlite:///{tmp_path / 'a.db'}", check_features=True)
    first = tune_and_evaluate_lgbm(split, items, config, parent, tmp_path / "run1", n_items=100)

    assert first["test"]["ndcg@10"] > 0
    assert first["test"]["users"] == split.test_targets["user_id"].n_unique()
    assert 0 < first["candidate_recall"]["test"]["all"] <= 1
    assert set(first["valid"]) >= {"ndcg@10", "recall@20"}
    trials = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(trials) == 3
    assert all("learning_rate" in run.data.params for run in trials)
    low, high = config.learning_rate_range
    assert all(low <= float(run.data.params["learning_rate"]) <= high for run in trials)
    logged = {a.path for a in client.list_artifacts(parent, "lgbm_ranker")}
    assert {"lgbm_ranker/optimization_history.png", "lgbm_ranker/param_importances.png",
            "lgbm_ranker/feature_importance.png", "lgbm_ranker/feature_importance.csv"} <= logged
    assert client.get_run(parent).data.metrics["lgbm_ranker.test.ndcg_at_10"] == pytest.approx(
        first["test"]["ndcg@10"])

    second = tune_and_evaluate_lgbm(split, items, _config(f"sqlite:///{tmp_path / 'b.db'}"),
                                    None, tmp_path / "run2", n_items=100)
    assert second["best_params"] == first["best_params"]
    assert second["test"] == first["test"]
    assert second["valid"] == first["valid"]


def test_pipeline_fits_recommends_and_round_trips(shop, tmp_path):
    split, items = shop
    pipe = RankingPipeline(_config("sqlite://"), items).fit(split)
    users = split.test_targets["user_id"].unique().sort().head(5).to_list() + ["nobody"]
    recs = pipe.recommend(users, k=7)
    assert recs.columns == ["user_id", "item_id", "score", "rank"]
    assert recs.group_by("user_id").len()["len"].to_list() == [7] * 6
    pipe.save(tmp_path / "pipeline")
    loaded = RankingPipeline.load(tmp_path / "pipeline")
    assert loaded.recommend(users, k=7).equals(recs)
    seen = split.test_history.select("user_id", "item_id").unique()
    unseen = loaded.recommend(users, k=7, exclude_seen=True)
    assert unseen.join(seen, on=["user_id", "item_id"], how="semi").is_empty()


def test_a_users_scores_do_not_depend_on_who_else_is_asked(shop):
    split, items = shop
    pipe = RankingPipeline(_config("sqlite://"), items).fit(split)
    users = split.test_targets["user_id"].unique().sort().to_list()
    together = pipe.recommend(users, k=10)
    for user in users[:3]:
        alone = pipe.recommend([user], k=10)
        assert alone.equals(together.filter(pl.col("user_id") == user)), user


def test_cut_offs_without_10_tune_and_report_only_those(shop, tmp_path):
    split, items = shop
    result = tune_and_evaluate_lgbm(split, items, _config("sqlite://", n_trials=1), None,
                                    tmp_path / "run", ks=[20, 50], n_items=100)
    for stage in ("valid", "test"):
        cut_offs = {key.split("@")[1] for key in result[stage] if "@" in key}
        assert cut_offs == {"20", "50"}, stage


def test_recipe_refits_the_tuned_ranker_without_a_study(shop, tmp_path):
    from tasks.ranking.tune import score_window
    from tasks.release.recipes import fit_recipe, ranker_recipe, release_split

    split, items = shop
    result = tune_and_evaluate_lgbm(split, items, _config("sqlite://", n_trials=2), None,
                                    tmp_path / "run", n_items=100)
    recipe = ranker_recipe(result, None)
    refit = RankingPipeline.load(fit_recipe(recipe, split, items, tmp_path / "refit"))
    assert refit.ranker_.new_item_offset == result["new_item_offset"] == recipe["new_item_offset"]
    assert score_window(refit, split.test_targets, [10, 20], 100)[0] == result["test"]
    # the released copy: the test window is its last training window, every event its history
    events = pl.concat([split.test_history, split.test_history.head(0)])
    shifted = release_split(split, events)
    assert shifted.train.equals(split.test_history)
    assert shifted.valid_targets.equals(split.test_targets)
    fit_recipe(recipe, shifted, items, tmp_path / "released")
    assert (tmp_path / "released" / "recipe.json").is_file()


def test_the_content_source_feeds_the_ranker_and_its_recipe_refits(shop, tmp_path):
    """Content candidates: features of their own, another study, kept by the saved pipeline.

    The catalogue's vectors travel with the pipeline (a set of sources saved by name); the
    recipe encodes the catalogue again and refits the same ranker.
    """
    from models.item_text import WordLlamaEncoder, encode_items
    from tasks.ranking.external_sources import ContentSource, SourceSet, combined
    from tasks.ranking.tune import score_window
    from tasks.release.recipes import fit_recipe, ranker_recipe

    split, items = shop
    settings = {"encoder": "wordllama", "n": 30}
    source = combined(ContentSource(encode_items(items, WordLlamaEncoder()), 30, False,
                                    "wordllama"))
    assert isinstance(source, SourceSet)  # alone, content is saved as a set all the same
    result = tune_and_evaluate_lgbm(split, items, _config("sqlite://", n_trials=2), None,
                                    tmp_path / "run", n_items=100, external=source,
                                    source=source, content=settings)
    assert result["study_name"].startswith("lgbm_ranker-content-time-")
    assert result["candidate_recall"]["test"]["content"] > 0
    loaded = RankingPipeline.load(Path(result["model_dir"]))
    assert isinstance(loaded.source, SourceSet)
    assert [s.name for s in loaded.source.sources] == ["content"]
    assert score_window(loaded, split.test_targets, [10, 20], 100)[0] == result["test"]

    recipe = ranker_recipe(result, None, None, settings)
    refit = RankingPipeline.load(fit_recipe(recipe, split, items, tmp_path / "refit"))
    assert refit.ranker_.new_item_offset == loaded.ranker_.new_item_offset
    assert loaded.ranker_.new_item_offset == result["new_item_offset"]
    assert len(result["new_item_offsets"]) == len(NEW_ITEM_OFFSETS)  # its trade-off, kept
    assert score_window(refit, split.test_targets, [10, 20], 100)[0] == result["test"]
    # every candidate is scored by its text (the selection's lists too, before the source is kept)
    assert {"ui_text_last", "ui_text_recent", "ui_text_bought"} <= set(refit.ranker_.features_)
    from tasks.splitting.split import Selection

    selected = tune_and_evaluate_lgbm(split, items, _config("sqlite://", n_trials=1), None,
                                      tmp_path / "selected", n_items=100, external=source,
                                      source=source, content=settings,
                                      selection=Selection(0.3, seed=11))
    assert selected["valid"]["users"] > 0


def altered_selection(split, items, selection):
    """``split`` with the selection users' validation targets replaced by another item."""
    from tasks.splitting.split import Split

    changed = selection.targets(split).with_columns(
        pl.lit(items["item_id"][0]).alias("item_id")).unique()
    return Split(split.protocol, split.train,
                 pl.concat([selection.tuning(split).valid_targets, changed]),
                 split.test_history, split.test_targets, split.info)


def test_the_selection_holdout_trains_nothing(shop, tmp_path):
    from tasks.splitting.split import Selection

    split, items = shop
    selection = Selection(0.3, seed=11)
    runs = [tune_and_evaluate_lgbm(s, items, _config("sqlite://", n_trials=2), None,
                                   tmp_path / str(i), n_items=100, selection=selection)
            for i, s in enumerate((split, altered_selection(split, items, selection)))]
    assert runs[0]["best_params"] == runs[1]["best_params"]
    assert runs[0]["test"] == runs[1]["test"]  # the same model: it learned nothing from them
    assert runs[0]["valid"] != runs[1]["valid"]  # selected on exactly those targets
    assert runs[0]["valid"]["users"] == selection.targets(split)["user_id"].n_unique()


def _transformer_recipe(lr: float = 0.01, epochs: int = 3, **settings) -> dict:
    """What the train flow records of a transformer that feeds the ranker's candidates."""
    from tasks.release.recipes import transformer_recipe
    from tasks.transformer.sequence import SequenceConfig

    return transformer_recipe(SequenceConfig.model_validate(settings), {
        "best_params": {"hidden_size": 32, "lr": lr}, "best_epoch": epochs,
        "exclude_seen": False})


def test_the_study_name_follows_the_selection_and_the_transformer_recipe(shop):
    from tasks.ranking.tune import study_name
    from tasks.splitting.split import Selection

    split, items = shop
    config = _config("sqlite://")

    def name(selection=None, recipe=None):
        return study_name(split, config, ["seq"], [10, 20], items, selection, recipe)

    selection, recipe = Selection(0.2, 11), _transformer_recipe()
    names = [name(selection, recipe),
             name(Selection(0.3, 11), recipe),  # another share: other users tune
             name(Selection(0.2, 12), recipe),  # another draw
             name(selection, _transformer_recipe(lr=0.02)),  # another best trial
             name(selection, _transformer_recipe(epochs=4)),
             name(selection, _transformer_recipe(n_candidates=20)),  # another setting
             name(selection)]  # the recipe unknown
    assert len(set(names)) == len(names), names
    assert name(Selection(0.2, 11), _transformer_recipe()) == names[0]
    # the transformer's budget alone changes no candidate: the ranker's study resumes
    assert name(selection, _transformer_recipe(n_trials=9, timeout_s=None)) == names[0]


def test_the_sharded_study_name_follows_the_selection_and_the_transformer_recipe(tmp_path):
    import json

    from tasks.ranking.rank_shards import sharded_study_name
    from tasks.splitting.split import Selection

    (tmp_path / "info.json").write_text(json.dumps({"protocol": "time", "summary": {}}))
    config = _config("sqlite://")
    names = [sharded_study_name(tmp_path, config, selection)
             for selection in (Selection(0.2, 11), Selection(0.3, 11), Selection(0.2, 12))]
    assert len(set(names)) == 3
    assert sharded_study_name(tmp_path, config, Selection(0.2, 11)) == names[0]
    fed = [sharded_study_name(tmp_path, config, Selection(0.2, 11), recipe)
           for recipe in (_transformer_recipe(), _transformer_recipe(lr=0.02),
                          _transformer_recipe(n_candidates=20))]
    assert len({*names, *fed}) == 6
    assert fed[0].startswith("lgbm_ranker-seq-sharded-")
    # the transformer's budget alone changes no candidate: the ranker's study resumes
    assert sharded_study_name(tmp_path, config, Selection(0.2, 11),
                              _transformer_recipe(n_trials=9)) == fed[0]


def test_another_selection_starts_another_study(shop, tmp_path):
    from tasks.splitting.split import Selection

    split, items = shop
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = _config(storage, n_trials=1)
    runs = [tune_and_evaluate_lgbm(split, items, config, None, tmp_path / f"run{i}",
                                   n_items=100, selection=selection)
            for i, selection in enumerate((Selection(0.2, 11), Selection(0.3, 11)))]
    assert runs[0]["study_name"] != runs[1]["study_name"]
    # no trial early-stopped on what are now selection users is resumed: two studies
    assert sorted(optuna.get_all_study_names(storage)) == sorted(r["study_name"] for r in runs)
    again = tune_and_evaluate_lgbm(split, items, config, None, tmp_path / "again", n_items=100,
                                   selection=Selection(0.2, 11),
                                   source_recipe=_transformer_recipe())
    assert again["study_name"] not in {run["study_name"] for run in runs}


_STUDY_SCRIPT = """
import os, signal, sys
import tasks.ranking.tune as tune
from tasks.data.demo_data import generate_shop
from tasks.splitting.split import cut_times, time_split

new_ranker = tune.RankingPipeline.new_ranker
calls = 0
def starting(self, *args, **kwargs):  # every trial, pruned or not, starts here: killed in the 5th
    global calls
    calls += 1
    if calls == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return new_ranker(self, *args, **kwargs)
tune.RankingPipeline.new_ranker = starting

events, items = generate_shop(4_000, seed=3)
split = time_split(events, *cut_times(events))
config = tune.RankerConfig.model_validate_json(sys.argv[1])
tune.tune_and_evaluate_lgbm(split, items, config, None, sys.argv[2])
"""


def test_killed_study_resumes_from_its_storage(shop, tmp_path):
    split, items = shop
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = _config(storage, n_trials=8, study_name="resume-me")
    script = tmp_path / "study.py"
    script.write_text(textwrap.dedent(_STUDY_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the study kills itself (SIGKILL) as its fifth trial starts: no race with a watcher that
    # polls the storage
    proc = subprocess.run([sys.executable, str(script), config.model_dump_json(),
                           str(tmp_path / "killed")], cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    study = optuna.load_study(study_name="resume-me", storage=storage)
    assert finished_trials(study) == 4
    before = {t.number: t.params for t in study.trials if t.state.is_finished()}

    result = tune_and_evaluate_lgbm(split, items, config, None, tmp_path / "resumed")
    study = optuna.load_study(study_name="resume-me", storage=storage)
    assert finished_trials(study) == 8
    assert result["n_trials"] >= 8
    after = {t.number: t.params for t in study.trials}
    assert all(after[number] == params for number, params in before.items())


def test_config_is_checked():
    with pytest.raises(ValueError, match="holdout_share"):
        RankerConfig(holdout_share=1.5)
    with pytest.raises(ValueError, match="extra"):
        RankerConfig(surprise=1)
    assert isinstance(RankerConfig().candidates.n_candidates, int)


def test_a_learning_rate_range_upside_down_is_refused():
    with pytest.raises(ValueError, match="learning_rate_range"):
        RankerConfig(learning_rate_range=(0.2, 0.03))


def _held_out(new_targets: bool):
    """Held-out groups of two windows: 6 candidates each, two of them without events.

    The targets are a new candidate of each group (``new_targets``) or an old one; the ranker
    learns only that the first candidate is the best, so the others tie and their item ids
    order them.
    """
    import numpy as np

    from tasks.ranking.reranker import TrainingData

    rows = []
    for window in (0, 1):
        for u in range(20):
            for c in range(6):
                rows.append({"query": f"{window}:u{u}", "user_id": f"u{u}", "item_id": f"i{c}",
                             "signal": 6.0 - c + 0.1 * np.sin(u + c), "i_n_events": 0.0
                             if c >= 4 else 10.0, "label": 1 if c == 0 else 0})
    holdout = pl.DataFrame(rows)
    item = "i4" if new_targets else "i1"
    targets = holdout.filter(pl.col("item_id") == item).select("query", "item_id")
    return TrainingData(holdout, holdout, targets, {})


def test_the_ranker_offset_is_the_largest_within_the_loss():
    from models.lgbm_ranker import LightGBMRanker
    from tasks.ranking.tune import choose_new_item_offset

    data = _held_out(new_targets=True)
    ranker = LightGBMRanker({"min_data_in_leaf": 2}, num_boost_round=10, features=[
        "signal", "i_n_events"], num_threads=1, group="query").fit(data.train)
    offset, _, grid = choose_new_item_offset(ranker, data, [1, 5], "ndcg@1", 0.02)
    assert [row["offset"] for row in grid] == list(NEW_ITEM_OFFSETS)
    # the new items are every target: an offset that lifts them over the old ones is the best,
    # and the largest of those is kept
    assert grid[0]["ndcg@1"] == 0.0
    assert grid[-1]["ndcg@1"] == 1.0
    assert offset == NEW_ITEM_OFFSETS[-1] == ranker.new_item_offset
    assert grid[-1]["new.recall@5"] == 1.0

    data = _held_out(new_targets=False)  # nobody wants the new items: they stay where they are
    offset, _, grid = choose_new_item_offset(ranker, data, [1, 5], "ndcg@1", 0.02)
    assert offset == 0.0 == ranker.new_item_offset
    assert grid
    assert all(row["new.recall@5"] == 0.0 for row in grid)


def test_the_compiled_trees_score_as_lightgbm(shop, tmp_path, monkeypatch, caplog):
    from models import lgbm_ranker
    from models.errors import ConfigError

    monkeypatch.setenv("SHOPRANK_TREES_CACHE", str(tmp_path / "cache"))
    split, items = shop
    pipe = RankingPipeline(_config("sqlite://", compile_trees="never"), items).fit(split)
    ranker = pipe.ranker_
    frame = pipe.candidate_frame(split.test_targets["user_id"].unique())
    lightgbm = {trees: ranker.predict(frame, trees) for trees in (None, 3)}
    lists = pipe.recommend(split.test_targets["user_id"].unique().to_list(), k=10)
    assert not (tmp_path / "cache").exists()

    ranker.compile_trees = "auto"  # 31 trees, a small call: LightGBM scores it
    ranker.predict(frame)
    assert not (tmp_path / "cache").exists()
    ranker.compile_trees = "always"
    for trees, expected in lightgbm.items():
        scores = ranker.predict(frame, trees)
        assert abs(scores - expected).max() <= 1e-9, trees
    assert len(list((tmp_path / "cache").glob("trees-*.so"))) == 2  # all the trees, the first 3
    assert pipe.recommend(split.test_targets["user_id"].unique().to_list(), k=10).equals(lists)
    pipe.save(tmp_path / "pipeline")
    loaded = RankingPipeline.load(tmp_path / "pipeline")  # the cached library, not compiled again
    assert loaded.ranker_.compile_trees == "always"
    assert abs(loaded.ranker_.predict(frame) - lightgbm[None]).max() <= 1e-9
    assert len(list((tmp_path / "cache").glob("*"))) == 2  # no partial library left behind

    monkeypatch.setenv("SHOPRANK_TREES_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-compiler"))
    fresh = RankingPipeline.load(tmp_path / "pipeline").ranker_
    with pytest.raises(ConfigError, match="C compiler"):
        fresh.predict(frame)
    fresh.compile_trees = "auto"
    monkeypatch.setattr(lgbm_ranker, "COMPILE_WORK", 1)
    monkeypatch.setattr(lgbm_ranker, "COMPILE_MIN_TREES", 1)
    assert abs(fresh.predict(frame) - lightgbm[None]).max() <= 1e-9  # LightGBM's, with a warning
    assert "not compiled trees" in caplog.text
    assert not list((tmp_path / "other").glob("trees-*.so"))
    fresh.compile_trees = "fast"
    with pytest.raises(ConfigError, match="compile_trees must be one of"):
        fresh.predict(frame)
