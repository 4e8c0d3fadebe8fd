"""The ``catalogue-update`` flow: new items into the champion's lists, unavailable ones out.

``shoprank catalogue update --items FILE`` reads the shop's current catalogue (CSV or Parquet,
canonical columns or ``--map``; ``available`` false marks items never to recommend), and
registers the champion with its serving bundle updated for it, without retraining
(:mod:`tasks.release.catalogue`, :mod:`models.catalogue`); ``champion`` moves to the new version.
A rerun with the same catalogue finds the version it registered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.config import TrainConfig
from tasks import tracking
from tasks.data.adapters import read_items
from tasks.data.item_vectors import CACHE_FOLDER
from tasks.release.catalogue import update_champion


@flow(name="catalogue-update", log_prints=True)
def catalogue_update(config: TrainConfig, items_file: str,
                     column_map: dict[str, str] | None = None,
                     new_item_weight: float | None = None) -> dict[str, Any]:
    """Register the champion of ``config.registry.model_name`` updated for ``items_file``."""
    logger = get_run_logger()
    path = Path(items_file)
    items, _ = read_items(path, column_map or {})  # exact copies of a row dropped and logged
    logger.info("catalogue %s: %s items", path, f"{items.height:,}")
    weight = config.content.new_item_weight if new_item_weight is None else new_item_weight
    result = update_champion(
        items, model_name=config.registry.model_name,
        tracking_uri=tracking.tracking_uri(config.tracking_uri),
        encoder=config.content.encoder,
        cache_dir=Path(config.output_dir).resolve() / CACHE_FOLDER, new_item_weight=weight,
        lock_timeout_s=900.0)
    counts = result["catalogue"]
    logger.info("v%s (from v%s): %s new items, %s unavailable, %s users with a new item in "
                "their top 10; champion %s", result["version"], result["base"],
                counts.get("new_items"), counts.get("unavailable"), counts.get("users_reached"),
                "moved" if result["moved"] else f"not moved: {result['reason']}")
    return result
