"""Recipes: what a trained model is, as settings that refit it on any history without a study.

A recipe is a small JSON document written beside each saved model (``<model>/recipe.json``):

- a baseline: ``{"family": "covisitation", "recent_days": 7.0, "exclude_seen": false}``;
- the transformer: its :class:`~tasks.transformer.sequence.SequenceConfig`, the best trial's
  parameters, its number of epochs and its offset for the items without events;
- the LightGBM re-ranker: its :class:`~tasks.ranking.reranker.RankerConfig`, the best trial's
  parameters, the number of boosting rounds of its refit, and the transformer's recipe when the
  transformer feeds its candidates (``source``).

:func:`fit_recipe` fits a recipe on a split exactly as training fits the model it serves for the
test window: on ``split.test_history``, the ranker learning from the split's training windows.
The promotion gate refits the champion's recipe on the challenger's split, so that both are
scored on a test window neither has seen; :func:`release_split` shifts a split by one window so
that the released copy is fitted on every event (its last training window is the test window).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import polars as pl

from models.baselines import baseline_factories
from models.columns import TIMESTAMP
from models.errors import ConfigError
from tasks.splitting.split import Selection, Split

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"


def write_recipe(folder: Path, recipe: dict[str, Any]) -> Path:
    """Write ``recipe`` as ``folder/recipe.json``; returns the path."""
    path = Path(folder) / RECIPE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=2, default=str))
    return path


def read_recipe(folder: Path) -> dict[str, Any] | None:
    """The recipe saved beside a model, or None when the model has none."""
    path = Path(folder) / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def baseline_recipe(family: str, recent_days: float, exclude_seen: bool) -> dict[str, Any]:
    """The recipe of a baseline (its only setting is the trending window)."""
    return {"family": family, "recent_days": recent_days, "exclude_seen": exclude_seen}


def content_recipe(encoder: str, exclude_seen: bool) -> dict[str, Any]:
    """The recipe of the content neighbours: the encoder that turns the catalogue into vectors."""
    return {"family": "content", "encoder": encoder, "exclude_seen": exclude_seen}


def transformer_recipe(config: Any, result: dict[str, Any]) -> dict[str, Any]:
    """The recipe of the tuned transformer (its config and best trial)."""
    return {"family": "transformer", "config": config.model_dump(mode="json"),
            "params": result["best_params"], "epochs": result["best_epoch"],
            "new_item_offset": float(result.get("new_item_offset", 0.0)),
            "exclude_seen": bool(result["exclude_seen"])}


def ranker_recipe(result: dict[str, Any], source: dict[str, Any] | None,
                  selection: Selection | None = None,
                  content: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe of the tuned re-ranker; ``source``: the transformer's, when it feeds it.

    ``selection``: the selection holdout whose users' validation targets it did not learn.
    ``content``: the content source's settings (``encoder``, ``n``, ``n_new``), when it feeds it.
    """
    selection = selection or Selection()
    recipe = {"family": "lgbm_ranker", "config": result["config"],
              "ordered_only": result["ordered_only"], "params": result["best_params"],
              "rounds": result["best_iteration"], "exclude_seen": result["exclude_seen"],
              "new_item_offset": float(result.get("new_item_offset", 0.0)), "source": source,
              "selection": [selection.share, selection.seed]}
    return {**recipe, "content": content} if content else recipe


def fit_recipe(recipe: dict[str, Any], split: Split, items: pl.DataFrame | None, out: Path
               ) -> Path:
    """Fit ``recipe`` on ``split`` (served state: ``split.test_history``); save it to ``out``."""
    family = recipe.get("family")
    history = split.test_history
    if family == "lgbm_ranker":
        _fit_ranker(recipe, split, items).save(out)
    elif family == "transformer":
        _fit_transformer(recipe, history, items).save(out)
    elif family in baseline_factories(7.0):
        baseline_factories(recipe.get("recent_days", 7.0))[family]().fit(history).save(out)
    elif family == "content":
        _fit_content(recipe, history, items).save(out)
    else:
        raise ConfigError(f"recipe of unknown family {family!r}: expected lgbm_ranker, "
                          f"transformer, content or one of {', '.join(baseline_factories(7.0))}.")
    write_recipe(out, recipe)
    logger.info("%s refitted from its recipe on %d events", family, history.height)
    return Path(out)


