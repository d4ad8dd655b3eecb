"""Streamed exact evaluation (verify.streamed.evaluate_rank_streamed) against the full-matrix path."""

from __future__ import annotations

import numpy as np
import pytest

from reid_export.errors import ReidExportError
from reid_export.verify.metrics import compute_distance, evaluate_rank
from reid_export.verify.streamed import (FeatureDistances, MatrixDistances, evaluate_rank_streamed,
                                         rank_metrics_streamed)
from reid_export.verify.npy_rows import NpyRows


def textbook_ranks(distmat, q_pids, g_pids, q_camids, g_camids):
    """1-based rank of every positive of each valid query (stable argsort of each full row)."""
    out = []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        removed = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        ranks = np.flatnonzero(g_pids[order][~removed] == q_pids[i]) + 1
        if ranks.size:
            out.append(ranks)
    return out


def labels(rng, nq, ng, pids, cams):
    return rng.integers(0, pids, nq), rng.integers(0, pids, ng), rng.integers(0, cams, nq), rng.integers(0, cams, ng)


def assert_same(full: dict, streamed: dict):
    np.testing.assert_array_equal(streamed["cmc"], full["cmc"])
    np.testing.assert_array_equal(streamed["valid_queries"], full["valid_queries"])
    np.testing.assert_array_equal(streamed["all_INP"], full["all_INP"])
    np.testing.assert_allclose(streamed["all_AP"], full["all_AP"], rtol=0, atol=1e-14)
    assert streamed["num_valid_queries"] == full["num_valid_queries"]


@pytest.mark.slow
@pytest.mark.parametrize("integer", [False, True])
def test_matrix_source_equals_full_matrix_for_any_chunk(integer):
    rng = np.random.default_rng(3)
    for trial in range(25):
        nq, ng = int(rng.integers(1, 30)), int(rng.integers(2, 250))
        q_pids, g_pids, q_cams, g_cams = labels(rng, nq, ng, 6, 3)
        # Integer distances: many exact ties, broken by gallery index, also across chunk borders.
        d = rng.integers(0, 4, (nq, ng)).astype(np.float64) if integer else rng.random((nq, ng)).astype(np.float32)
        try:
            full = evaluate_rank(d, q_pids, g_pids, q_cams, g_cams)
        except ReidExportError:
            continue
        for chunk in (1, 5, nq * 7, 1 << 20):
            res = evaluate_rank_streamed(MatrixDistances(d), q_pids, g_pids, q_cams, g_cams,
                                         chunk_elements=chunk, return_ranks=True)
            assert_same(full, res)
            for row, ranks in zip(res["ranks"], textbook_ranks(d, q_pids, g_pids, q_cams, g_cams)):
                np.testing.assert_array_equal(row[:ranks.size], ranks)
                assert not row[ranks.size:].any()


@pytest.mark.parametrize("chunk", [997, 40 * 300, 1 << 24])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_feature_source_equals_full_matrix(metric, dtype, chunk):
    rng = np.random.default_rng(0)
    nq, ng, dim, pids = 40, 2500, 24, 30
    centres = rng.standard_normal((pids, dim))
    q_pids, g_pids, q_cams, g_cams = labels(rng, nq, ng, pids, 4)
    qf = (centres[q_pids] + 0.8 * rng.standard_normal((nq, dim))).astype(dtype)
    gf = (centres[g_pids] + 0.8 * rng.standard_normal((ng, dim))).astype(dtype)
    full = evaluate_rank(compute_distance(qf, gf, metric), q_pids, g_pids, q_cams, g_cams)
    res = evaluate_rank_streamed(FeatureDistances(qf, gf, metric), q_pids, g_pids, q_cams, g_cams,
                                 chunk_elements=chunk)
    assert_same(full, res)
    assert 0.2 < full["mAP"] < 0.99  # a case where ranking is neither trivial nor random


