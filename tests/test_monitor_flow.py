"""``shoprank monitor`` end to end: a champion trained before day 45, watched for three days.

Two demo shops of the same seed, one with a regime change on day 45 (``shift_day``): the
champion of each is trained on the events before day 45; the monitor reads the events up to day
48. The unshifted shop passes every check (exit 0); the shifted one is flagged (exit 3) for decay
and drift, sends ``shoprank.model.decayed``, and both leave their daily series on an MLflow run.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import polars as pl
import pytest
from mlflow import MlflowClient

from flows.cli import run
from tasks.data.demo_data import generate_shop
from tasks.release.registry import DECAYED
from tests.test_release_loop import model_events

pytestmark = pytest.mark.usefixtures("prefect_server")


def _shop_until(events: pl.DataFrame, items: pl.DataFrame, day: int, folder: Path) -> Path:
    folder.mkdir(parents=True)
    cut = events["timestamp"].min() + dt.timedelta(days=day)
    events.filter(pl.col("timestamp") < cut).write_parquet(folder / "events.parquet")
    items.write_parquet(folder / "items.parquet")
    return folder


@pytest.mark.slow  # two trains and two monitor runs: `make test-release` runs it
@pytest.mark.parametrize(("shift_day", "expected"), [(None, 0), (45, 3)])
def test_monitor_flags_a_shifted_shop_and_not_an_unshifted_one(tmp_path, mlflow_store, capsys,
                                                               shift_day, expected):
    start = dt.datetime.now(dt.UTC)
    events, items = generate_shop(40_000, seed=3, shift_day=shift_day)
    past = _shop_until(events, items, 45, tmp_path / "past")
    later = _shop_until(events, items, 48, tmp_path / "later")
    common = ["--format", "parquet", "--name", "watched", "--output-dir", str(tmp_path / "out")]
    assert run(["train", "--data", str(past), *common, "--no-ranker", "--no-transformer"]) == 0
    capsys.readouterr()
    assert run(["monitor", "--data", str(later), *common]) == expected
    printed = capsys.readouterr().out
    assert "decay ndcg@10" in printed
    assert ("FLAGGED" in printed) == bool(expected)
    client = MlflowClient(mlflow_store)
    [watch] = client.search_runs(
        [client.get_experiment_by_name("watched").experiment_id],
        "tags.`shoprank.monitor_of` = 'shoprank/2'")
    series = client.get_metric_history(watch.info.run_id, "realised.ndcg_at_10")
    assert len(series) >= 3  # one point a day (the cut falls inside a calendar day)
    assert [a.path for a in client.list_artifacts(watch.info.run_id, "monitor")]
    decayed = [e for e in model_events("2", DECAYED) if e.occurred >= start]
    assert len(decayed) == (1 if expected else 0)
    if expected:
        assert decayed[0].payload["decayed"]
    shutil.rmtree(tmp_path / "out")


def test_monitor_without_a_champion_is_one_clear_paragraph(tmp_path, mlflow_store, capsys):
    code = run(["monitor", "--model-name", "nothing", "--output-dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "'nothing' has no champion" in err
    assert "shoprank train" in err
    assert "Traceback" not in err
