"""A catalogue update registered without retraining: the champion's bundle, new items added.

:func:`update_champion` reads the shop's current catalogue, encodes its text (the item vector
cache, :mod:`tasks.data.item_vectors`), rewrites the champion's serving bundle for it
(:func:`models.catalogue.update_bundle`: new items into the lists and the session paths,
unavailable items out) and registers the result as a new version of the same recipe: every tag
of the champion is kept (recipe, last event, family, the release it came from), so the gate and
the monitor treat it as the champion it updates. Then ``champion`` moves to it, compare-and-set.

Idempotent and safe to kill at any line, under the registry lock: the update's id digests the
champion version, the catalogue's vectors, the unavailable items and the settings, and the
registered version carries it (``catalogue.update_id``), so a rerun finds the version it
registered instead of registering another, and only moves the alias. A champion that moved in
between is left alone (the update is made again from the new champion). Nothing of an earlier
version changes: the bundle is written into a fresh folder and logged under a path of its own.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import polars as pl
from mlflow import MlflowClient

from models.catalogue import DEFAULT_NEW_ITEM_WEIGHT, update_bundle
from models.columns import AVAILABLE, ITEM, USER
from models.errors import ConfigError, DataError
from models.item_text import has_text
from tasks.data.item_vectors import cached_vectors
from tasks.release.packaging import CHAMPION, package_and_register
from tasks.release.promotion import move_alias
from tasks.release.registry import alias_version, get_version, registry_lock, version_tagged

logger = logging.getLogger(__name__)

UPDATE_TAG = "catalogue.update_id"
BASE_TAG = "catalogue.base_version"
_NOT_COPIED = ("promotion.", "catalogue.", "release.decision_id", "serving.", "mlflow.")


def update_id(base: str, vectors_file: str, unavailable: pl.Series, settings: str) -> str:
    """The id of one update: the model version, the catalogue and the settings.

    The catalogue enters by its vectors file, named by the digest of every item's text.
    """
    digest = hashlib.sha256(f"{base}|{vectors_file}|{settings}|".encode())
    digest.update("|".join(sorted(unavailable.cast(pl.String).to_list())).encode())
    return digest.hexdigest()[:24]


def unavailable_items(items: pl.DataFrame) -> pl.Series:
    """The ids of the catalogue's items whose ``available`` is false."""
    if AVAILABLE not in items.columns:
        return pl.Series(ITEM, [], dtype=pl.String)
    return items.filter(pl.col(AVAILABLE).eq(False))[ITEM].cast(pl.String)


def bundle_example(bundle: Path) -> pd.DataFrame:
    """Two request records for the pyfunc: a known user, and a visitor viewing a new item."""
    user = pl.read_parquet(bundle / "users.parquet")[USER][0]
    item = pl.read_parquet(bundle / "items.parquet")[ITEM][-1]
    return pd.DataFrame([{USER: user, "k": 10, "recent_items": None, "exclude": None},
                         {USER: "a-new-visitor", "k": 5, "recent_items": [item], "exclude": []}])


def update_champion(items: pl.DataFrame, *, model_name: str, tracking_uri: str, encoder: str,
                    cache_dir: Path, new_item_weight: float = DEFAULT_NEW_ITEM_WEIGHT,
                    lock_timeout_s: float = 900.0) -> dict[str, Any]:
    """Register the champion updated for the catalogue ``items``; move ``champion`` to it.

    Returns:
        ``version`` (the updated champion), ``base`` (the champion it updates), ``moved``,
        ``reused`` (a rerun found the version), ``reason`` (why the alias did not move) and the
        bundle's ``catalogue`` counts (new items, unavailable, users reached).
    """
    client = MlflowClient(tracking_uri)
    if not has_text(items):
        raise DataError("the catalogue has no words to encode (no title, description, brand or "
                        "attributes): new items are found by their text. Add a title column.")
    path, encoder_name, hit = cached_vectors(items, encoder, cache_dir)
    vectors = pl.read_parquet(path)
    unavailable = unavailable_items(items)
    with registry_lock(tracking_uri, model_name, lock_timeout_s):
        champion = alias_version(client, model_name, CHAMPION)
        if champion is None:
            raise ConfigError(f"{model_name!r} has no champion in {tracking_uri}: train and "
                              "promote a model first (shoprank train), then update its catalogue.")
        # the model version underneath: a champion that is itself an update names its own
        base = get_version(client, model_name, champion).tags.get(BASE_TAG, champion)
        update = update_id(base, path.name, unavailable, f"{encoder_name}|{new_item_weight}")
        version, reused, counts = version_tagged(client, model_name, UPDATE_TAG, update), True, {}
        if version is None:
            version, counts = _register(client, model_name, champion, base, update, vectors,
                                        unavailable, new_item_weight, encoder_name, tracking_uri)
            reused = False
        reason = move_alias(client, model_name, champion, version)
    if not counts:
        tags = get_version(client, model_name, version).tags
        counts = {key.removeprefix("catalogue."): tags[key] for key in tags
                  if key.startswith("catalogue.") and key not in (UPDATE_TAG, BASE_TAG)}
    logger.info("catalogue update of %s v%s: v%s (%s); %s", model_name, champion, version,
                "found again" if reused else "registered", reason or "champion moved")
    return {"version": version, "base": champion, "moved": reason is None, "reused": reused,
            "reason": reason, "catalogue": counts, "vectors_cached": hit}


def _register(client: MlflowClient, model_name: str, champion: str, base: str, update: str,
              vectors: pl.DataFrame, unavailable: pl.Series, weight: float, encoder_name: str,
              tracking_uri: str) -> tuple[str, dict[str, Any]]:
    """Update the champion's bundle, register it; ``(version, counts)``.

    ``base`` is the model version underneath the champion (itself, unless it is an update).
    """
    source = get_version(client, model_name, champion)
    with tempfile.TemporaryDirectory(prefix="shoprank-catalogue-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(model_name, champion),
            dst_path=str(Path(tmp) / "champion"), tracking_uri=tracking_uri))
        found = sorted((local / "artifacts").glob("*/manifest.json"))
        if not found:
            raise DataError(f"{model_name} v{champion} holds no shoprank serving bundle (looked "
                            f"in {local / 'artifacts'}); register it with shoprank train.")
        bundle = found[0].parent
        updated = Path(tmp) / "updated" / "bundle"
        counts = update_bundle(bundle, updated, vectors, unavailable, new_item_weight=weight,
                               note={"encoder": encoder_name, "update_id": update,
                                     "base_version": base})
        family = source.tags.get("model.family", "")
        tags = {key: value for key, value in source.tags.items()
                if not key.startswith(_NOT_COPIED)}
        tags.update({UPDATE_TAG: update, BASE_TAG: base,
                     "catalogue.new_items": str(counts["new_items"]),
                     "catalogue.unavailable": str(counts["unavailable"]),
                     "catalogue.users_reached": str(counts["users_reached"])})
        path = f"catalogue/{update[:12]}-{uuid.uuid4().hex[:8]}"
        description = (f"{family} v{base} with the catalogue updated, not retrained (from "
                       f"champion v{champion}): "
                       f"{counts['new_items']} new items, {counts['unavailable']} unavailable.")
        packaged = package_and_register(
            source.run_id, updated, None, family=family, model_name=model_name,
            tracking_uri=tracking_uri, tags=tags, description=description, alias=None,
            artifact_path=f"{path}/model", example=bundle_example(updated))
    return packaged.version, counts