@pytest.mark.parametrize("chunk", [1, 2, 4, 100])
def test_items_tied_with_a_positive_across_chunks(chunk):
    # Query pid 1 cam 0. Gallery: g0 negative 0.5, g1 positive 0.5, g2 negative 0.5, g3 positive 0.2,
    # g4 same pid same camera (removed) 0.1, g5 distractor 0.3.  Stable order by (distance, index):
    # g4(removed) g3(+) g5 g0 g1(+) g2  ->  positives at ranks 1 and 4 of the valid items.
    d = np.array([[0.5, 0.5, 0.5, 0.2, 0.1, 0.3]])
    q_pids, q_cams = np.array([1]), np.array([0])
    g_pids, g_cams = np.array([2, 1, 3, 1, 1, 0]), np.array([1, 1, 1, 2, 0, 1])
    res = evaluate_rank_streamed(MatrixDistances(d), q_pids, g_pids, q_cams, g_cams, chunk_elements=chunk,
                                 return_ranks=True)
    np.testing.assert_array_equal(res["ranks"], [[1, 4]])
    assert res["mAP"] == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert res["mINP"] == pytest.approx(2 / 4)


class RecordingSource(MatrixDistances):
    def __init__(self, d):
        super().__init__(d)
        self.widths = []

    def select_queries(self, rows):
        out = RecordingSource(self.distmat[rows])
        out.widths = self.widths
        return out

    def block(self, start, stop):
        self.widths.append(stop - start)
        return super().block(start, stop)


def test_memory_is_bounded_by_the_chunk():
    rng = np.random.default_rng(1)
    d = rng.random((50, 4000))
    q_pids, g_pids, q_cams, g_cams = labels(rng, 50, 4000, 10, 3)
    src = RecordingSource(d)
    evaluate_rank_streamed(src, q_pids, g_pids, q_cams, g_cams, chunk_elements=50 * 128)
    assert max(src.widths) == 128 and sum(src.widths) == 4000


def test_memory_stays_near_one_block_when_every_item_is_kept():
    # Each query's one positive points away from it (cosine distance 2): every other gallery item
    # ranks before it, so the pass keeps every distance of every block. Its temporaries must stay
    # within a few bytes per block element (bands of rows), not ~100 bytes per kept item as when a
    # whole block's kept items were gathered at once (~94 bytes per element measured that way).
    import tracemalloc

    import tqdm  # noqa: F401 (imported by the pass: not its memory)

    rng = np.random.default_rng(7)
    nq, ng, dim = 64, 16384, 16
    qf = rng.standard_normal((nq, dim)).astype(np.float32)
    gf = rng.standard_normal((ng, dim)).astype(np.float32)
    gf[:nq] = -qf
    q_pids, q_cams = np.arange(nq), np.zeros(nq, dtype=np.int64)
    g_pids, g_cams = np.full(ng, nq), np.ones(ng, dtype=np.int64)
    g_pids[:nq] = q_pids
    chunk = nq * 4096
    src = FeatureDistances(qf, gf)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        res = evaluate_rank_streamed(src, q_pids, g_pids, q_cams, g_cams, chunk_elements=chunk)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(res["all_INP"], np.full(nq, 1.0 / ng))  # last of its row
    # the [64, 4096] float32 block is 4 bytes per element; its gallery rows and the bands add a few
    assert peak < 32 * chunk, f"{peak / chunk:.1f} bytes per block element"


def test_memmap_gallery_is_read_by_rows_not_through_the_map(tmp_path, monkeypatch):
    # A memory map's touched pages stay in the process's RSS (the whole gallery file by the end of
    # a pass): FeatureDistances must read a .npy memmap with file reads, one block's rows at a time.
    rng = np.random.default_rng(8)
    qf, gf = rng.standard_normal((10, 8)).astype(np.float32), rng.standard_normal((1000, 8)).astype(np.float32)
    q_pids, g_pids, q_cams, g_cams = labels(rng, 10, 1000, 4, 3)
    np.save(tmp_path / "g.npy", gf)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    src = FeatureDistances(qf, mm)
    assert isinstance(src.gallery, NpyRows)
    reads = []
    real = NpyRows._read_into

    def spy(self, start, out):
        reads.append((start, out.shape[0]))
        return real(self, start, out)

    monkeypatch.setattr(NpyRows, "_read_into", spy)
    monkeypatch.setattr(np.memmap, "__getitem__", lambda *a: pytest.fail("the map itself was indexed"))
    valid = evaluate_rank(compute_distance(qf, gf), q_pids, g_pids, q_cams, g_cams)["num_valid_queries"]
    assert_same(evaluate_rank(compute_distance(qf, gf), q_pids, g_pids, q_cams, g_cams),
                evaluate_rank_streamed(src, q_pids, g_pids, q_cams, g_cams, chunk_elements=valid * 64))
    assert max(n for _, n in reads) <= 64
    assert sum(n for s, n in reads if n == 64 or s + n == 1000) >= 1000  # the pass read every row once by blocks


