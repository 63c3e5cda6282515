"""`pairs/<agents_hash>/` loads as one dataset with pyarrow.dataset and DuckDB: failed items live in their own
folder, and temporary objects are never seen by either (leading dot, `.tmp` suffix)."""

import shutil

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from flows.caption import caption_flow

pytestmark = pytest.mark.prefect


def test_pairs_load_as_one_dataset_with_pyarrow_and_duckdb(prefect_api, tiny_models, extracted_store, tmp_path):
    cache, _ = tiny_models
    store = tmp_path / "store"
    shutil.copytree(extracted_store, store)
    overrides = {"agents.model_cache": str(cache), "agents.describe.max_words": 30}  # some content failures
    summary = caption_flow(store=str(store), overrides=overrides)
    folder = store / "pairs" / summary["agents_hash"]
    (folder / ".CMU-1-Small-Region.parquet.host~1~abc.tmp").write_bytes(b"PAR1 half a shard")  # a crash leftover
    table = ds.dataset(folder, format="parquet").to_table()
    assert table.num_rows == summary["pairs"] and "caption" in table.column_names
    glob = str(store / "pairs" / "*" / "*.parquet")
    ((rows,),) = duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()
    assert rows == summary["pairs"]
    failed = pq.read_table(next((store / "failed" / summary["agents_hash"]).glob("*.parquet")))
    assert failed.num_rows == summary["failed_items"] and rows + failed.num_rows == 12