def _fit_content(recipe: dict[str, Any], history: pl.DataFrame,
                 items: pl.DataFrame | None) -> Any:
    from models.content import ContentNeighbours

    return ContentNeighbours().with_vectors(_vectors(recipe["encoder"], items)).fit(history)


def _vectors(encoder: str, items: pl.DataFrame | None) -> pl.DataFrame:
    """The catalogue encoded again by ``encoder`` (a recipe reading the catalogue's text)."""
    from models.item_text import encode_items, encoder_from_spec

    if items is None:
        raise ConfigError("the recipe reads the catalogue's text (the content model or its "
                          "candidates), but there is no items table to encode.")
    return encode_items(items, encoder_from_spec(encoder))


def _fit_transformer(recipe: dict[str, Any], history: pl.DataFrame,
                     items: pl.DataFrame | None) -> Any:
    from tasks.transformer.sequence import SequenceConfig, fit_final

    config = SequenceConfig.model_validate(recipe["config"])
    return fit_final(history, items, config, dict(recipe["params"]), int(recipe["epochs"]),
                     new_item_offset=float(recipe.get("new_item_offset", 0.0)))


def _fit_ranker(recipe: dict[str, Any], split: Split, items: pl.DataFrame | None) -> Any:
    from tasks.ranking.external_sources import ContentSource, combined
    from tasks.ranking.reranker import RankerConfig, RankingPipeline, training_windows

    config = RankerConfig.model_validate(recipe["config"])
    pipe = RankingPipeline(config, items, bool(recipe.get("ordered_only")))
    training = serving = content = None
    source = recipe.get("source")
    if source:  # the transformer feeds the candidates: refitted like training does
        from tasks.transformer.sequence import SequenceConfig, SequenceSource

        n = SequenceConfig.model_validate(source["config"]).n_candidates
        earliest = training_windows(split, config.extra_windows, config.window_stride)[-1][0]
        training = SequenceSource(_fit_transformer(source, earliest, items), n,
                                  bool(source["exclude_seen"]))
        serving = SequenceSource(_fit_transformer(source, split.test_history, items), n,
                                 bool(source["exclude_seen"]))
    if recipe.get("content"):  # the catalogue's text feeds the candidates: encoded again
        settings = recipe["content"]
        content = ContentSource(_vectors(settings["encoder"], items), int(settings["n"]),
                                bool(recipe["exclude_seen"]), settings["encoder"],
                                int(settings.get("n_new", 0)))
    training, serving = combined(training, content), combined(serving, content)
    data = pipe.training_frames(Selection(*recipe.get("selection", [0.0, 0])).tuning(split),
                                training)
    everyone = pl.concat([data.train, data.holdout], how="diagonal_relaxed")
    pipe.ranker_ = pipe.new_ranker(dict(recipe["params"]), int(recipe["rounds"])).fit(everyone)
    pipe.ranker_.new_item_offset = float(recipe.get("new_item_offset", 0.0))
    pipe.source = serving
    return pipe.set_history(split.test_history)


def release_split(split: Split, events: pl.DataFrame) -> Split:
    """``split`` moved on by one window: its test window becomes the last training window.

    A model fitted on it (:func:`fit_recipe`) has seen every event: the served copy.
    """
    empty = split.test_targets.clear()
    info = dict(split.info)
    if split.protocol == "time":
        end = events[TIMESTAMP].max() + dt.timedelta(microseconds=1)
        info.update(t_valid=info["t_test"], t_test=end.isoformat())
    return Split(protocol=split.protocol, train=split.test_history,
                 valid_targets=split.test_targets, test_history=events, test_targets=empty,
                 info=info)


def last_event(history: pl.DataFrame) -> str:
    """The time of the last event a model fitted on ``history`` saw (ISO 8601)."""
    value = history[TIMESTAMP].max()
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)
