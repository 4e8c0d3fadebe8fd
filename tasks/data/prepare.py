"""Prefect tasks of the data half of the pipeline: load, validate, split.

Tasks pass file paths, not frames: Prefect keeps task results in memory, and persists the
results of these stages in its result storage for ``train --resume`` (see :mod:`tasks.resume`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from models.columns import ITEM
from tasks import tracking
from tasks.checks.validate import (
    ValidationReport,
    ValidationSettings,
    raise_on_failure,
    validate_tables,
)
from tasks.checks.validate_shards import validate_event_shards
from tasks.data.adapters import load_raw
from tasks.data.demo_data import write_demo_shop
from tasks.data.formats import file_stem
from tasks.resume import LOAD_CACHE, STAGE_CACHE
from tasks.splitting.split import EvalSample, Split, cut_times, leave_one_out, time_split


@dataclass
class DataPaths:
    """Canonical tables of one run on disk, and what is known about their source."""

    events: Path
    items: Path | None
    name: str
    source: Path
    fingerprint: str
    ordered_only: bool = False
    rows: dict[str, int] = field(default_factory=dict)
    shards: int = 0  # the number of shard files when ``events`` is a folder of shards
    dropped_item_duplicates: int = 0  # catalogue rows that repeated another, for the report


def shop_name(path: str | Path | None, fmt: str, name: str | None = None) -> str:
    """The shop's name: its MLflow experiment, its run folders and its champion's shop.

    ``name`` when given; ``demo`` for the built-in demo shop (no ``path``); else
    ``<format>-<stem>-<digest>`` (``<stem>-<digest>`` for csv and parquet), ``<digest>`` being
    the first 6 hex digits of the SHA-256 of the resolved absolute path, so that two logs of
    one format in two folders are two shops, and one path is one shop however it is spelt.
    """
    if name:
        return name
    if path is None:
        return "demo"
    resolved = Path(path).expanduser().resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:6]
    parts = [file_stem(resolved), digest]
    return "-".join(parts if fmt in ("csv", "parquet") else [fmt, *parts])


def demo_source(root: Path, n_events: int, seed: int) -> Path:
    """Folder of the built-in demo shop for ``(n_events, seed)``, generated on first use."""
    folder = root / "demo" / f"shop-{n_events}-seed{seed}"
    if not (folder / "events.parquet").is_file():
        write_demo_shop(folder, n_events=n_events, seed=seed)
    return folder


@task(name="load", persist_result=True, cache_policy=LOAD_CACHE)
def load_data(
    path: str | None, fmt: str, column_map: dict[str, str], event_map: dict[str, str],
    name: str | None, workdir: Path, demo_events: int, demo_seed: int,
) -> DataPaths:
    """Read raw data (or the demo shop) into canonical Parquet tables under ``workdir``."""
    logger = get_run_logger()
    if path is None:
        source = demo_source(workdir.parents[1], demo_events, demo_seed)
        raw = load_raw(source, "parquet")
    else:
        source = Path(path)
        raw = load_raw(source, fmt, column_map=column_map or None, event_map=event_map or None)
    for note in raw.notes:
        logger.warning(note)
    workdir.mkdir(parents=True, exist_ok=True)
    events_path = workdir / "events.parquet"
    raw.events.write_parquet(events_path)
    items_path = None
    if raw.items is not None:
        items_path = workdir / "items.parquet"
        raw.items.write_parquet(items_path)
    rows = {"events": raw.events.height, "items": 0 if raw.items is None else raw.items.height}
    shop = shop_name(path, fmt, name)
    logger.info("loaded %s: %d events, %d items", shop, rows["events"], rows["items"])
    return DataPaths(events_path, items_path, shop, source, tracking.fingerprint([source]),
                     raw.ordered_only, rows,
                     dropped_item_duplicates=raw.dropped_item_duplicates)


@task(name="validate", persist_result=True, cache_policy=STAGE_CACHE)
def validate_data(data: DataPaths, settings: ValidationSettings, run_id: str | None) -> DataPaths:
    """Run the expectation suites; stop the run with a readable report when one fails."""
    events = pl.read_parquet(data.events)
    items = pl.read_parquet(data.items) if data.items else None
    report, clean = validate_tables(events, items, settings,
                                    dropped_item_duplicates=data.dropped_item_duplicates)
    publish_report(report, data.events.parent, run_id)
    if clean.height != events.height:
        clean.write_parquet(data.events)
        data.rows["events"] = clean.height
    return data


def validate_sharded(data: DataPaths, settings: ValidationSettings, run_id: str | None
                     ) -> DataPaths:
    """:func:`validate_data` for events stored as shards: a task per shard, one merged report.

    Call inside a flow: the per-shard tasks run on the flow's task runner (Dask workers).
    """
    shards = sorted(data.events.glob("*.parquet"))
    report, _ = validate_event_shards(shards, data.items, settings,
                                      dropped_item_duplicates=data.dropped_item_duplicates)
    publish_report(report, data.events.parent, run_id)
    data.rows["events"] = report.rows.get("events", 0) - report.dropped_duplicates
    return data


def publish_report(report: ValidationReport, folder: Path, run_id: str | None) -> None:
    """Write the validation report beside the tables and as a Prefect and MLflow artifact.

    Raises:
        ValidationFailedError: The report failed (its message is the readable report).
    """
    logger = get_run_logger()
    markdown = report.to_markdown()
    (folder / "validation_report.md").write_text(markdown)
    create_markdown_artifact(markdown, key="validation-report", description="Data validation")
    if run_id:
        tracking.log_text(run_id, markdown, "validation/report.md")
    for warning in report.warnings:
        logger.warning(warning)
    if not report.success:
        logger.error("data validation failed: %d failed expectation(s); report in %s and in the "
                     "run's artifacts", len(report.failures), folder)
        raise_on_failure(report)


def _choose_split(events: pl.DataFrame, protocol: str, ordered_only: bool, cfg: dict) -> Split:
    if protocol == "leave_one_out" or (protocol == "auto" and ordered_only):
        return leave_one_out(events)
    t_valid, t_test = cut_times(
        events, cfg["valid_share"], cfg["test_share"], cfg["valid_days"], cfg["test_days"]
    )
    types = tuple(cfg["target_event_types"] or ()) or None
    return time_split(events, t_valid, t_test, types)


@dataclass
class SplitPaths:
    """Where a split was written and under which protocol."""

    folder: Path
    protocol: str


@task(name="split", persist_result=True, cache_policy=STAGE_CACHE)
def split_data(data: DataPaths, split_cfg: dict, sample: EvalSample | None = None) -> SplitPaths:
    """Cut the events into train/validation/test and write them beside the tables.

    ``sample``: the test users scored (recorded in ``info.json``; default every one).
    """
    events = pl.read_parquet(data.events)
    split = _choose_split(events, split_cfg["protocol"], data.ordered_only, split_cfg)
    folder = data.events.parent / "split"
    write_split(split, folder, sample)
    get_run_logger().info("split: %s", split.summary())
    return SplitPaths(folder, split.protocol)


def write_split(split: Split, folder: Path, sample: EvalSample | None = None) -> None:
    """Write a split as four Parquet files and ``info.json`` (with ``sample``, when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid_targets", "test_history", "test_targets"):
        getattr(split, name).write_parquet(folder / f"{name}.parquet")
    info = {"protocol": split.protocol, "summary": split.summary()}
    if sample is not None:
        info["test_sample"] = sample.as_info()
    (folder / "info.json").write_text(json.dumps(info, indent=2, default=str))


def read_split(folder: Path, sampled: bool = True) -> Split:
    """Read a split written by :func:`write_split`.

    ``sampled``: the test targets of the split's test sample only (:class:`EvalSample`);
    False reads every one (the release, whose last training window is the test window).
    """
    info = json.loads((folder / "info.json").read_text())
    tables = {n: pl.read_parquet(folder / f"{n}.parquet")
              for n in ("train", "valid_targets", "test_history", "test_targets")}
    split = Split(protocol=info["protocol"], info=info["summary"], **tables)
    return EvalSample.from_info(info).apply(split) if sampled else split


def catalogue_size(data: DataPaths) -> int:
    """Items that can be recommended: the catalogue joined with every item seen in events.

    Events stored as shards are scanned one column at a time (memory: the distinct ids).
    """
    source = data.events / "*.parquet" if data.events.is_dir() else data.events
    ids = pl.scan_parquet(source).select(ITEM).unique().collect()[ITEM]
    if data.items:
        ids = pl.concat([ids, pl.read_parquet(data.items, columns=[ITEM])[ITEM]])
    return ids.n_unique()