def test_npy_rows_read_like_the_array(tmp_path):
    a = np.arange(7 * 3, dtype=">f4").reshape(7, 3)  # a big-endian file too
    np.save(tmp_path / "a.npy", a)
    rows = NpyRows.of(np.load(tmp_path / "a.npy", mmap_mode="r"))
    assert isinstance(rows, NpyRows) and rows.shape == (7, 3) and rows.dtype == a.dtype
    for index in (slice(None), slice(2, 5), slice(5, 2), slice(None, None, 2), np.array([6, 0, 0, 3, 4]),
                  np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([-1, 2]), a[:, 0] > 8, 4, -2):
        np.testing.assert_array_equal(rows[index], a[index])
    with pytest.raises(IndexError):
        rows[np.array([7])]
    # not a whole map (a view, copy-on-write, an array): left as it is
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert NpyRows.of(mm[1:]) is not None and not isinstance(NpyRows.of(mm[1:]), NpyRows)
    assert not isinstance(NpyRows.of(np.load(tmp_path / "a.npy", mmap_mode="c")), NpyRows)
    assert NpyRows.of(a) is a
    # a file cut short is one clear error, not garbage rows
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(raw[:-4])
    with pytest.raises(ReidExportError, match="ends before row 7"):
        rows[5:7]


def test_estimate_outside_its_bound_is_caught(monkeypatch):
    # A source whose positive estimates are wrong by more than the bound it claims must not give
    # silently wrong numbers.
    rng = np.random.default_rng(2)
    d = rng.random((20, 300))
    q_pids, g_pids, q_cams, g_cams = labels(rng, 20, 300, 5, 3)

    class Lying(MatrixDistances):
        def select_queries(self, rows):
            return Lying(self.distmat[rows])

        def pairs(self, rows, cols):
            est, eps = super().pairs(rows, cols)
            return est + 0.01, eps

    with pytest.raises(ReidExportError, match="farther from its estimate"):
        evaluate_rank_streamed(Lying(d), q_pids, g_pids, q_cams, g_cams, chunk_elements=200)


def test_bad_inputs_give_one_clear_error():
    rng = np.random.default_rng(4)
    qf, gf = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32)
    q_pids, g_pids, q_cams, g_cams = labels(rng, 5, 30, 3, 3)
    with pytest.raises(ReidExportError, match="same dimension"):
        FeatureDistances(qf, gf[:, :4])
    with pytest.raises(ReidExportError, match="g_pids has 29"):
        evaluate_rank_streamed(FeatureDistances(qf, gf), q_pids, g_pids[:29], q_cams, g_cams)
    with pytest.raises(ReidExportError, match="no query has a matching"):
        evaluate_rank_streamed(FeatureDistances(qf, gf), q_pids + 10, g_pids, q_cams, g_cams)
    gf[3, 2] = np.nan
    with pytest.raises(ReidExportError, match="NaN"):
        evaluate_rank_streamed(FeatureDistances(qf, gf), q_pids, g_pids, q_cams, g_cams)


