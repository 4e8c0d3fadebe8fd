"""``shoprank train`` SIGKILLed at each step of the release, then resumed or promoted.

Each round starts a real ``shoprank train`` process against a real ``prefect server start`` (its
lease repossessor frees the registry lock of a killed holder, which the test harness's server
does not run) and kills it
with SIGKILL at one step of the release (after registering the evaluated copy, after the refit,
after registering the released copy, after moving the alias, before the event). Then
``shoprank train --resume`` or ``shoprank promote`` finishes the job, and the registry must be
consistent: one champion (the release of that decision), the decision recorded once, its event
sent once, one released copy per decision, and no earlier version's files changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tasks.release.promotion import RELEASE_DECISION_TAG, STATE_TAG
from tasks.release.registry import (
    DECISION_ID_TAG,
    DECISION_TAG,
    EVALUATED,
    PROMOTED,
    REJECTED,
    alias_version,
)
from tests.test_release_loop import NAME, model_events, version_files

pytestmark = pytest.mark.slow

KILLER = """
import os, signal
from tasks.release import packaging, promotion

step = os.environ["SHOPRANK_KILL_AT"]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def then_die(module, name, when=lambda *a, **k: True):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            die()
        return result
    setattr(module, name, wrapped)

if step == "registered":  # the evaluated copy (alias challenger)
    then_die(packaging, "package_and_register", lambda *a, **k: k.get("alias", "challenger"))
elif step == "refitted":  # the winning recipe refitted on every event, not registered yet
    then_die(promotion, "fit_bundle")
elif step == "released":  # the released copy registered, the decision not told yet
    then_die(promotion, "package_and_register")
elif step == "alias-moved":
    then_die(promotion, "move_alias")
elif step == "before-event":
    promotion.announce = die
elif step == "engine-refitted":  # the engine's refit on every event, not registered yet
    then_die(promotion, "release_on_engine")
from flows.cli import main
main()
"""
# the step killed, and how the operator finishes the job
ROUNDS = [("registered", "resume"), ("refitted", "promote"), ("released", "resume"),
          ("alias-moved", "promote"), ("before-event", "resume")]


def _shoprank(argv: list[str], env: dict[str, str], cwd: Path, log: Path,
              kill_at: str | None = None) -> int:
    code = KILLER if kill_at else "from flows.cli import main; main()"
    with log.open("ab") as out:
        return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, stdout=out,
                              stderr=subprocess.STDOUT, timeout=600, check=False,
                              env={**env, "SHOPRANK_KILL_AT": kill_at or ""}).returncode


def _snapshot(uri: str, folder: Path) -> dict[str, dict[str, str]]:
    client = MlflowClient(uri)
    return {str(v.version): version_files(uri, str(v.version), folder / str(v.version))
            for v in client.search_model_versions(f"name='{NAME}'")}


def test_a_release_killed_at_any_step_ends_consistent(tmp_path, mlflow_store, demo_shop_dir,
                                                      prefect_api):
    settings = {"data": {"path": str(demo_shop_dir), "format": "parquet", "name": "demo"},
                "ranker": {"enabled": False}, "transformer": {"enabled": False},
                "registry": {"latency_requests": 20, "latency_slack_ms": 80.0,
                             "families": ["popularity"]},
                "output_dir": str(tmp_path / "outputs")}
    config = tmp_path / "first.yaml"
    config.write_text(yaml.safe_dump(settings))
    settings["registry"]["families"] = ["buy_again"]  # better: the first round promotes it
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(settings))
    scratch = tmp_path / "scratch"  # what a killed process cannot clean stays under tmp_path
    scratch.mkdir()
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "TMPDIR": str(scratch),
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "MLFLOW_TRACKING_URI": mlflow_store}
    log = tmp_path / "shoprank.log"
    assert _shoprank(["train", "--config", str(config)], env, tmp_path, log) == 0, \
        log.read_text()[-4000:]
    client = MlflowClient(mlflow_store)
    train = ["train", "--config", str(tmp_path / "train.yaml")]
    for step, recovery in ROUNDS:
        known = {str(v.version) for v in client.search_model_versions(f"name='{NAME}'")}
        code = _shoprank(train, env, tmp_path, log, kill_at=step)
        assert code == -9, f"{step}: not killed ({code}):\n{log.read_text()[-4000:]}"
        evaluated = [v for v in client.search_model_versions(f"name='{NAME}'")
                     if str(v.version) not in known and v.tags.get("release.kind") == "evaluated"]
        assert len(evaluated) == 1, step  # the kill came after registering
        version = str(evaluated[0].version)
        before = _snapshot(mlflow_store, tmp_path / f"{step}-before")
        argv = [*train, "--resume"] if recovery == "resume" else ["promote"]
        assert _shoprank(argv, env, tmp_path, log) == 0, log.read_text()[-4000:]

        tags = client.get_model_version(NAME, version).tags
        assert tags[STATE_TAG] == "complete", step
        decision_id = tags[DECISION_ID_TAG]
        champion = alias_version(client, NAME, "champion")
        assert champion == tags["promotion.released_version"], step
        released = [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")
                    if v.tags.get(RELEASE_DECISION_TAG) == decision_id]
        assert released == [champion], step  # one released copy per decision
        description = client.get_model_version(NAME, version).description
        assert description.count(f"[{decision_id[:12]}]") == 1, step
        event = PROMOTED if tags[DECISION_TAG] == "promoted" else REJECTED
        assert len(model_events(version, event, api=prefect_api)) == 1, step
        assert len(model_events(version, EVALUATED, settle_s=0, api=prefect_api)) == 1, step
        after = _snapshot(mlflow_store, tmp_path / f"{step}-after")
        assert {v: after[v] for v in before} == before, step  # no version's files changed
    kinds = [client.get_model_version(NAME, v).tags.get("release.kind")
             for v in (alias_version(client, NAME, "champion"),)]
    assert kinds in (["challenger"], ["refresh"])
