"""The milvus gallery store on Milvus Lite (a real Milvus engine in-process): the same interface,
filters that cannot be broken out of, and search equal to brute force after concurrent writes."""

from __future__ import annotations

import numpy as np
import pytest

from finegrain.errors import FinegrainError
from finegrain.gallery.filters import make_filter
from finegrain.gallery.store import open_store

from .test_embedded_store import DIM, SPEC, assert_answers_as_brute_force, entry, write_at_once

pytest.importorskip("pymilvus", reason="the milvus backend needs pymilvus: pip install 'finegrain[milvus]'")
pytest.importorskip("milvus_lite", reason="Milvus Lite is not installed: pip install 'finegrain[milvus]'")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = open_store(str(tmp_path_factory.mktemp("milvus") / "gallery.db"), SPEC)
    yield s
    s.close()


def test_writes_reads_dedupe_and_images(store):
    rng = np.random.default_rng(0)
    ids = store.add([entry(rng, "a", {"n": i}, image=f"pic{i}".encode()) for i in range(4)])
    assert len(set(ids)) == 4 and all(i < 2**53 for i in ids)
    assert store.add([entry(rng, image=b"pic2")]) == [ids[2]] and store.count() == 4
    assert store.image(ids[1]) == (b"pic1", "image/png")
    assert store.update(ids[0], label="b").label == "b" and store.get(ids[0]).metadata == {"n": 0}
    assert store.count("b") == 1 and [e.id for e in store.list(offset=1, limit=2)] == sorted(ids)[1:3]
    assert store.remove(ids[3]) and not store.remove(ids[3]) and store.image(ids[3]) is None
    assert store.count() == 3


def test_filters_on_milvus_never_break_out(store):
    rng = np.random.default_rng(1)
    sneaky = 'red" || label != "'
    ids = store.add(
        [
            entry(rng, "car", {"colour": "red"}),
            entry(rng, "car", {"colour": sneaky}),
            entry(rng, 'x" || true || "', {"colour": "blue"}),
        ]
    )
    q = rng.normal(size=DIM)
    assert [i for i, _ in store.search(q, 50, make_filter("metadata.colour", "red"))] == [ids[0]]
    assert [i for i, _ in store.search(q, 50, make_filter("metadata.colour", sneaky))] == [ids[1]]
    assert store.search(q, 50, make_filter("label", 'car" || true || "')) == []
    assert [i for i, _ in store.search(q, 50, make_filter("label", 'x" || true || "'))] == [ids[2]]
    assert store.count('car" || label != "') == 0 and store.count("car") == 2
    with pytest.raises(FinegrainError, match="control characters"):
        store.search(q, 5, make_filter("label", "a\n"))


def test_concurrent_clients_leave_search_equal_to_brute_force(store):
    write_at_once([store] * 4, 15, 10)
    assert_answers_as_brute_force(store, 10, 10)


def test_a_reopened_milvus_store_keeps_its_entries(tmp_path):
    rng = np.random.default_rng(5)
    path = str(tmp_path / "again.db")
    first = open_store(path, SPEC)
    ids = first.add([entry(rng, "k", {"n": 1}, image=b"kept")])
    first.close()
    again = open_store(path)  # the spec is read back from the companion collection
    assert again.spec == SPEC and again.count() == 1 and again.image(ids[0]) == (b"kept", "image/png")
    assert again.search(again.vectors()[1][0], 1)[0][0] == ids[0]
    again.close()
