"""The demo shop written as Parquet shards by user, and read back through the parquet adapter."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import math
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flows.cli import run
from models.columns import EVENT_TYPE, ITEM, PRICE, SESSION, TIMESTAMP, USER
from models.errors import ConfigError, DataError
from tasks.data.adapters import load_raw
from tasks.data.demo_data import DEFAULT_END, generate_shop, generate_shop_batches, write_demo_shop
from tasks.data.shards import shard_file, shard_of
from tasks.ranking.rank_sample import _keys
from tasks.ranking.rank_tables import GROUP_KEY, USER_KEY
from tasks.ranking.reranker import HOLDOUT_SCALE, holdout_key
from tasks.splitting.split import Selection

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


def _blake2b(text: str, key: bytes, n: int) -> int:
    """The keyed hash of ``text`` modulo ``n``, computed here with hashlib alone."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big") % n


def test_shard_of_is_a_keyed_blake2b_of_the_id_text() -> None:
    ids = pl.Series(USER, ["u000001", "u000002", None, "abc", "u000001"])
    assert shard_of(ids, 64).to_list() == [25, 51, None, 57, 25]
    assert [_blake2b(i, b"shard:0", 64) for i in ("u000001", "u000002", "abc")] == [25, 51, 57]
    held = shard_of(ids, 10**6, purpose="holdout", seed=42)
    assert held.to_list() == [563656, 720550, None, 505581, 563656]
    assert [_blake2b(i, b"holdout:42", 10**6) for i in ("u000001", "u000002", "abc")] == [
        563656, 720550, 505581]
    assert shard_of(pl.Series([7, 7]), 5).to_list() == [shard_of(pl.Series(["7"]), 5)[0]] * 2
    with pytest.raises(ConfigError, match="1 or more"):
        shard_of(ids, 0)
    with pytest.raises(ConfigError, match="longer than 64 bytes"):
        shard_of(ids, 64, purpose="x" * 64)


INDEPENDENT_USERS, SHARE, DRAW_SEED, N_DRAW_SHARDS = 200_000, 0.1, 42, 8


def _draws(users: pl.Series) -> dict[str, np.ndarray]:
    """Each seeded draw of ``users`` at ``SHARE``, made as the pipeline makes it."""
    keys = _keys(pl.DataFrame({USER: users}), pl.DataFrame({USER: users}), 0, DRAW_SEED)
    later = _keys(pl.DataFrame({USER: users}), pl.DataFrame({USER: users}), 1, DRAW_SEED)
    sequence = shard_of(users, HOLDOUT_SCALE, purpose="sequence", seed=DRAW_SEED)  # sample_shard
    below = SHARE * HOLDOUT_SCALE
    draws = {"selection": Selection(SHARE, DRAW_SEED).drawn(users),
             "holdout": holdout_key(users, DRAW_SEED) < below,
             "group w0": keys[GROUP_KEY] < below, "group w1": later[GROUP_KEY] < below,
             "sequence": sequence < below}
    assert (keys[USER_KEY] < below).equals(draws["holdout"], check_names=False)
    return {name: drawn.to_numpy() for name, drawn in draws.items()}


def _crc_draws(users: pl.Series) -> dict[str, np.ndarray]:
    """The same draws as the pipeline made them before: CRC-32 of a prefix and the id."""
    prefixes = {"selection": f"selection:{DRAW_SEED}:", "holdout": f"{DRAW_SEED}:",
                "group w0": f"{DRAW_SEED}:group:0:", "group w1": f"{DRAW_SEED}:group:1:",
                "sequence": f"{DRAW_SEED}:sequence:"}
    return {name: np.array([zlib.crc32((prefix + u).encode()) % HOLDOUT_SCALE
                            < SHARE * HOLDOUT_SCALE for u in users])
            for name, prefix in prefixes.items()}


def _pair_errors(draws: dict[str, np.ndarray]) -> dict[tuple[str, str], float]:
    """Per pair of draws: how many standard errors their joint rate lies from ``SHARE``^2."""
    joint = SHARE**2
    error = math.sqrt(joint * (1 - joint) / INDEPENDENT_USERS)
    return {(a, b): ((draws[a] & draws[b]).mean() - joint) / error
            for a, b in itertools.combinations(draws, 2)}


def test_draws_are_independent_of_each_other_and_of_the_shard() -> None:
    users = pl.Series(USER, [f"u{i:07d}" for i in range(INDEPENDENT_USERS)])
    draws = _draws(users)
    for name, drawn in draws.items():
        assert abs(drawn.mean() - SHARE) < 4 * math.sqrt(SHARE * (1 - SHARE) / drawn.size), name
    errors = _pair_errors(draws)
    assert max(map(abs, errors.values())) < 4, errors
    shards = shard_of(users, N_DRAW_SHARDS).to_numpy()
    for shard, (name, drawn) in itertools.product(range(N_DRAW_SHARDS), draws.items()):
        inside = drawn[shards == shard]
        error = math.sqrt(SHARE * (1 - SHARE) / inside.size)
        assert abs(inside.mean() - SHARE) < 4 * error, (shard, name)
    # The CRC-32 of prefix + id is the CRC-32 of the id XOR a constant of the prefix: the same
    # users drawn that way fall into pairs of draws far more or far less often than SHARE^2
    # (selection and group w1: 0.33% of users instead of 1%, 30 standard errors off).
    crc_errors = _pair_errors(_crc_draws(users))
    assert crc_errors["selection", "group w1"] < -20
    assert sum(abs(e) > 4 for e in crc_errors.values()) >= 5, crc_errors


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


def test_joined_bucket_files_are_their_rows_in_order(tmp_path):
    """The flow joins the buckets' neighbour files by streaming them: the same table, in order."""
    from tasks.evaluation.evaluate_shards import join_files

    rng = np.random.default_rng(5)
    parts = [pl.DataFrame({"item_id": [f"i{b}-{j}" for j in range(n)],
                           "neighbour": [f"i{j}" for j in rng.integers(0, 50, n)],
                           "score": rng.random(n)}) for b, n in enumerate((40, 0, 7, 300))]
    files = []
    for b, part in enumerate(parts):
        files.append(tmp_path / f"bucket-{b:05d}.parquet")
        part.write_parquet(files[-1])
    out = join_files(files, tmp_path / "neighbours.parquet")
    assert pl.read_parquet(out).equals(pl.concat(parts))
