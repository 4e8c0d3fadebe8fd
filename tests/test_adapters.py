"""Adapters on the real dataset samples and on small generic CSV / Parquet files."""

from __future__ import annotations

import datetime as dt
import gzip
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from models.columns import (
    BRAND,
    CATEGORY,
    EVENT_DTYPES,
    EVENT_REQUIRED,
    EVENT_TYPE,
    EVENT_TYPES,
    ITEM,
    ITEM_DTYPES,
    PRICE,
    TIMESTAMP,
    USER,
)
from models.errors import ConfigError, DataError
from tasks.data.adapters import FORMATS, RawData, load_raw
from tasks.data.formats import S3REC_BASE_TIME

SAMPLES = {
    "taobao": "taobao_userbehavior_sample",
    "rees46": "rees46_sample",
    "diginetica": "diginetica",
    "hm": "hm_sample",
    "s3rec": "amazon_s3rec",
    "uci-retail": "uci_online_retail_sample",
    "rechorus": "amazon_grocery_rechorus",
}
UTC = dt.UTC


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@pytest.fixture(scope="module")
def loaded(shared_data: Path) -> Callable[[str], RawData]:
    """Each real sample loaded once per module, on first use."""
    cache: dict[str, RawData] = {}

    def get(fmt: str) -> RawData:
        if fmt not in cache:
            cache[fmt] = load_raw(shared_data / SAMPLES[fmt], fmt)
        return cache[fmt]

    return get


def type_counts(raw: RawData) -> dict[str, int]:
    return dict(raw.events[EVENT_TYPE].value_counts().iter_rows())


def dtype_names(frame: pl.DataFrame) -> dict[str, str]:
    def name(dtype: pl.DataType) -> str:
        if isinstance(dtype, pl.Datetime):
            return f"Datetime({dtype.time_unit}, {dtype.time_zone})"
        if isinstance(dtype, pl.List):
            return f"List({dtype.inner})"
        return str(dtype)

    return {column: name(dtype) for column, dtype in frame.schema.items()}


# --- every real sample ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_real_sample_has_canonical_tables(loaded: Callable[[str], RawData], fmt: str) -> None:
    raw = loaded(fmt)
    assert raw.events.columns[:4] == list(EVENT_REQUIRED)
    assert dtype_names(raw.events) == {c: EVENT_DTYPES[c] for c in raw.events.columns}
    assert set(raw.events[EVENT_TYPE].unique()) <= set(EVENT_TYPES)
    assert raw.events[TIMESTAMP].null_count() == 0
    assert raw.events[TIMESTAMP].is_sorted()
    assert raw.items is not None
    assert dtype_names(raw.items) == {c: ITEM_DTYPES[c] for c in raw.items.columns}
    assert raw.items[ITEM].is_unique().all()
    assert raw.ordered_only == (fmt == "s3rec")
    assert raw.name.startswith(fmt)


def test_taobao_maps_behaviours_and_keeps_every_row(loaded: Callable[[str], RawData]) -> None:
    raw = loaded("taobao")
    assert raw.events.height == 84_475
    assert type_counts(raw) == {"view": 75_872, "cart": 4_497, "fav": 2_356, "purchase": 1_750}
    assert raw.events[USER].n_unique() == 815
    assert raw.items is not None
    assert raw.items.height == 55_368
    assert raw.items["category_id"].n_unique() == 2_914
    assert raw.events[TIMESTAMP].min() == utc(2017, 9, 11, 8, 16, 39)  # the stray early rows
    assert raw.events[TIMESTAMP].max() < utc(2017, 12, 4)


def test_taobao_reads_the_original_file_without_header(tmp_path: Path) -> None:
    lines = "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,buy,1511561733\n"
    (tmp_path / "UserBehavior.csv").write_text(lines)
    raw = load_raw(tmp_path, "taobao")
    assert raw.events[EVENT_TYPE].to_list() == ["view", "purchase"]
    assert raw.events[TIMESTAMP][0] == utc(2017, 11, 24, 17, 21, 10)


