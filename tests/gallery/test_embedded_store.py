"""The embedded gallery store (SQLite ledger + FAISS): writes, reads, filters, another process's
writes, damage, and concurrent clients against an exact brute-force search."""

from __future__ import annotations

import json
import logging
import random
import shutil
import sqlite3
import threading

import numpy as np
import pytest

from finegrain.errors import ConfigError, FinegrainError
from finegrain.gallery.embedded import DB_FILE, SNAPSHOT_FILE, SNAPSHOT_MAGIC, EmbeddedStore
from finegrain.gallery.filters import make_filter, milvus_expression, parse_filter
from finegrain.gallery.store import NewEntry, StoreSpec, open_store

DIM = 16
SPEC = StoreSpec(DIM, "cosine", "model-a")


def entry(
    rng: np.random.Generator, label: str = "a", metadata: dict | None = None, image: bytes | None = None
) -> NewEntry:
    return NewEntry(rng.normal(size=DIM).astype(np.float32), label, image or rng.bytes(32), "image/png", metadata or {})


def brute_force(store, query: np.ndarray, k: int) -> list[int]:
    ids, x = store.vectors()
    q = query / np.linalg.norm(query)
    order = np.argsort(-(x @ q), kind="stable")[:k]
    return [int(ids[i]) for i in order]


