"""The ``ivfpq`` kind: IVF-PQ codes re-ranked with the stored float16 vectors, built chunk by chunk,
its inverted lists in RAM or on disk (built shard by shard, merged on disk, memory-mapped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from finegrain.errors import FinegrainError
from finegrain.metrics.retrieval import l2_normalize
from finegrain.retrieval.index import GalleryIndex, exact_neighbours, index_meta
from finegrain.retrieval.large_index import (
    IN_RAM,
    LISTS_FILE,
    ON_DISK,
    VECTORS_FILE,
    RerankedIVFPQ,
    build_ivfpq,
    ivfpq_params,
    streaming_knn,
)

faiss = pytest.importorskip("faiss")

N, D = 6000, 32
CHECKSUM = "c" * 64


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    """Clustered vectors, normalised (as the cosine metric stores them)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, D)).astype(np.float32)
    return l2_normalize(centres[rng.integers(0, 40, N)] + 0.4 * rng.normal(size=(N, D)).astype(np.float32))


def _chunks(x: np.ndarray, size: int):
    return lambda: (x[s : s + size] for s in range(0, len(x), size))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_streaming_knn_equals_brute_force(x, metric):
    q = x[:50]
    d, i = streaming_knn(q, (x[s : s + 700] for s in range(0, N, 700)), 10, metric)
    ed, ei = exact_neighbours(q, x, 10, metric)
    assert np.array_equal(i, ei)
    assert np.allclose(d, ed, atol=1e-5)


def test_params_follow_size_and_recall_target():
    big = ivfpq_params(10**7, 512, recall=0.95)
    assert big["nlist"] == 4096 and big["m"] == 64 and big["nbits"] == 8
    assert ivfpq_params(10**7, 512, recall=0.8)["m"] == 32  # a lower target: smaller codes
    small = ivfpq_params(1000, 512)
    assert small["nlist"] <= 1000 // 39 and small["nbits"] < 8  # too few points for 256 centroids


def test_built_shard_by_shard_equals_built_in_one_go(x, tmp_path):
    """The same trained quantizer, filled in one call or in uneven shards, answers the same."""
    params = ivfpq_params(N, D)
    params["nprobe"] = 8
    one = RerankedIVFPQ.empty(D, "cosine", params)
    one.train(x[: params["train_points"]])
    trained = one.serialize()
    one.add(x)
    shards = RerankedIVFPQ(
        faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8)),
        "cosine",
        dict(params),
        vectors_file=tmp_path / "v.npy",
        n=N,
    )
    for lo, hi in ((0, 1), (1, 1500), (1500, 4321), (4321, N)):
        shards.add(x[lo:hi])
    q = x[::97]
    d1, i1 = one.search(q, 10)
    d2, i2 = shards.search(q, 10)
    assert np.array_equal(i1, i2)
    assert np.array_equal(d1, d2)
    assert (i1 >= 0).all()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_reranked_scores_are_exact_and_recall_meets_target(x, tmp_path, metric):
    index = build_ivfpq(_chunks(x, 1000), N, D, metric, tmp_path / "v.npy", recall=0.9)
    assert index.params["measured_recall"] >= 0.9
    q = x[1::301]
    d, i = index.search(q, 10)
    exact = (q[:, None, :] * x[i]).sum(-1) if metric == "cosine" else ((q[:, None, :] - x[i]) ** 2).sum(-1)
    assert np.allclose(d, exact, atol=2e-3)  # the float16 copy's rounding only
    order = -d if metric == "cosine" else d
    assert (np.diff(order, axis=1) >= 0).all()


def test_built_in_chunks_saves_and_loads_through_gallery_index(x, tmp_path):
    index = build_ivfpq(_chunks(x, 2500), N, D, "cosine", tmp_path / "work.npy")
    from finegrain.retrieval.index import index_meta

    meta = index_meta("c" * 64, D, "cosine", "ivfpq", N, index.params, index.params["measured_recall"], 0.0)
    gallery = GalleryIndex(index, np.arange(N) % 7, [f"{i}.jpg" for i in range(N)], None, meta)
    dest = gallery.save(tmp_path / "index")
    assert (dest / VECTORS_FILE).is_file() and not (tmp_path / "work.npy").exists()
    again = GalleryIndex.load(dest, expected_model_checksum="c" * 64)
    assert again.kind == "ivfpq" and again.n == N
    assert again.meta["approx_recall_at_10"] == index.params["measured_recall"]
    assert again.meta["bytes_per_vector"] > 2 * D  # the float16 copy and the codes
    s1, i1 = gallery.search(x[:20], 5)
    s2, i2 = again.search(x[:20], 5)
    assert np.array_equal(i1, i2) and np.allclose(s1, s2)
    assert i2[:, 0].tolist() == list(range(20))