def test_rees46_sample(loaded: Callable[[str], RawData]) -> None:
    raw = loaded("rees46")
    assert raw.events.height == 1_000
    assert type_counts(raw) == {"view": 987, "purchase": 10, "cart": 3}
    assert raw.events[USER].n_unique() == 330
    assert raw.events["session_id"].n_unique() == 372
    assert raw.events[TIMESTAMP].min() == utc(2019, 10, 1)
    assert raw.events[TIMESTAMP].max() == utc(2019, 10, 1, 0, 17, 26)
    assert raw.events["price"].null_count() == 0
    assert raw.items is not None
    assert raw.items.height == 534
    codes = raw.items.filter(pl.col("attributes").list.len() > 0)["attributes"].list.first()
    assert codes.str.contains(r"^[a-z_]+(\.[a-z_]+)*$").all()


def _rees46(folder: Path, rows: list[str]) -> RawData:
    """Load a rees46 month file holding ``rows``."""
    header = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,"
    (folder / "2019-Oct.csv").write_text(header + "user_session\n" + "\n".join(rows) + "\n")
    return load_raw(folder, "rees46")


def test_rees46_drops_remove_from_cart_with_a_note(tmp_path: Path) -> None:
    raw = _rees46(tmp_path, [
        "2019-10-01 00:00:00 UTC,view,1,10,a.b,x,1.5,7,s1",
        "2019-10-01 00:00:05 UTC,remove_from_cart,1,10,a.b,x,1.5,7,s1",
        "2019-10-01 00:00:09 UTC,cart,2,10,,,2.0,7,s1",
    ])
    assert raw.events[EVENT_TYPE].to_list() == ["view", "cart"]
    assert any("1 'remove_from_cart'" in note for note in raw.notes)


def test_rees46_items_keep_the_values_first_seen(tmp_path: Path) -> None:
    # the price and category later in the log must not reach windows before them
    items = _rees46(tmp_path, [
        "2019-10-02 00:00:00 UTC,view,1,11,c.d,y,9.0,8,s2",
        "2019-10-01 00:00:00 UTC,view,1,10,a.b,x,1.5,7,s1",
        "2019-10-03 00:00:00 UTC,cart,1,12,,z,4.0,7,s3",
    ]).items
    assert items.select(ITEM, CATEGORY, BRAND, PRICE).row(0) == ("1", "10", "x", 1.5)


def test_diginetica_purchases_views_and_anonymous_users(loaded: Callable[[str], RawData]) -> None:
    raw = loaded("diginetica")
    assert type_counts(raw) == {"purchase": 18_025, "view": 12_391}
    purchases = raw.events.filter(pl.col(EVENT_TYPE) == "purchase")
    known = purchases.filter(~pl.col(USER).str.starts_with("s"))
    assert known[USER].n_unique() == 4_425
    assert purchases.height - known.height == 11_322
    assert (purchases[USER] == "s" + purchases["session_id"]).sum() == 11_322
    assert any("11,322" in note and "session" in note for note in raw.notes)
    assert purchases[TIMESTAMP].min() >= utc(2016, 1, 2)
    assert purchases[TIMESTAMP].max() < utc(2016, 6, 18)  # every event stays on its eventdate
    assert raw.items is not None
    assert raw.items.height == 184_047


def test_diginetica_timestamp_is_eventdate_plus_timeframe(tmp_path: Path) -> None:
    rows = "session_id;user_id;item_id;timeframe;eventdate\n1;NA;81766;526309;2016-05-09\n"
    (tmp_path / "train-item-views.csv").write_text(rows)
    raw = load_raw(tmp_path, "diginetica")
    assert raw.events[TIMESTAMP][0] == utc(2016, 5, 9, 0, 8, 46, 309_000)
    assert raw.events[USER][0] == "s1"
    assert raw.items is None


def test_hm_keeps_leading_zeros_and_file_order(
    loaded: Callable[[str], RawData], shared_data: Path
) -> None:
    raw = loaded("hm")
    assert raw.events.height == 31_662
    assert type_counts(raw) == {"purchase": 31_662}
    assert raw.events[USER].n_unique() == 1_364
    assert raw.events[ITEM].n_unique() == 17_033
    assert raw.events[ITEM].str.starts_with("0").all()
    source = pl.read_csv(shared_data / SAMPLES["hm"] / "transactions_train_sample.csv.gz",
                         schema_overrides={"article_id": pl.String})
    assert raw.events[ITEM].to_list() == source["article_id"].to_list()  # the file is by date
    assert raw.events[TIMESTAMP].min() == utc(2018, 9, 20)
    assert raw.events[TIMESTAMP].max() == utc(2020, 9, 22)
    assert raw.items is not None
    assert raw.items.height == 11_800
    first = raw.items.row(0, named=True)
    assert first["item_id"] == "0111565001"
    assert first["title"] == "20 den 1p Stockings"
    assert first["category_id"] == "Underwear Tights"
    assert "colour:Black" in first["attributes"]
    assert any("31.3%" in note for note in raw.notes)