def random_writes(store, seed: int, n: int, errors: list[BaseException]) -> None:
    """``n`` random adds (55%), removes (25%) and relabels by one client; what goes wrong in ``errors``."""
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    try:
        for _ in range(n):
            op = pick.random()
            listed = [e.id for e in store.list(limit=1000)]
            if op < 0.55 or not listed:
                store.add([entry(rng, pick.choice("abc"))])
            elif op < 0.8:
                store.remove(pick.choice(listed))
            else:
                store.update(pick.choice(listed), label=pick.choice("abc"))
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def write_at_once(clients: list, n: int, first_seed: int) -> None:
    """Each of ``clients`` makes ``n`` :func:`random_writes` in its own thread, all at once; none may fail."""
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=random_writes, args=(c, first_seed + i, n, errors)) for i, c in enumerate(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def assert_answers_as_brute_force(store, queries: int, k: int, seed: int = 7) -> None:
    """``store`` counts and lists exactly the vectors it holds, and finds for ``queries`` random queries
    the ``k`` nearest that a brute-force search over those vectors finds."""
    ids, _ = store.vectors()
    assert store.count() == len(ids) == len(store.list(limit=1000))
    rng = np.random.default_rng(seed)
    for _ in range(queries):
        q = rng.normal(size=DIM).astype(np.float32)
        assert [i for i, _ in store.search(q, k)] == brute_force(store, q, k)


def test_writes_reads_and_ids_never_reused(tmp_path):
    rng = np.random.default_rng(0)
    s = open_store(tmp_path / "g", SPEC)
    ids = s.add([entry(rng, "a", {"n": i}) for i in range(5)])
    assert ids == sorted(ids) and len(set(ids)) == 5 and s.count() == 5
    assert s.remove(ids[-1]) and not s.remove(ids[-1])
    [new] = s.add([entry(rng)])
    assert new not in ids  # an id is never given twice
    assert s.update(ids[0], label="b", metadata={"x": "y"}).label == "b"
    assert s.get(ids[0]).metadata == {"x": "y"} and s.update(10**9, label="c") is None
    assert [e.id for e in s.list(offset=1, limit=2)] == ids[1:3]
    assert s.count("b") == 1 and [e.id for e in s.list("b")] == [ids[0]]
    s.close()
    again = open_store(tmp_path / "g")  # reopened without a spec: it is read from the store
    assert again.count() == 5 and again.spec == SPEC


def test_same_bytes_keep_their_id_and_the_image_goes_with_its_entry(tmp_path):
    rng = np.random.default_rng(1)
    s = open_store(tmp_path / "g", SPEC)
    first = s.add([entry(rng, image=b"picture-1"), entry(rng, image=b"picture-2")])
    assert s.add([entry(rng, image=b"picture-2"), entry(rng, image=b"picture-1")]) == first[::-1]
    assert s.count() == 2 and s.image(first[0]) == (b"picture-1", "image/png")
    s.remove(first[0])
    assert s.image(first[0]) is None
    assert sqlite3.connect(tmp_path / "g" / DB_FILE).execute("SELECT COUNT(*) FROM images").fetchone()[0] == 1


def test_filters_select_by_label_and_metadata_and_values_never_break_out(tmp_path):
    rng = np.random.default_rng(2)
    s = open_store(tmp_path / "g", SPEC)
    sneaky = 'red" OR 1=1 --'
    ids = s.add(
        [
            entry(rng, "car", {"colour": "red", "n": 1}),
            entry(rng, "car", {"colour": "blue", "n": 2}),
            entry(rng, "bus", {"colour": sneaky, "n": 1, "ok": True}),
        ]
    )
    q = rng.normal(size=DIM)
    assert {i for i, _ in s.search(q, 10, make_filter("label", "car"))} == set(ids[:2])
    assert [i for i, _ in s.search(q, 10, make_filter("metadata.colour", "red"))] == [ids[0]]
    assert {i for i, _ in s.search(q, 10, make_filter("metadata.n", 1))} == {ids[0], ids[2]}
    assert [i for i, _ in s.search(q, 10, make_filter("metadata.ok", True))] == [ids[2]]
    assert s.search(q, 10, make_filter("metadata.n", "1")) == []  # a string is not the number
    # a value made to break out of a quoted string matches only itself, literally
    assert [i for i, _ in s.search(q, 10, make_filter("metadata.colour", sneaky))] == [ids[2]]
    assert s.search(q, 10, make_filter("label", "car' OR '1'='1")) == []
    for bad in (
        '{"metadata.colour\\") OR (1": 1}',
        '{"metadata.a.b": 1}',
        '{"label": 1}',
        '{"x": 1}',
        '{"label": "a", "metadata.n": 1}',
        '{"metadata.n": {"$ne": 0}}',
        "not json",
    ):
        with pytest.raises(FinegrainError):
            parse_filter(bad)
    assert milvus_expression(make_filter("metadata.colour", sneaky)) == 'metadata["colour"] == "red\\" OR 1=1 --"'


def test_another_connection_s_writes_are_searched(tmp_path):
    """A server's store sees what ``finegrain gallery`` (another connection) added or removed."""
    rng = np.random.default_rng(3)
    server = open_store(tmp_path / "g", SPEC)
    cli = open_store(tmp_path / "g")
    [_, b] = cli.add([entry(rng), entry(rng)])
    q = cli.vectors()[1][1]
    assert server.search(q, 1)[0][0] == b
    cli.remove(b)
    assert b not in [i for i, _ in server.search(q, 5)] and server.count() == 1


@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip-page", "wrong-size-vector"])
def test_a_damaged_store_is_refused_and_left_as_it_was(tmp_path, damage):
    rng = np.random.default_rng(4)
    s = open_store(tmp_path / "g", SPEC)
    s.add([entry(rng, image=rng.bytes(3000)) for _ in range(200)])
    s.close()
    db = tmp_path / "g" / DB_FILE
    data = bytearray(db.read_bytes())
    if damage == "garbage":
        data[:100] = b"x" * 100
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip-page":
        data[4096 * 3 : 4096 * 3 + 64] = b"\xff" * 64
    if damage == "wrong-size-vector":
        with sqlite3.connect(db) as c:
            c.execute("UPDATE entries SET vector = x'00' WHERE id = 7")
        data = bytearray(db.read_bytes())
    else:
        db.write_bytes(bytes(data))
    with pytest.raises(FinegrainError, match="damaged gallery store"):
        EmbeddedStore(tmp_path / "g", SPEC)
    assert db.read_bytes() == bytes(data)  # never emptied, never replaced


def test_a_folder_of_other_files_is_not_made_a_store(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    with pytest.raises(FinegrainError, match="not a gallery store"):
        open_store(tmp_path / "g", SPEC)
    with pytest.raises(FinegrainError, match="no gallery store"):
        open_store(tmp_path / "none")


def test_unknown_backend_and_other_model_are_named(tmp_path):
    with pytest.raises(ConfigError, match="embedded.*milvus|Valid"):
        open_store("qdrant://host/x", SPEC)
    open_store(tmp_path / "g", SPEC).close()
    with pytest.raises(FinegrainError, match="another model"):
        open_store(tmp_path / "g", StoreSpec(DIM, "cosine", "model-b"))


def test_concurrent_clients_leave_search_equal_to_brute_force(tmp_path):
    """4 clients (two on their own connection, as other processes) add, remove and relabel at random."""
    server = open_store(tmp_path / "g", SPEC)
    server.add([entry(np.random.default_rng(99)) for _ in range(20)])
    write_at_once([server, server, open_store(tmp_path / "g"), open_store(tmp_path / "g")], 60, 0)
    assert_answers_as_brute_force(server, 20, 10)
    assert server.indexed == server.count()


def test_the_cli_refuses_a_damaged_store_in_one_line(tmp_path):
    import subprocess
    import sys

    s = open_store(tmp_path / "g", SPEC)
    s.add([entry(np.random.default_rng(5)) for _ in range(3)])
    s.close()
    db = tmp_path / "g" / DB_FILE
    damaged = b"not a database at all" + db.read_bytes()[21:]
    db.write_bytes(damaged)
    r = subprocess.run(
        [sys.executable, "-m", "finegrain", "gallery", "stats", str(tmp_path), "--store", str(tmp_path / "g")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2 and "damaged gallery store" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and db.read_bytes() == damaged


def _filled(folder, n: int = 40, seed: int = 0) -> EmbeddedStore:
    rng = np.random.default_rng(seed)
    s = EmbeddedStore(folder, SPEC)
    s.add([entry(rng, "abc"[i % 3]) for i in range(n)])
    return s


def _same_answers(store) -> None:
    assert_answers_as_brute_force(store, 5, 7, seed=9)
    assert store.indexed == store.count()


def test_a_snapshot_is_loaded_and_the_ledger_after_it_replayed(tmp_path):
    s = _filled(tmp_path / "g")
    s.close()  # writes the snapshot
    assert (tmp_path / "g" / SNAPSHOT_FILE).is_file()
    other = EmbeddedStore(tmp_path / "g")  # another process's writes after the snapshot
    assert other.loaded_from == "snapshot"
    rng = np.random.default_rng(1)
    new = other.add([entry(rng, "late") for _ in range(3)])
    gone = [e.id for e in other.list(limit=2)]
    for i in gone:
        other.remove(i)
    other._write.close(), other._read.close()  # killed: no snapshot written at close
    s = EmbeddedStore(tmp_path / "g")
    assert s.loaded_from == "snapshot" and s.count() == 41
    assert set(new) <= {e.id for e in s.list(limit=1000)} and not set(gone) & {e.id for e in s.list(limit=1000)}
    _same_answers(s)


def _snapshot_header(path) -> dict:
    data = path.read_bytes()
    at = len(SNAPSHOT_MAGIC)
    return json.loads(data[at + 8 : at + 8 + int.from_bytes(data[at : at + 8], "little")])


@pytest.mark.parametrize("how", ["flipped-byte", "truncated", "other-store", "ahead-of-the-ledger", "not-a-snapshot"])
def test_a_snapshot_that_cannot_be_trusted_is_rebuilt_from_the_ledger(tmp_path, how, caplog):
    s = _filled(tmp_path / "g")
    s.close()
    snap = tmp_path / "g" / SNAPSHOT_FILE
    if how == "flipped-byte":
        data = bytearray(snap.read_bytes())
        data[len(data) // 2] ^= 0xFF  # a vector changed: the index would answer wrongly
        snap.write_bytes(bytes(data))
    elif how == "truncated":
        snap.write_bytes(snap.read_bytes()[:-100])
    elif how == "other-store":  # the same model and rows, but another store's index
        o = _filled(tmp_path / "o", seed=5)
        o.close()
        snap.write_bytes((tmp_path / "o" / SNAPSHOT_FILE).read_bytes())
    elif how == "ahead-of-the-ledger":  # the ledger restored from a backup older than the snapshot
        backup = tmp_path / "backup.sqlite"
        shutil.copy(tmp_path / "g" / DB_FILE, backup)
        s = EmbeddedStore(tmp_path / "g")
        s.add([entry(np.random.default_rng(7), "newer")])
        s.close()
        assert _snapshot_header(snap)["count"] == 41
        shutil.copy(backup, tmp_path / "g" / DB_FILE)
    else:
        snap.write_bytes(b"\0" * 4096)
    with caplog.at_level(logging.WARNING):
        s = EmbeddedStore(tmp_path / "g")
    assert s.loaded_from == "ledger" and "rebuilding the index from the ledger" in caplog.text
    assert s.count() == 40
    _same_answers(s)
    s.close()  # and the snapshot is right again
    assert EmbeddedStore(tmp_path / "g").loaded_from == "snapshot"
