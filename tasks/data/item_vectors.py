"""The catalogue's item vectors, computed once per catalogue content and encoder.

``<output_dir>/item-vectors/<encoder>-<digest>.parquet`` (``item_id, vector``) is keyed by the
SHA-256 of the encoder's name and every item's text (:func:`models.item_text.texts_digest`): a
run on an unchanged catalogue reads it back, a changed title encodes again. The file is written
beside its final name and renamed, so a killed run leaves no half-written cache. Each run logs
the file as its artifact ``item_vectors/`` with the encoder's name as a parameter.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import polars as pl
from mlflow import MlflowClient
from prefect import get_run_logger, task

from models.item_text import (
    VECTOR,
    check_vectors,
    encode_items,
    encoder_from_spec,
    has_text,
    item_texts,
    texts_digest,
)

CACHE_FOLDER = "item-vectors"


def cached_vectors(items: pl.DataFrame, spec: str, cache_dir: Path) -> tuple[Path, str, bool]:
    """The vectors file of the catalogue ``items``: (path, encoder name, cache hit)."""
    encoder = encoder_from_spec(spec)
    digest = texts_digest(item_texts(items), encoder.name)[:16]
    path = cache_dir / f"{encoder.name}-{digest}.parquet"
    if path.is_file():
        cached = pl.read_parquet(path)
        check_vectors(cached[VECTOR].to_numpy(), cached.height, encoder.name)
        return path, encoder.name, True
    vectors = encode_items(items, encoder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    vectors.write_parquet(partial)
    partial.replace(path)
    return path, encoder.name, False


@task(name="item-vectors")
def item_vectors(items_path: Path | None, spec: str, cache_dir: Path, run_id: str | None,
                 tracking_uri: str | None = None) -> Path | None:
    """Encode the catalogue's text (or read the cache); log the file to the run.

    None when the shop has no catalogue, or one without words (a title, description, brand
    or attributes): the content model is then left out.
    """
    logger = get_run_logger()
    if items_path is None:
        logger.info("no items table: no item vectors, the content model is left out")
        return None
    items = pl.read_parquet(items_path)
    if not has_text(items):
        logger.info("the items table has no title, description, brand or attributes: no item "
                    "vectors, the content model is left out")
        return None
    start = time.perf_counter()
    path, name, hit = cached_vectors(items, spec, Path(cache_dir))
    logger.info("item vectors of %s items by %s: %s in %.1f s (%s)", f"{items.height:,}", name,
                "read from the cache" if hit else "encoded", time.perf_counter() - start, path)
    if run_id:
        client = MlflowClient(tracking_uri)
        client.log_artifact(run_id, str(path), "item_vectors")
        client.log_param(run_id, "content.encoder_name", name)
    return path
