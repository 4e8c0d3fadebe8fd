"""The train flow end to end: real Prefect server (test harness), real MLflow store, real data."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from flows.cli import run
from flows.config import TrainConfig, data_name, load_config
from flows.train import train
from models.errors import ConfigError

BASELINES = ("popularity", "recent_popularity", "covisitation", "buy_again")
pytestmark = pytest.mark.usefixtures("prefect_server")


def _config(tmp_path, **overrides) -> TrainConfig:
    overrides.setdefault("ranker__enabled", False)  # each model family has a test of its own
    overrides.setdefault("transformer__enabled", False)
    return load_config(None, output_dir=str(tmp_path / "outputs"), **overrides)


def test_train_tunes_the_lgbm_ranker_beside_the_baselines(tmp_path, mlflow_store, demo_shop_dir):
    config = _config(tmp_path, data__path=str(demo_shop_dir), data__format="parquet",
                     ranker__enabled=True, ranker__n_trials=2,
                     ranker__storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    result = train(config)
    assert set(result["scores"]) == {*BASELINES, "content", "lgbm_ranker"}
    client = MlflowClient(mlflow_store)
    run = client.get_run(result["run_id"])
    metrics = run.data.metrics
    assert "lgbm_ranker.test.ndcg_at_10" in metrics
    # the catalogue's item vectors: encoded once, logged with the encoder's name
    assert run.data.params["content.encoder_name"].startswith("wordllama-")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "item_vectors")]
    assert len(list((tmp_path / "outputs" / "item-vectors").glob("*.parquet"))) == 1
    assert any(key.startswith("lgbm_ranker.candidates.test.recall") for key in metrics)
    trials = client.search_runs(
        [result["experiment_id"]], f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert len(trials) == 2


TINY_TRANSFORMER = {"space": {"hidden_size": [16], "n_blocks": [1], "n_heads": [1],
                              "max_len": [10], "n_negatives": [64], "epochs": [2, 3]},
                    "model": {"device": "cpu", "num_threads": 1}}


def test_train_tunes_the_transformer_and_feeds_its_candidates_to_the_ranker(
        tmp_path, mlflow_store, demo_shop_dir):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = _config(tmp_path, data__path=str(demo_shop_dir), data__format="parquet",
                     transformer__enabled=True, transformer__n_trials=2,
                     transformer__storage=storage, transformer__extra=TINY_TRANSFORMER,
                     ranker__enabled=True, ranker__n_trials=1, ranker__storage=storage,
                     ranker__extra={"num_boost_round": 30, "extra_windows": 1},
                     registry__families=["transformer"], registry__latency_requests=20)
    result = train(config)
    assert set(result["scores"]) == {*BASELINES, "content", "transformer", "lgbm_ranker"}
    # every family is selected on the same validation users (the selection holdout)
    selected = {name: stages["valid"]["users"] for name, stages in result["scores"].items()}
    assert len(set(selected.values())) == 1, selected
    client = MlflowClient(mlflow_store)
    metrics = client.get_run(result["run_id"]).data.metrics
    for stage in ("valid", "test"):
        assert f"transformer.{stage}.ndcg_at_10" in metrics
    assert "lgbm_ranker.candidates.test.recall_seq" in metrics  # the transformer as a source
    trials = client.search_runs(
        [result["experiment_id"]],
        f"tags.mlflow.parentRunId = '{result['run_id']}' and tags.`model.family` = 'transformer'")
    assert len(trials) == 2
    finished = [t for t in trials if t.info.status == "FINISHED"]
    curve = client.get_metric_history(finished[0].info.run_id, "epoch.ndcg_at_10")
    assert [m.step for m in curve] == list(range(1, len(curve) + 1))  # one point per epoch
    assert {"epoch.loss", "epoch.samples_per_s", "ndcg_at_10"} <= set(finished[0].data.metrics)
    release = result["release"]  # the transformer is servable: packaged, registered, promoted
    assert (release["family"], release["decision"]) == ("transformer", "promoted")


def test_train_on_demo_shop_logs_everything(tmp_path, mlflow_store, demo_shop_dir):
    config = _config(tmp_path, data__path=str(demo_shop_dir), data__format="parquet",
                     data__name="demo")
    result = train(config)

    client = MlflowClient(mlflow_store)
    mlrun = client.get_run(result["run_id"])
    assert mlrun.info.status == "FINISHED"
    metrics = mlrun.data.metrics
    for name in BASELINES:
        for stage in ("valid", "test"):
            for metric in ("ndcg_at_10", "recall_at_20", "hitrate_at_10", "map_at_10",
                           "mrr_at_10", "coverage_at_10", "novelty_at_10"):
                assert f"{name}.{stage}.{metric}" in metrics
    assert mlrun.data.tags["protocol"] == "time"
    assert len(mlrun.data.tags["data.fingerprint"]) == 64
    assert mlrun.data.params["data.format"] == "parquet"
    assert mlrun.inputs.dataset_inputs[0].dataset.name == "demo"
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"config.json", "package_versions.json", "metrics.md", "validation"} <= artifacts
    # the demo shop's items trend and fade: recent popularity beats all-time popularity
    assert metrics["recent_popularity.test.ndcg_at_10"] > metrics["popularity.test.ndcg_at_10"]
    assert metrics["covisitation.test.coverage_at_10"] > metrics["popularity.test.coverage_at_10"]


def test_same_seed_gives_same_metrics(tmp_path, mlflow_store, demo_shop_dir):
    config = _config(tmp_path, data__path=str(demo_shop_dir), data__format="parquet")
    first, second = train(config)["scores"], train(config)["scores"]
    for model in BASELINES:
        for key, value in first[model]["test"].items():
            if key != "fit_seconds":
                assert second[model]["test"][key] == value


def test_train_on_taobao_sample(tmp_path, mlflow_store, shared_data):
    config = _config(tmp_path, data__path=str(shared_data / "taobao_userbehavior_sample"),
                     data__format="taobao")
    result = train(config)
    assert result["protocol"] == "time"
    scores = result["scores"]
    assert set(scores) == set(BASELINES)
    assert all(0 <= s["test"]["ndcg@10"] <= 1 for s in scores.values())
    experiment = MlflowClient(mlflow_store).get_experiment(result["experiment_id"])
    assert experiment.name == data_name(config)
    assert experiment.name.startswith("taobao-taobao_userbehavior_sample-")


def test_cli_train_with_failing_validation_leaves_no_model(tmp_path, mlflow_store, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "user_id,item_id,event_type,timestamp,price\n"
        "u1,i1,view,2024-01-01T10:00:00,5.0\n"
        "u1,i2,purchase,2024-01-02T10:00:00,-3.0\n"
        "u2,i1,view,2024-01-03T10:00:00,4.0\n"
    )
    code = run(["train", "--data", str(bad), "--format", "csv",
                "--output-dir", str(tmp_path / "outputs")])
    err = capsys.readouterr().err
    assert code == 2
    assert "price" in err
    assert "Traceback" not in err
    assert not list((tmp_path / "outputs").rglob("models"))
    client = MlflowClient(mlflow_store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "report.md" in {a.path.split("/")[-1]
                           for a in client.list_artifacts(runs[0].info.run_id, "validation")}


def test_cli_train_on_missing_path_is_one_clear_paragraph(tmp_path, mlflow_store, capsys):
    code = run(["train", "--data", str(tmp_path / "nope.csv"), "--format", "csv",
                "--output-dir", str(tmp_path / "outputs")])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not exist" in err
    assert "Traceback" not in err
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not list(outputs.rglob("*.parquet"))


def test_config_file_and_flags(tmp_path):
    file = tmp_path / "cfg.yaml"
    file.write_text("split: {protocol: time, valid_days: 2, test_days: 1}\nseed: 7\n")
    config = load_config(file, seed=9)
    assert config.split.valid_days == 2
    assert config.seed == 9
    file.write_text("split: {protocl: time}\n")
    with pytest.raises(Exception, match="protocl"):
        load_config(file)



def test_a_test_user_share_out_of_range_is_one_clear_error(tmp_path, mlflow_store, capsys):
    assert load_config(None, evaluation__test_user_share=0.1).evaluation.test_user_share == 0.1
    outputs = tmp_path / "outputs"
    code = run(["train", "--test-user-share", "0", "--output-dir", str(outputs)])
    err = capsys.readouterr().err
    assert code == 2
    assert "evaluation.test_user_share" in err
    assert "Traceback" not in err
    assert not outputs.exists()


def test_an_unknown_primary_metric_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="'foo@10' is not a metric shoprank computes") as err:
        load_config(None, evaluation__primary_metric="foo@10")
    assert "ndcg@K, recall@K" in str(err.value)
    assert load_config(None, evaluation__primary_metric="mrr@20",
                       evaluation__ks=[10, 20]).evaluation.primary_metric == "mrr@20"


def test_cut_offs_above_serve_max_k_are_refused_before_anything_runs(
        tmp_path, mlflow_store, capsys):
    with pytest.raises(ConfigError, match=r"invalid configuration: evaluation\.ks") as err:
        load_config(None, evaluation__ks=[10, 300])
    assert "serve.max_k 200 (300)" in str(err.value)
    assert "Lower those K to 200 or less, or raise serve.max_k to 300" in str(err.value)
    assert load_config(None, evaluation__ks=[10, 300], serve__max_k=300).evaluation.ks == [
        10, 300]

    file = tmp_path / "cfg.yaml"
    file.write_text("evaluation: {ks: [10, 300]}\n")
    outputs = tmp_path / "outputs"
    code = run(["train", "--config", str(file), "--output-dir", str(outputs)])
    err = capsys.readouterr().err
    message = err[err.index("shoprank train failed"):].strip()
    assert code == 2
    assert "\n" not in message  # one paragraph
    assert "evaluation.ks" in message
    assert "serve.max_k" in message
    assert "Traceback" not in err
    assert not outputs.exists()
    client = MlflowClient(mlflow_store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_shop_is_named_by_its_format_stem_and_resolved_path(tmp_path, shared_data):
    sample = shared_data / "taobao_userbehavior_sample" / "UserBehavior_sample.csv.gz"
    copies = []
    for folder in ("north", "south"):
        (tmp_path / folder).mkdir()
        copies.append(tmp_path / folder / sample.name)
        copies[-1].write_bytes(sample.read_bytes())

    def name(path, fmt="taobao", **overrides):
        return data_name(load_config(None, data__path=str(path), data__format=fmt, **overrides))

    north, south = name(copies[0]), name(copies[1])
    assert north != south  # two logs of one format: two experiments, two champions
    assert north.startswith("taobao-UserBehavior_sample-")
    assert len(north.rsplit("-", 1)[1]) == 6
    assert name(copies[0]) == north
    relative = copies[0].relative_to(tmp_path)  # the same file by another spelling
    assert name(tmp_path / "south" / ".." / relative) == north
    assert name(tmp_path / "north", "csv").startswith("north-")  # csv/parquet: no format
    assert name(copies[0], data__name="tb") == "tb"
    assert data_name(load_config(None)) == "demo"