def test_s3rec_orders_each_user_sequence(loaded: Callable[[str], RawData]) -> None:
    raw = loaded("s3rec")
    assert raw.ordered_only
    assert raw.name == "s3rec-beauty"
    assert raw.events.height == 198_502
    assert raw.events[USER].n_unique() == 22_363
    assert raw.events[ITEM].n_unique() == 12_101
    first = raw.events.filter(pl.col(USER) == "1")  # line "1 1 2 3 4 5"
    assert first[ITEM].to_list() == ["1", "2", "3", "4", "5"]
    offsets = [(t - S3REC_BASE_TIME).total_seconds() for t in first[TIMESTAMP]]
    assert offsets == [0, 1, 2, 3, 4]
    assert raw.items is not None
    assert raw.items.height == 12_101
    assert raw.items["attributes"].explode().n_unique() == 637


def test_uci_retail_drops_anonymous_cancelled_and_returns(loaded: Callable[[str], RawData]) -> None:
    raw = loaded("uci-retail")
    assert raw.events.height == 1_071 - 1 - 10
    assert raw.notes == [
        "dropped 1 rows without CustomerID",
        "dropped 10 rows of cancelled invoices (InvoiceNo 'C...')",
        "dropped 0 rows with a Quantity of zero or less",
    ]
    assert not raw.events["session_id"].str.starts_with("C").any()
    assert (raw.events["quantity"] > 0).all()
    assert raw.events[USER].n_unique() <= 50
    assert raw.events[TIMESTAMP].min() == utc(2010, 12, 1, 8, 26)
    assert raw.events[TIMESTAMP].max() == utc(2010, 12, 1, 12, 49)
    assert raw.items is not None
    assert raw.items.height == 620
    heart = raw.items.filter(pl.col(ITEM) == "85123A").row(0, named=True)
    assert heart["title"] == "WHITE HANGING HEART T-LIGHT HOLDER"


def test_uci_retail_drops_non_positive_quantities(tmp_path: Path) -> None:
    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
    rows = ["1,A,x,2,12/1/2010 8:26,1.0,17850.0,UK", "2,B,y,0,12/1/2010 8:27,1.0,17850,UK"]
    (tmp_path / "OnlineRetail.csv").write_text("\n".join([header, *rows]) + "\n")
    raw = load_raw(tmp_path / "OnlineRetail.csv", "uci-retail")
    assert raw.events[USER].to_list() == ["17850"]
    assert "dropped 1 rows with a Quantity of zero or less" in raw.notes


def test_rechorus_sample(loaded: Callable[[str], RawData]) -> None:
    raw = loaded("rechorus")
    assert raw.events.height == 121_892
    assert raw.events[USER].n_unique() == 14_681
    assert raw.events[ITEM].n_unique() == 8_687
    assert raw.events[TIMESTAMP].min() == utc(2000, 8, 9)
    assert raw.events[TIMESTAMP].max() == utc(2014, 7, 22)
    assert raw.items is not None
    assert raw.items.height == 8_713
    assert raw.items["category_id"].n_unique() == 57


# --- generic csv / parquet --------------------------------------------------------------------


