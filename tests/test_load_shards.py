"""Loading into event shards: every user in one shard, the same rows as the unsharded loader."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from prefect import flow

from flows.config import data_name, load_config
from models.errors import DataError
from tasks.checks.validate import ValidationSettings
from tasks.data import load_shards
from tasks.data.adapters import load_raw
from tasks.data.load_shards import load_sharded
from tasks.data.prepare import DataPaths, load_data, validate_data, validate_sharded
from tasks.data.shards import ShardWriter, shard_of

DEMO_EVENTS = 20_000


@flow
def load_flow(path: Path | None, fmt: str, workdir: Path, n_shards: int | None) -> DataPaths:
    return load_sharded(None if path is None else str(path), fmt, {}, {}, None, workdir,
                        DEMO_EVENTS, 1, n_shards)


def name_of(path: Path, fmt: str) -> str:
    """The shop's name as the train flow's config gives it before loading."""
    return data_name(load_config(None, data__path=str(path), data__format=fmt))


def read_shards(data: DataPaths) -> list[pl.DataFrame]:
    return [pl.read_parquet(p) for p in sorted(data.events.glob("shard-*.parquet"))]


def sharded_copy(shop: Path, folder: Path, n_shards: int) -> Path:
    """``folder`` holding the events of the demo shop in ``shop`` as ``n_shards`` shards."""
    with ShardWriter(folder / "events", n_shards) as writer:
        writer.write(pl.read_parquet(shop / "events.parquet"))
    return folder


def in_order(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(frame.columns, nulls_last=True)


def assert_partitioned(data: DataPaths) -> pl.DataFrame:
    """Check that shard k holds exactly the users whose shard is k; return all the events."""
    shards = read_shards(data)
    assert len(shards) == data.shards
    for k, shard in enumerate(shards):
        assert (shard_of(shard["user_id"], data.shards) == k).all()
    events = pl.concat(shards)
    assert data.rows["events"] == events.height
    return events


def test_demo_shop_is_written_as_shards_and_its_cache_kept(
    prefect_server: None, tmp_path: Path
) -> None:
    data = load_flow(None, "parquet", tmp_path / "runs" / "one", None)

    assert (data.name, data.shards, data.ordered_only) == ("demo", 2, False)
    events = assert_partitioned(data)
    cache = pl.concat([pl.read_parquet(p) for p in sorted(data.source.glob("events/*.parquet"))])
    assert in_order(events).equals(in_order(cache))
    assert abs(events.height - DEMO_EVENTS) < DEMO_EVENTS // 20
    assert data.rows["items"] == pl.read_parquet(data.items).height > 0
    cached = data.source / "events" / "shard-00000.parquet"
    before = cached.read_bytes()
    replacement = data.events / "new.parquet"  # how validation rewrites a shard
    events.head(3).write_parquet(replacement)
    os.replace(replacement, data.events / "shard-00000.parquet")
    assert cached.read_bytes() == before

    again = load_flow(None, "parquet", tmp_path / "runs" / "two", 3)

    assert (again.shards, again.source.name) == (3, f"shop-{DEMO_EVENTS}-seed1-shards3")
    assert abs(assert_partitioned(again).height - DEMO_EVENTS) < DEMO_EVENTS // 20


def test_parquet_shards_are_resharded_with_the_same_rows(
    prefect_server: None, demo_shop_dir: Path, tmp_path: Path
) -> None:
    source = sharded_copy(demo_shop_dir, tmp_path / "shop", 4)
    empty = pl.read_parquet(source / "events" / "shard-00000.parquet").clear()
    empty.write_parquet(source / "events" / "shard-00004.parquet")  # an empty file is skipped
    pl.read_parquet(demo_shop_dir / "items.parquet").write_parquet(source / "items.parquet")
    expected = load_raw(source, "parquet")

    data = load_flow(source, "parquet", tmp_path / "runs" / "one", 3)

    assert (data.name, data.shards) == (name_of(source, "parquet"), 3)
    assert data.name.startswith("shop-")
    assert in_order(assert_partitioned(data)).equals(in_order(expected.events))
    assert pl.read_parquet(data.items).equals(expected.items)


def test_csv_is_sharded_with_the_rows_of_the_unsharded_loader(
    prefect_server: None, demo_shop_dir: Path, tmp_path: Path
) -> None:
    csv = tmp_path / "shop.csv"
    pl.read_parquet(demo_shop_dir / "events.parquet").write_csv(csv)
    expected = load_raw(csv, "csv")

    data = load_flow(csv, "csv", tmp_path / "runs" / "one", None)

    assert (data.name, data.shards, data.items) == (name_of(csv, "csv"), 2, None)
    assert in_order(assert_partitioned(data)).equals(in_order(expected.events))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_missing_path_is_the_unsharded_loaders_error(
    prefect_server: None, tmp_path: Path, fmt: str
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as expected:
        load_raw(missing, fmt)

    with pytest.raises(DataError) as caught:
        load_flow(missing, fmt, tmp_path / "runs" / "one", None)

    assert str(caught.value) == str(expected.value)
    assert "does not exist" in str(caught.value)


def test_two_event_tables_are_refused(
    prefect_server: None, demo_shop_dir: Path, tmp_path: Path
) -> None:
    source = sharded_copy(demo_shop_dir, tmp_path / "shop", 2)
    pl.read_parquet(demo_shop_dir / "events.parquet").write_parquet(source / "events.parquet")

    with pytest.raises(DataError, match="holds both events.parquet and a folder events/"):
        load_flow(source, "parquet", tmp_path / "runs" / "one", None)


def test_an_unreadable_shard_is_a_clear_error(
    prefect_server: None, demo_shop_dir: Path, tmp_path: Path
) -> None:
    source = sharded_copy(demo_shop_dir, tmp_path / "shop", 2)
    broken = source / "events" / "shard-00001.parquet"
    broken.write_bytes(broken.read_bytes()[:-100])

    with pytest.raises(DataError, match="could not be read as Parquet") as caught:
        load_flow(source, "parquet", tmp_path / "runs" / "one", None)

    assert str(broken) in str(caught.value)


@flow
def load_both(path: Path, fmt: str, workdir: Path) -> tuple[DataPaths, DataPaths]:
    return (load_data(str(path), fmt, {}, {}, None, workdir / "local", DEMO_EVENTS, 1),
            load_sharded(str(path), fmt, {}, {}, None, workdir / "dask", DEMO_EVENTS, 1, 2))


def test_both_loaders_name_a_shop_as_the_config_does(
    prefect_server: None, shared_data: Path, tmp_path: Path
) -> None:
    sample = shared_data / "taobao_userbehavior_sample" / "UserBehavior_sample.csv.gz"
    names = []
    for folder in ("north", "south"):  # the same log in two folders: two shops
        copy = tmp_path / folder / sample.name
        copy.parent.mkdir()
        copy.write_bytes(sample.read_bytes())
        local, sharded = load_both(copy, "taobao", tmp_path / "runs" / folder)
        assert local.name == sharded.name == name_of(copy, "taobao")
        names.append(local.name)
    assert names[0] != names[1]


def test_a_user_has_one_id_across_files_whatever_their_number_types(
    prefect_server: None, tmp_path: Path
) -> None:
    """``7.0`` in a float file and ``7`` in an integer file are one user, ``"7"``."""
    source = tmp_path / "shop" / "events"
    source.mkdir(parents=True)
    times = pl.datetime_range(pl.datetime(2024, 1, 1), pl.datetime(2024, 1, 1, 3), "1h",
                              eager=True, time_zone="UTC")
    for name, ids in (("a.parquet", pl.Series([7.0, 8.0, 7.0, 8.0])),
                      ("b.parquet", pl.Series([7, 9, 7, 9]))):
        pl.DataFrame({"user_id": ids, "item_id": ["i1", "i2", "i3", "i4"],
                      "event_type": ["view"] * 4, "timestamp": times}).write_parquet(
            source / name)

    data = load_flow(source.parent, "parquet", tmp_path / "runs" / "one", 2)

    events = assert_partitioned(data)
    assert sorted(events["user_id"].unique()) == ["7", "8", "9"]
    assert events.filter(pl.col("user_id") == "7").height == 4


@flow
def load_and_validate(path: Path, workdir: Path) -> tuple[DataPaths, DataPaths]:
    settings = ValidationSettings()
    local = load_data(str(path), "parquet", {}, {}, None, workdir / "local", DEMO_EVENTS, 1)
    sharded = load_sharded(str(path), "parquet", {}, {}, None, workdir / "dask", DEMO_EVENTS, 1,
                           2)
    return validate_data(local, settings, None), validate_sharded(sharded, settings, None)


def test_the_report_states_the_catalogue_rows_dropped_as_exact_copies(
    prefect_server: None, demo_shop_dir: Path, tmp_path: Path
) -> None:
    source = sharded_copy(demo_shop_dir, tmp_path / "shop", 2)
    items = pl.read_parquet(demo_shop_dir / "items.parquet")
    pl.concat([items, items.head(2)]).write_parquet(source / "items.parquet")

    local, sharded = load_and_validate(source, tmp_path / "runs")

    for data in (local, sharded):
        assert data.dropped_item_duplicates == 2
        assert pl.read_parquet(data.items).equals(items)
        report = (data.events.parent / "validation_report.md").read_text()
        assert "dropped 2 catalogue rows that repeat another row exactly" in report


STREAMED_SAMPLES = {"taobao": "taobao_userbehavior_sample", "rees46": "rees46_sample",
                    "hm": "hm_sample", "diginetica": "diginetica",
                    "uci-retail": "uci_online_retail_sample", "s3rec": "amazon_s3rec",
                    "rechorus": "amazon_grocery_rechorus"}


def per_user(events: pl.DataFrame) -> pl.DataFrame:
    """Every user's events in time order, ties in the order they arrived."""
    return events.sort(["user_id", "timestamp"], maintain_order=True)


