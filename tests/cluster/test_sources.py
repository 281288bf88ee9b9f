"""Listing files (CSV or Parquet of path[,label][,id]) read as the rows a cluster embeds."""

from __future__ import annotations

import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'finegrain[cluster]')")

from finegrain.cluster.sources import read_listing
from finegrain.errors import FinegrainError


def test_parquet_listing_with_class_names_ids_and_relative_paths(tmp_path):
    import pyarrow.parquet as pq

    table = pa.table(
        {"path": ["a/1.jpg", "/abs/2.jpg", "s3://bucket/3.jpg"], "label": ["owl", "cat", "owl"], "id": ["x", "y", "z"]}
    )
    pq.write_table(table, tmp_path / "list.parquet")
    listing = read_listing(str(tmp_path / "list.parquet"))
    assert listing.paths == [str(tmp_path / "a" / "1.jpg"), "/abs/2.jpg", "s3://bucket/3.jpg"]
    assert listing.class_names == ["cat", "owl"] and listing.labels.tolist() == [1, 0, 1]
    assert listing.ids == ["x", "y", "z"]


def test_csv_listing_without_labels_or_ids(tmp_path):
    (tmp_path / "list.csv").write_text("path\n1.jpg\n2.jpg\n")
    listing = read_listing(str(tmp_path / "list.csv"))
    assert listing.ids == ["0", "1"] and listing.labels.tolist() == [-1, -1] and listing.class_names is None
    other = tmp_path / "other.csv"
    other.write_text("path\n1.jpg\n3.jpg\n")
    assert read_listing(str(other)).fingerprint() != listing.fingerprint()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file\n1.jpg\n", "no 'path' column"),
        ("path,id\n1.jpg,a\n2.jpg,a\n", "repeats an id"),
    ],
)
def test_bad_listings_are_named(tmp_path, text, message):
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(FinegrainError, match=message):
        read_listing(str(tmp_path / "list.csv"))


def test_missing_listing_is_named(tmp_path):
    with pytest.raises(FinegrainError, match="cannot read the listing"):
        read_listing(str(tmp_path / "absent.csv"))