def test_csv_with_column_and_event_maps(tmp_path: Path) -> None:
    csv = tmp_path / "clicks.csv"
    csv.write_text(
        "ts,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,0355,\n"
        "1433224214164,992329,addtocart,248676,\n"
        "1433221999827,111016,transaction,0355,4000\n"
    )
    raw = load_raw(
        csv, "csv",
        column_map={"user_id": "visitorid", "item_id": "itemid", "event_type": "event",
                    "timestamp": "ts"},
        event_map={"transaction": "purchase", "addtocart": "cart"},
    )
    assert raw.name == "clicks"
    assert raw.items is None
    assert raw.events[EVENT_TYPE].to_list() == ["view", "purchase", "cart"]  # sorted by time
    assert raw.events[ITEM].to_list() == ["0355", "0355", "248676"]
    assert raw.events[TIMESTAMP][0] == dt.datetime(2015, 6, 2, 5, 2, 12, 117_000, tzinfo=UTC)
    assert any("transactionid" in note for note in raw.notes)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["2024-05-01T13:45:00"], utc(2024, 5, 1, 13, 45)),
        (["2024-05-01 13:45"], utc(2024, 5, 1, 13, 45)),
        (["2024-05-01T15:45:00+02:00"], utc(2024, 5, 1, 13, 45)),
        (["2024-05-01T13:45:00Z"], utc(2024, 5, 1, 13, 45)),
        (["2024-05-01 13:45:00 UTC"], utc(2024, 5, 1, 13, 45)),
        (["2024-05-01"], utc(2024, 5, 1)),
        (["1714571100"], utc(2024, 5, 1, 13, 45)),
        (["1714571100000"], utc(2024, 5, 1, 13, 45)),
        (["1714571100.5"], utc(2024, 5, 1, 13, 45, 0, 500_000)),
    ],
)
def test_csv_timestamp_forms(tmp_path: Path, values: list[str], expected: dt.datetime) -> None:
    rows = "".join(f"u,i,view,{v}\n" for v in values)
    (tmp_path / "events.csv").write_text("user_id,item_id,event_type,timestamp\n" + rows)
    raw = load_raw(tmp_path / "events.csv", "csv")
    assert raw.events[TIMESTAMP][0] == expected