@pytest.mark.parametrize("fmt", sorted(STREAMED_SAMPLES))
def test_every_format_is_sharded_a_batch_at_a_time(
    prefect_server: None, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    fmt: str
) -> None:
    """Batches of 700 raw rows give the unsharded loader's events, in its order, and items."""
    source = shared_data / STREAMED_SAMPLES[fmt]
    expected = load_raw(source, fmt)
    monkeypatch.setattr(load_shards, "SLICE_ROWS", 700)
    written: list[int] = []
    write = ShardWriter.write
    monkeypatch.setattr(ShardWriter, "write",
                        lambda self, frame: (written.append(frame.height), write(self, frame)))

    data = load_flow(source, fmt, tmp_path / "runs" / "one", 3)

    assert len(written) > 1
    assert max(written) <= 700 or fmt == "s3rec"  # an s3rec raw row is a user's line of items
    assert per_user(assert_partitioned(data)).equals(per_user(expected.events))
    assert pl.read_parquet(data.items).equals(expected.items)


def test_a_bad_value_in_a_later_batch_names_the_file_and_column(
    prefect_server: None, demo_shop_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = tmp_path / "shop.csv"
    events = pl.read_parquet(demo_shop_dir / "events.parquet").with_columns(
        pl.col("timestamp").dt.to_string())
    events.with_columns(pl.when(pl.int_range(pl.len()) == events.height - 1)
                        .then(pl.lit("yesterday")).otherwise("timestamp").alias("timestamp")
                        ).write_csv(csv)
    monkeypatch.setattr(load_shards, "SLICE_ROWS", 1000)

    with pytest.raises(DataError, match="Column 'timestamp' of .*shop.csv .*'yesterday'"):
        load_flow(csv, "csv", tmp_path / "runs" / "one", None)


def test_shards_already_by_user_are_copied_not_resharded(
    prefect_server: None, demo_shop_dir: Path, tmp_path: Path
) -> None:
    source = sharded_copy(demo_shop_dir, tmp_path / "shop", 3)
    inputs = sorted((source / "events").glob("*.parquet"))

    data = load_flow(source, "parquet", tmp_path / "runs" / "one", None)

    outputs = sorted(data.events.glob("shard-*.parquet"))
    assert data.shards == 3
    assert [f.read_bytes() for f in outputs] == [f.read_bytes() for f in inputs]
    assert_partitioned(data)
    other = load_flow(source, "parquet", tmp_path / "runs" / "two", 2)  # another number: resharded
    assert other.shards == 2
    assert in_order(assert_partitioned(other)).equals(in_order(assert_partitioned(data)))
    first, second = (pl.read_parquet(f) for f in inputs[:2])  # a user in the wrong file
    pl.concat([first, second.head(1)]).write_parquet(inputs[0])
    second.slice(1).write_parquet(inputs[1])

    moved = load_flow(source, "parquet", tmp_path / "runs" / "three", None)

    assert moved.events.joinpath("shard-00000.parquet").read_bytes() != inputs[0].read_bytes()
    assert in_order(assert_partitioned(moved)).equals(in_order(assert_partitioned(data)))