def test_truncated_vectors_file_refused(x, tmp_path):
    gallery = GalleryIndex.build(
        x[:1000], np.zeros(1000), [f"{i}" for i in range(1000)], kind="ivfpq", model_checksum="c" * 64
    )
    dest = gallery.save(tmp_path / "index")
    data = (dest / VECTORS_FILE).read_bytes()
    (dest / VECTORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(FinegrainError, match=VECTORS_FILE):
        GalleryIndex.load(dest)


# -- on-disk inverted lists ---------------------------------------------------------
def _save(index: RerankedIVFPQ, dest: Path) -> GalleryIndex:
    meta = index_meta(CHECKSUM, D, "cosine", "ivfpq", N, index.params, index.params["measured_recall"], 0.0)
    gallery = GalleryIndex(index, np.arange(N) % 7, [f"{i}.jpg" for i in range(N)], None, meta)
    gallery.save(dest)
    return gallery


@pytest.fixture(scope="module")
def saved(x, tmp_path_factory) -> tuple[Path, GalleryIndex]:
    """An on-disk index, built in shards of 1,000 vectors' codes at most, saved."""
    work = tmp_path_factory.mktemp("ondisk")
    index = build_ivfpq(_chunks(x, 700), N, D, "cosine", work / "v.npy", recall=0.9, max_ram=4 * 1000 * 12)
    assert index.params["lists"] == ON_DISK
    return work / "index", _save(index, work / "index")


def test_memory_budget_chooses_where_the_lists_live():
    assert ivfpq_params(10**7, 512, max_ram=4 * 2**30)["lists"] == IN_RAM  # 720 MB of codes and ids
    assert ivfpq_params(10**8, 512, max_ram=4 * 2**30)["lists"] == ON_DISK  # 7.2 GB
    assert ivfpq_params(1000, 32, on_disk=True)["lists"] == ON_DISK
    with pytest.raises(FinegrainError, match="--max-ram"):
        ivfpq_params(1000, 32, max_ram=0)


def test_on_disk_lists_answer_as_in_ram_ones_from_the_same_quantizer(x, tmp_path):
    params = ivfpq_params(N, D)
    params.update(nprobe=8, max_ram=12 * 1500)  # shards of about 375 vectors' codes
    ram = RerankedIVFPQ.empty(D, "euclidean", params)
    ram.train(x[: params["train_points"]])
    trained = np.frombuffer(ram.serialize(), dtype=np.uint8)
    disk = RerankedIVFPQ(
        faiss.deserialize_index(trained), "euclidean", {**params, "lists": ON_DISK}, lists_dir=tmp_path / "lists"
    )
    for lo, hi in ((0, 1), (1, 1500), (1500, 4321), (4321, N)):
        ram.add(x[lo:hi])
        disk.add(x[lo:hi])
    assert len(list((tmp_path / "lists").glob("shard-*.faiss"))) == N // 375  # shards of 375, one in RAM
    q = x[::53]
    d1, i1 = ram.search(q, 10)
    d2, i2 = disk.search(q, 10)
    ivf = faiss.extract_index_ivf(disk.ivf)
    assert isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
    assert not list((tmp_path / "lists").glob("shard-*.faiss"))  # merged, then removed
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    assert disk.ntotal == N and (i1 >= 0).all()


def test_on_disk_index_loads_after_a_restart(saved, x):
    dest, gallery = saved
    assert (dest / LISTS_FILE).is_file()
    assert not any(p.name.endswith(".lists") for p in dest.parent.iterdir())  # the build's folder is gone
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["params"]["lists"] == ON_DISK and meta["files_bytes"][LISTS_FILE] > 0
    s1, i1 = gallery.search(x[:30], 5)
    code = (
        "import sys, json, numpy as np\n"
        "from finegrain.retrieval.index import GalleryIndex\n"
        f"g = GalleryIndex.load({str(dest)!r})\n"
        f"s, i = g.search(np.load({str(dest.parent / 'q.npy')!r}), 5)\n"
        "print(json.dumps({'ids': i.tolist(), 'scores': s.tolist()}))\n"
    )
    np.save(dest.parent / "q.npy", x[:30])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    got = json.loads(out.stdout)  # nothing but the JSON on stdout
    assert got["ids"] == i1.tolist()
    assert np.allclose(got["scores"], s1, atol=1e-6)
    assert i1[:, 0].tolist() == list(range(30))


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "remove"])
def test_damaged_lists_file_refused_in_one_line(saved, tmp_path, damage):
    dest, _ = saved
    copy = tmp_path / "index"
    copy.mkdir()
    for p in dest.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    lists = copy / LISTS_FILE
    data = lists.read_bytes()
    if damage == "truncate":
        lists.write_bytes(data[: len(data) // 2])
    elif damage == "overwrite":
        lists.write_bytes(data[:100] + bytes(len(data) - 200) + data[-100:])
    else:
        lists.unlink()
    with pytest.raises(FinegrainError, match=LISTS_FILE) as e:
        GalleryIndex.load(copy)
    assert "\n" not in str(e.value)


KILLED_BUILD = """
import sys, time
from pathlib import Path
import numpy as np
from finegrain.retrieval.index import GalleryIndex, index_meta
from finegrain.retrieval.large_index import build_ivfpq

x, dest, pause = np.load(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "pause"
passes = []

def chunks():  # a slow source: the second pass (the adds) stalls half-way when asked
    passes.append(1)
    for s in range(0, len(x), 500):
        if pause and len(passes) == 2 and s == 2500:
            (dest.parent / "half-way").touch()
            time.sleep(600)
        yield x[s : s + 500]

index = build_ivfpq(chunks, len(x), x.shape[1], "cosine", dest.parent / "v.npy", max_ram=48000, on_disk=True)
meta = index_meta("c" * 64, x.shape[1], "cosine", "ivfpq", len(x), index.params, 1.0, 0.0)
GalleryIndex(index, np.zeros(len(x)), [str(i) for i in range(len(x))], None, meta).save(dest)
"""


@pytest.mark.slow
def test_a_build_killed_half_way_leaves_the_old_index(saved, x, tmp_path):
    """SIGKILL while shards are being written: the old index still loads, unchanged; the next
    build clears the leftovers and replaces it."""
    dest, _ = saved
    run = tmp_path / "run"
    run.mkdir()
    old = run / "index"
    old.mkdir()
    for p in dest.iterdir():
        (old / p.name).write_bytes(p.read_bytes())
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    np.save(tmp_path / "x.npy", x[::-1].copy())  # another gallery: the same vectors reversed
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    cmd = [sys.executable, "-c", KILLED_BUILD, str(tmp_path / "x.npy"), str(old)]
    proc = subprocess.Popen([*cmd, "pause"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / "half-way").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the build never reached half-way"
            time.sleep(0.1)
        assert list((run / "v.npy.lists").glob("shard-*.faiss"))  # shards were being written
    finally:
        proc.kill()
        proc.wait()
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    reopened = GalleryIndex.load(old)
    assert reopened.search(x[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    subprocess.run([*cmd, "go"], env=env, check=True)
    assert not (run / "v.npy.lists").exists() and not (run / "v.npy").exists()
    assert GalleryIndex.load(old).search(x[:5], 1)[1][:, 0].tolist() == [N - 1, N - 2, N - 3, N - 4, N - 5]


@pytest.mark.slow
def test_searcher_and_service_info_use_an_on_disk_index(trained_run, tmp_path):
    """A run whose index was rebuilt with on-disk lists searches unchanged; /api/info says where they live."""
    import shutil

    from finegrain.data.images import open_rgb
    from finegrain.retrieval.searcher import Searcher

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    flat = GalleryIndex.load(run / "index")
    vectors = flat.index.reconstruct_n(0, flat.n)
    index = build_ivfpq(lambda: iter([vectors]), flat.n, flat.dim, "cosine", tmp_path / "v.npy", on_disk=True)
    meta = {
        **flat.meta,
        **index_meta(
            flat.meta["model_checksum"],
            flat.dim,
            "cosine",
            "ivfpq",
            flat.n,
            index.params,
            index.params["measured_recall"],
            0.0,
        ),
    }
    GalleryIndex(index, flat.labels, flat.paths, flat.class_names, meta).save(run / "index")
    searcher = Searcher(run, engine="torch")
    info = searcher.info
    assert info["index_kind"] == "ivfpq" and info["index_lists"] == ON_DISK
    path = searcher.gallery_path(3)
    hits, _ = searcher.search(open_rgb(path)[0], k=3)
    assert hits[0].path == path and hits[0].same_image


def test_tuning_re_ranks_more_before_it_scans_more_lists(x, tmp_path):
    """A recall target the first list does not reach is sought by re-ranking up to 400 candidates
    before scanning more lists (re-ranking is the cheaper of the two)."""
    from finegrain.retrieval.large_index import RERANK_BEFORE_PROBE

    index = build_ivfpq(_chunks(x, 1000), N, D, "cosine", tmp_path / "v.npy", recall=0.995)
    assert index.params["nprobe"] > 1  # this target needs more than one list
    assert index.params["rerank"] >= RERANK_BEFORE_PROBE
    assert index.params["measured_recall"] >= 0.995


# -- memory: the float16 copy is read, never left mapped ---------------------------------
def _resident_kb(path: Path) -> int | None:
    """kB of ``path`` resident in this process's mappings (None where /proc has no smaps)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
            inside = len(head) >= 6 and head[-1] == str(path)
        elif inside and head[:1] == ["Rss:"]:
            total += int(head[1])
    return total


def test_read_rows_equals_indexing_the_array(tmp_path):
    """Rows read in runs (duplicates, gaps, any order) equal the rows indexed in RAM."""
    from finegrain.retrieval.large_index import read_rows

    v = np.random.default_rng(3).normal(size=(3000, 24)).astype(np.float16)
    np.save(tmp_path / "v.npy", v)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    rng = np.random.default_rng(4)
    for ids in (np.array([2999, 0, 0, 5, 6, 11, 2998]), rng.integers(0, 3000, (7, 40)), np.arange(100, 160)):
        got = read_rows(mapped, ids)
        assert got.dtype == np.float32 and np.array_equal(got, v[ids.reshape(-1)].astype(np.float32))
    with pytest.raises(FinegrainError, match="no row 3000"):
        read_rows(mapped, np.array([1, 3000]))


def test_search_and_tuning_leave_no_page_of_the_copy_resident(saved, x):
    """Building (tuning searched 1,000 held-out queries), saving, loading and searching read the
    float16 copy with plain reads: none of its pages stays mapped in this process, and the answers
    equal those of the same index holding its copy in RAM."""
    dest, _ = saved  # built and saved in this process
    path = dest / VECTORS_FILE
    if _resident_kb(path) is None:
        pytest.skip("no /proc/self/smaps on this system")
    assert _resident_kb(path) == 0
    again = GalleryIndex.load(dest)
    q = x[::7]
    s_mapped, i_mapped = again.search(q, 10)
    assert _resident_kb(path) == 0
    again.index.vectors = np.load(path)  # the same copy, read into RAM
    s_ram, i_ram = again.search(q, 10)
    assert np.array_equal(i_mapped, i_ram) and np.array_equal(s_mapped, s_ram)
    with pytest.raises(FinegrainError, match="filled once"):  # its shards would start from the full index
        again.index.add(x[:10])


def test_lists_gathered_from_shards_equal_faiss_adding_in_one_go(x, tmp_path):
    """In-RAM lists filled in shards (written, read back, gathered into lists of their final size)
    hold the same ids and codes, in the same order, as FAISS adding every vector to the trained
    index at once."""
    params = ivfpq_params(N, D)
    params.update(nprobe=8, max_ram=4 * 12 * 700)  # shards of 700 vectors' codes: 9 of them
    built = RerankedIVFPQ.empty(D, "cosine", params, vectors_file=tmp_path / "v.npy", n=N, lists_dir=tmp_path / "l")
    built.train(x[: params["train_points"]])
    plain = faiss.deserialize_index(np.frombuffer(built.serialize(), dtype=np.uint8))
    for lo in range(0, N, 1000):
        built.add(x[lo : lo + 1000])
    assert len(list((tmp_path / "l").iterdir())) == 8  # the ninth is still in RAM
    plain.add(x)
    built.serialize()  # seals the lists
    assert not (tmp_path / "l").exists()  # the shards are gone once gathered
    mine, theirs = (faiss.extract_index_ivf(i).invlists for i in (built.ivf, plain))
    assert built.ivf.ntotal == N and built.params["lists"] == IN_RAM
    for i in range(theirs.nlist):
        size = theirs.list_size(i)
        assert mine.list_size(i) == size
        ids, codes = (faiss.rev_swig_ptr(f(i), size * w) for f, w in ((mine.get_ids, 1), (mine.get_codes, 4)))
        assert np.array_equal(ids, faiss.rev_swig_ptr(theirs.get_ids(i), size))
        assert np.array_equal(codes, faiss.rev_swig_ptr(theirs.get_codes(i), size * 4))