def test_memmap_gallery(tmp_path):
    rng = np.random.default_rng(5)
    qf, gf = rng.standard_normal((12, 16)).astype(np.float32), rng.standard_normal((700, 16)).astype(np.float32)
    q_pids, g_pids, q_cams, g_cams = labels(rng, 12, 700, 4, 3)
    np.save(tmp_path / "g.npy", gf)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    full = evaluate_rank(compute_distance(qf, gf), q_pids, g_pids, q_cams, g_cams)
    assert_same(full, evaluate_rank_streamed(FeatureDistances(qf, mm), q_pids, g_pids, q_cams, g_cams,
                                             chunk_elements=12 * 64))
    assert rank_metrics_streamed(FeatureDistances(qf, mm), q_pids, g_pids, q_cams, g_cams)["mAP"] == \
        pytest.approx(full["mAP"] * 100)


# ------------------------------------------------------------------ re-ranking and AQE from kNN lists

def _clustered_case(seed, nq=30, ng=220, dim=32, pids=15, noise=1.2):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((pids, dim))
    q_pids, g_pids = rng.integers(0, pids, nq), rng.integers(0, pids, ng)
    qf = (c[q_pids] + noise * rng.standard_normal((nq, dim))).astype(np.float32)
    gf = (c[g_pids] + noise * rng.standard_normal((ng, dim))).astype(np.float32)
    return qf, gf, q_pids, g_pids, rng.integers(0, 3, nq), rng.integers(0, 3, ng)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_rerank_equals_dense_rerank(metric):
    from reid_export.verify.rerank import KnnRerank, k_reciprocal_rerank

    qf, gf, q_pids, g_pids, q_cams, g_cams = _clustered_case(0)
    dense = k_reciprocal_rerank(qf, gf, k1=20, k2=6, lambda_value=0.3, metric=metric)
    knn = KnnRerank(qf, gf, k1=20, k2=6, lambda_value=0.3, metric=metric)
    np.testing.assert_allclose(knn.dense(), dense, rtol=0, atol=1e-12)
    full = evaluate_rank(dense, q_pids, g_pids, q_cams, g_cams)
    assert 0.2 < full["mAP"] < 0.99
    # Streamed straight from the sparse structure, in chunks: the same metrics.
    res = evaluate_rank_streamed(knn, q_pids, g_pids, q_cams, g_cams, chunk_elements=30 * 40)
    np.testing.assert_array_equal(res["cmc"], full["cmc"])
    np.testing.assert_allclose(res["all_AP"], full["all_AP"], atol=1e-12)
    # The comparison can fail: other parameters give other distances.
    assert np.abs(KnnRerank(qf, gf, k1=20, k2=1, metric=metric).dense() - dense).max() > 1e-3


def test_knn_aqe_equals_dense_aqe():
    from reid_export.verify.rerank import average_query_expansion, average_query_expansion_knn

    qf, gf, *_ = _clustered_case(1)
    for times, k in ((1, 5), (2, 3)):
        q1, g1 = average_query_expansion(qf, gf, times, k)
        q2, g2 = average_query_expansion_knn(qf, gf, times, k)
        np.testing.assert_allclose(q2, q1, rtol=0, atol=1e-6)
        np.testing.assert_allclose(g2, g1, rtol=0, atol=1e-6)
    q3, _ = average_query_expansion_knn(qf, gf, 1, 2)
    assert np.abs(q3 - average_query_expansion(qf, gf, 1, 5)[0]).max() > 1e-3


def test_knn_lists_without_faiss_are_the_same(monkeypatch):
    import builtins

    from reid_export.verify.rerank import knn_lists

    qf, gf, *_ = _clustered_case(2)
    feats = np.concatenate([qf, gf])
    ids, dist = knn_lists(feats, 11, "euclidean")
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **kw: (_ for _ in ()).throw(ImportError(name))
                        if name == "faiss" else real_import(name, *a, **kw))
    ids2, dist2 = knn_lists(feats, 11, "euclidean")
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(dist2, dist)
    # The float64 order of the dense code: a stable argsort of each row.
    from reid_export.verify.rerank import _pairwise

    np.testing.assert_array_equal(ids, np.argsort(_pairwise(feats, feats, "euclidean"), axis=1, kind="stable")[:, :11])
