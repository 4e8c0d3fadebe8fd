"""The demo shop written as Parquet shards by user, and read back through the parquet adapter."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from flows.cli import run
from models.columns import EVENT_TYPE, ITEM, PRICE, SESSION, TIMESTAMP, USER
from models.errors import ConfigError, DataError
from tasks.data.adapters import load_raw
from tasks.data.demo_data import DEFAULT_END, generate_shop, generate_shop_batches, write_demo_shop
from tasks.data.shards import shard_file, shard_of

N_EVENTS, SEED, SHARDS = 20_000, 4, 4
BATCH_USERS = 120  # 500 users: five batches, the last of 20 users


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_demo_shop(folder, N_EVENTS, SEED, shards=SHARDS, batch_users=BATCH_USERS)
    return folder


@pytest.fixture(scope="module")
def batches() -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    items, events = generate_shop_batches(N_EVENTS, SEED, batch_users=BATCH_USERS)
    return items, list(events)


def _shards(folder: Path) -> list[pl.DataFrame]:
    return [pl.read_parquet(shard_file(folder / "events", s)) for s in range(SHARDS)]


def test_shard_of_is_crc32_of_the_id_text() -> None:
    ids = pl.Series(USER, ["u000001", "u000002", None, "abc", "u000001"])
    assert shard_of(ids, 64).to_list() == [33, 27, None, 2, 33]  # zlib.crc32(id) % 64
    assert shard_of(pl.Series([7, 7]), 5).to_list() == [shard_of(pl.Series(["7"]), 5)[0]] * 2
    with pytest.raises(ConfigError, match="1 or more"):
        shard_of(ids, 0)


def test_shards_partition_the_users(shard_dir: Path, batches) -> None:
    assert sorted(p.name for p in (shard_dir / "events").iterdir()) == [
        f"shard-{s:05d}.parquet" for s in range(SHARDS)]
    shards = _shards(shard_dir)
    users = [set(frame[USER]) for frame in shards]
    assert sum(len(u) for u in users) == len(set().union(*users))  # each user in one shard
    for number, frame in enumerate(shards):
        assert frame.height > 0
        assert (shard_of(frame[USER], SHARDS) == number).all()
    union = pl.concat(shards).sort(USER, TIMESTAMP, SESSION, EVENT_TYPE)
    expected = pl.concat(batches[1]).sort(USER, TIMESTAMP, SESSION, EVENT_TYPE)
    assert union.equals(expected)


def test_same_arguments_give_identical_files(shard_dir: Path, tmp_path: Path) -> None:
    write_demo_shop(tmp_path / "again", N_EVENTS, SEED, shards=SHARDS, batch_users=BATCH_USERS)
    write_demo_shop(tmp_path / "other", N_EVENTS, SEED + 1, shards=SHARDS,
                    batch_users=BATCH_USERS)
    files = [Path("items.parquet")] + [shard_file(Path("events"), s) for s in range(SHARDS)]
    for file in files:
        assert (tmp_path / "again" / file).read_bytes() == (shard_dir / file).read_bytes()
    assert (tmp_path / "other" / files[1]).read_bytes() != (shard_dir / files[1]).read_bytes()


def test_parquet_adapter_reads_the_shard_folder(shard_dir: Path, batches) -> None:
    raw = load_raw(shard_dir, "parquet")
    assert raw.events.sort(USER, TIMESTAMP, SESSION, EVENT_TYPE).equals(
        pl.concat(batches[1]).sort(USER, TIMESTAMP, SESSION, EVENT_TYPE))
    assert raw.events[TIMESTAMP].is_sorted()
    assert raw.items is not None
    assert raw.items.equals(batches[0])


def test_batches_keep_the_catalogue_and_shape_of_the_whole_shop(batches) -> None:
    items, frames = batches
    events = pl.concat(frames)
    assert len(frames) == 5
    assert all(frame[TIMESTAMP].is_sorted() for frame in frames)
    assert items.equals(generate_shop(N_EVENTS, SEED)[1])  # the same catalogue
    assert abs(events.height - N_EVENTS) / N_EVENTS < 0.03
    assert events[USER].n_unique() > 0.6 * N_EVENTS / 40
    counts = dict(events[EVENT_TYPE].value_counts().iter_rows())
    assert 0.05 <= counts["cart"] / counts["view"] <= 0.10
    assert 0.30 <= counts["purchase"] / counts["cart"] <= 0.50
    assert events.group_by(SESSION).agg(pl.col(USER).n_unique())[USER].max() == 1
    assert events[SESSION].str.contains(r"^s\d{7}$").all()
    listed = events.join(items.select(ITEM, pl.col(PRICE).alias("list")), on=ITEM, how="left")
    assert (listed[PRICE] == listed["list"]).all()
    assert events[TIMESTAMP].max() < DEFAULT_END
    assert events[TIMESTAMP].min() >= DEFAULT_END - dt.timedelta(days=60)


def test_demo_data_shards_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shop"
    assert run(["demo-data", "--out", str(out), "--events", "2000", "--shards", "3"]) == 0
    assert run(["demo-data", "--out", str(out), "--events", "2000", "--shards", "2"]) == 0
    assert sorted(p.name for p in (out / "events").iterdir()) == [
        "shard-00000.parquet", "shard-00001.parquet"]  # the earlier third shard is gone
    assert (out / "items.parquet").is_file()
    assert run(["demo-data", "--out", str(tmp_path / "x"), "--shards", "0"]) == 2
    assert "shards must be 1 or more" in capsys.readouterr().err


def test_a_folder_with_both_events_forms_is_refused(tmp_path: Path) -> None:
    both = tmp_path / "both"
    write_demo_shop(both, 2_000, SEED, shards=2)
    write_demo_shop(both, 2_000, SEED)
    with pytest.raises(DataError, match="both events.parquet and a folder events/"):
        load_raw(both, "parquet")
