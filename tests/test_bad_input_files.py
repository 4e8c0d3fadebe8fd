"""Bad input files give a DataError whose message names the file, the problem and the fix."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from models.errors import DataError, MissingColumnsError
from tasks.data.adapters import FORMATS, load_raw

HEADER = "user_id,item_id,event_type,timestamp"
TAOBAO = Path("taobao_userbehavior_sample") / "UserBehavior_sample.csv.gz"


def write_csv(path: Path, *rows: str, header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_missing_path_names_the_format_files_and_every_format(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_raw(missing, "taobao")
    message = str(err.value)
    assert str(missing) in message
    assert "does not exist" in message
    assert "UserBehavior*.csv[.gz]" in message
    assert all(fmt in message for fmt in FORMATS)


def test_unknown_format_lists_the_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Unknown data format 'tabao'") as err:
        load_raw(tmp_path, "tabao")
    assert "did you mean 'taobao'" in str(err.value)
    assert ", ".join(FORMATS) in str(err.value)


def test_folder_without_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no file named like transactions_train"):
        load_raw(tmp_path, "hm")
    with pytest.raises(DataError, match="holds no events file"):
        load_raw(tmp_path, "parquet")


@pytest.mark.parametrize("content", ["", HEADER + "\n"], ids=["zero-bytes", "header-only"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "events.csv"
    path.write_text(content)
    with pytest.raises(DataError, match="has no data rows") as err:
        load_raw(path, "csv")
    assert str(path) in str(err.value)


def test_missing_column_in_csv_lists_present_columns_and_suggests_column_map(
    tmp_path: Path,
) -> None:
    path = write_csv(tmp_path / "events.csv", "1,2,view,3", header="visitorid,itemid,event,ts")
    with pytest.raises(MissingColumnsError) as err:
        load_raw(path, "csv")
    message = str(err.value)
    assert "event_type, item_id, timestamp, user_id" in message
    assert "found columns: visitorid, itemid, event, ts" in message
    assert "column_map={'user_id': 'visitorid'" in message


def test_event_type_column_is_required_unless_mapped(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "events.csv", "1,2,3", header="user_id,item_id,timestamp")
    with pytest.raises(MissingColumnsError, match="column.s. event_type;") as err:
        load_raw(path, "csv")
    assert "add one with values view, cart, fav or purchase" in str(err.value)


def test_mapped_column_that_is_not_in_the_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "events.csv", "1,2,view,3")
    with pytest.raises(MissingColumnsError, match="visitorid") as err:
        load_raw(path, "csv", column_map={"user_id": "visitorid"})
    assert "column_map names them" in str(err.value)


def test_missing_column_in_a_fixed_format_names_its_columns(tmp_path: Path) -> None:
    write_csv(tmp_path / "UserBehavior.csv", "1,2,3,4", header="user_id,item_id,category_id,ts")
    with pytest.raises(MissingColumnsError, match="behavior_type, timestamp") as err:
        load_raw(tmp_path, "taobao")
    assert "user_id,item_id,category_id,behavior_type,timestamp" in str(err.value)


def test_timestamps_that_do_not_parse(tmp_path: Path) -> None:
    values = ["2024-01-01", "yesterday", "2024-01-02", "31/02/2024 x", "never", "soon", ""]
    path = write_csv(tmp_path / "events.csv", *(f"u,i,view,{v}" for v in values))
    with pytest.raises(DataError) as err:
        load_raw(path, "csv")
    message = str(err.value)
    assert "Column 'timestamp'" in message
    assert "4 of 7 values" in message  # the blank cell is missing, not bad
    assert "'yesterday', '31/02/2024 x', 'never'" in message
    assert "ISO 8601" in message


def test_uci_dates_in_an_unknown_format(tmp_path: Path) -> None:
    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
    write_csv(tmp_path / "OnlineRetail.csv", "1,A,x,2,1st of Dec,1.0,17850,UK", header=header)
    expected = "Column 'InvoiceDate'.*format '%m/%d/%Y %H:%M', e.g. '1st of Dec'"
    with pytest.raises(DataError, match=expected):
        load_raw(tmp_path, "uci-retail")


def test_non_numeric_price(tmp_path: Path) -> None:
    rows = ("u,i,view,2024-01-01,1.5", "u,i,view,2024-01-01,€3")
    path = write_csv(tmp_path / "events.csv", *rows, header=HEADER + ",price")
    with pytest.raises(DataError, match="Column 'price' .* 1 of 2 values that are not numbers"):
        load_raw(path, "csv")


def test_truncated_gzip(tmp_path: Path, shared_data: Path) -> None:
    whole = (shared_data / TAOBAO).read_bytes()
    path = tmp_path / "UserBehavior.csv.gz"
    path.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(DataError, match="corrupt or truncated gzip") as err:
        load_raw(tmp_path, "taobao")
    assert str(path) in str(err.value)
    assert "gzip -t" in str(err.value)


def test_corrupt_gzip(tmp_path: Path) -> None:
    body = bytearray(gzip.compress((HEADER + "\n" + "u,i,view,1\n" * 2000).encode()))
    body[40:60] = bytes(20)
    path = tmp_path / "events.csv.gz"
    path.write_bytes(bytes(body))
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        load_raw(path, "csv")


def test_truncated_gzip_json_attributes(tmp_path: Path) -> None:
    (tmp_path / "Beauty.txt").write_text("1 2 3\n")
    packed = gzip.compress(json.dumps({str(i): [i] for i in range(5000)}).encode())
    (tmp_path / "Beauty_item2attributes.json.gz").write_bytes(packed[:-100])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        load_raw(tmp_path, "s3rec")


def test_invalid_json_attributes(tmp_path: Path) -> None:
    (tmp_path / "Beauty.txt").write_text("1 2 3\n")
    (tmp_path / "Beauty_item2attributes.json").write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        load_raw(tmp_path, "s3rec")


def test_non_utf8_csv_gives_the_offset_and_a_fix(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_bytes(f"{HEADER}\nu,caf\xe9,view,2024-01-01\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8") as err:
        load_raw(path, "csv")
    offset = len(HEADER) + 1 + len("u,caf")
    assert f"offset {offset}, line 2" in str(err.value)
    assert "iconv -f latin1 -t utf-8" in str(err.value)


def test_unknown_event_types_are_listed_with_counts(tmp_path: Path) -> None:
    rows = ("u,i,click,1",) * 3 + ("u,i,transaction,1", "u,i,view,1")
    path = write_csv(tmp_path / "events.csv", *rows)
    with pytest.raises(DataError) as err:
        load_raw(path, "csv")
    message = str(err.value)
    assert "'click' (3), 'transaction' (1)" in message
    assert "event_map={'click': '...', 'transaction': '...'}" in message
    assert "'view'" not in message


def test_unknown_taobao_behaviour(tmp_path: Path) -> None:
    write_csv(tmp_path / "UserBehavior.csv", "1,2,3,like,1511544070",
              header="user_id,item_id,category_id,behavior_type,timestamp")
    with pytest.raises(DataError, match="'like' \\(1\\)"):
        load_raw(tmp_path, "taobao")


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match="could not be read as Parquet"):
        load_raw(tmp_path, "parquet")


def test_ragged_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "events.csv", "u,i,view,1,extra")
    with pytest.raises(DataError, match="could not be read as CSV.*same number of fields"):
        load_raw(path, "csv")


def test_no_events_left_after_drops(tmp_path: Path) -> None:
    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
    write_csv(tmp_path / "OnlineRetail.csv", "C1,A,x,-2,12/1/2010 8:26,1.0,17850,UK",
              header=header)
    with pytest.raises(DataError, match="gives no events after loading.*cancelled"):
        load_raw(tmp_path, "uci-retail")


def test_errors_are_never_raw_library_errors(tmp_path: Path) -> None:
    pl.DataFrame({"user_id": ["u"], "item_id": ["i"], "event_type": ["view"],
                  "timestamp": ["not a time"]}).write_parquet(tmp_path / "events.parquet")
    with pytest.raises(DataError, match="'not a time'") as err:
        load_raw(tmp_path, "parquet")
    assert not isinstance(err.value, pl.exceptions.PolarsError)