def test_csv_folder_with_items_and_semicolons(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text("user_id;item_id;event_type;timestamp;price\n"
                                         "u1;007;purchase;2024-01-01;9.5\n")
    (tmp_path / "items.csv").write_text("item_id;category_id;title;attributes\n"
                                        "007;3;Bond;red | big\n")
    raw = load_raw(tmp_path, "csv")
    assert raw.name == tmp_path.name
    assert raw.events.row(0) == ("u1", "007", "purchase", utc(2024, 1, 1), 9.5)
    assert raw.items is not None
    assert raw.items.row(0, named=True) == {
        "item_id": "007", "category_id": "3", "title": "Bond", "attributes": ["red", "big"],
    }


def canonical_tables() -> tuple[pl.DataFrame, pl.DataFrame]:
    events = pl.DataFrame(
        {
            "user_id": ["u1", "u2", "u1"],
            "item_id": ["i1", "i2", "i2"],
            "event_type": ["view", "cart", "purchase"],
            "timestamp": [utc(2024, 1, 1), utc(2024, 1, 2), utc(2024, 1, 2)],
            "session_id": ["s1", "s2", None],
            "price": [1.0, 2.0, None],
            "quantity": [1, 1, 2],
        },
        schema_overrides={"timestamp": pl.Datetime("us", "UTC")},
    )
    items = pl.DataFrame(
        {"item_id": ["i1", "i2"], "category_id": ["c", None], "brand": ["b", "b"],
         "price": [1.0, 2.0], "title": ["one", "two"], "attributes": [["x"], []]},
        schema_overrides={"attributes": pl.List(pl.String)},
    )
    return events, items


def test_parquet_folder_round_trip(tmp_path: Path) -> None:
    events, items = canonical_tables()
    events.write_parquet(tmp_path / "events.parquet")
    items.write_parquet(tmp_path / "items.parquet")
    raw = load_raw(tmp_path, "parquet")
    assert raw.events.equals(events)
    assert raw.items is not None
    assert raw.items.equals(items)
    assert raw.notes == []


def test_csv_round_trip_of_polars_output(tmp_path: Path) -> None:
    events, _ = canonical_tables()
    with gzip.open(tmp_path / "events.csv.gz", "wb") as fh:
        events.write_csv(fh)
    raw = load_raw(tmp_path, "csv")
    assert raw.events.equals(events)


def test_parquet_with_integer_ids_and_naive_times(tmp_path: Path) -> None:
    pl.DataFrame({
        "user_id": [1.0, None], "item_id": [10, 11], "event_type": ["view", "view"],
        "timestamp": [dt.datetime(2024, 1, 1, 12), dt.datetime(2024, 1, 1, 13)],
    }).write_parquet(tmp_path / "log.parquet")
    raw = load_raw(tmp_path / "log.parquet", "parquet")
    assert raw.events[USER].to_list() == ["1", None]  # null ids are kept for validation
    assert raw.events[ITEM].to_list() == ["10", "11"]
    assert raw.events[TIMESTAMP][0] == utc(2024, 1, 1, 12)


def test_float_ids_with_nan_are_integer_ids_and_nulls_with_a_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pl.DataFrame({
        "user_id": [7.0, float("nan"), 12.0, None], "item_id": [1.0, 2.0, float("nan"), 4.0],
        "event_type": ["view"] * 4, "timestamp": [utc(2024, 1, 1, h) for h in range(4)],
    }).write_parquet(tmp_path / "events.parquet")
    with caplog.at_level("INFO", logger="tasks"):
        raw = load_raw(tmp_path, "parquet")
    assert raw.events[USER].to_list() == ["7", None, "12", None]  # never "NaN" or "7.0"
    assert raw.events[ITEM].to_list() == ["1", "2", None, "4"]
    assert "'user_id' of" in caplog.text
    assert "2 whole numbers read as integer ids" in caplog.text
    assert "2 missing (NaN or null) kept as null" in caplog.text


@pytest.mark.parametrize(("dtype", "ids", "phrase"), [
    (pl.Float64, [7.0, 7.5, 8.0, 1.25], "2 of 4 values that are not whole numbers, e.g. 7.5"),
    (pl.Float32, [1.0, 20_000_000.0, 30_000_000.0, 2.0],
     "2 of 4 values that are not exact in Float32 (beyond 2^24"),
])
def test_float_ids_that_are_not_whole_or_not_exact_are_refused(tmp_path: Path, dtype, ids,
                                                                 phrase) -> None:
    """1.5 is no id, and above 2^24 a Float32 id may be another id rounded: both refused."""
    pl.DataFrame({
        "user_id": pl.Series(ids, dtype=dtype), "item_id": ["a", "b", "c", "d"],
        "event_type": ["view"] * 4, "timestamp": [utc(2024, 1, 1, h) for h in range(4)],
    }).write_parquet(tmp_path / "events.parquet")
    with pytest.raises(DataError) as refused:
        load_raw(tmp_path, "parquet")
    assert "Column 'user_id' of" in str(refused.value)
    assert phrase in str(refused.value)
    assert "text" in str(refused.value)  # the fix


def test_catalogue_drops_exact_copies_and_keeps_conflicting_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events, items = canonical_tables()
    events.write_parquet(tmp_path / "events.parquet")
    repeated = pl.concat([items, items.head(1), items.tail(1).with_columns(price=pl.lit(9.0))])
    repeated.write_parquet(tmp_path / "items.parquet")
    with caplog.at_level("INFO", logger="tasks"):
        raw = load_raw(tmp_path, "parquet")
    assert raw.items is not None
    assert raw.items.equals(pl.concat([items, items.tail(1).with_columns(price=pl.lit(9.0))]))
    assert raw.dropped_item_duplicates == 1
    assert "dropped 1 rows of" in caplog.text
    assert "repeat another row exactly" in caplog.text


def test_dates_and_missing_timestamps(tmp_path: Path) -> None:
    pl.DataFrame({
        "user_id": ["a", "b", "c"], "item_id": ["i", "i", "i"], "event_type": ["view"] * 3,
        "timestamp": [dt.date(2024, 1, 2), None, dt.date(2024, 1, 1)],
    }).write_parquet(tmp_path / "events.parquet")
    raw = load_raw(tmp_path, "parquet")
    assert raw.events[USER].to_list() == ["c", "a", "b"]  # missing times last, kept for checks
    assert raw.events[TIMESTAMP].to_list() == [utc(2024, 1, 1), utc(2024, 1, 2), None]


def test_map_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="visitor"):
        load_raw(Path(__file__), "csv", column_map={"visitor": "visitorid"})
    with pytest.raises(ConfigError, match="view, cart, fav, purchase"):
        load_raw(Path(__file__), "csv", event_map={"transaction": "buy"})


def test_formats_are_the_documented_ones() -> None:
    assert FORMATS == ("taobao", "rees46", "diginetica", "hm", "s3rec", "uci-retail",
                       "rechorus", "csv", "parquet")
