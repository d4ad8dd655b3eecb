"""reid-export index / search (faiss) and the streamed eval options of reid-export eval."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import CONFIGS, assert_clean_error, randomize_bn, run_cli, write_image

faiss = pytest.importorskip("faiss", reason="faiss is not installed (pip install 'reid-export[index]')")

from reid_export.checkpoint import save_checkpoint  # noqa: E402
from reid_export.config import load_config  # noqa: E402
from reid_export.data_config import data_config_from_cfg  # noqa: E402
from reid_export.index import GalleryIndex, IndexParams, build_index, exact_topk, recall_at_k  # noqa: E402
from reid_export.index.faiss_index import normalize  # noqa: E402
from reid_export.modeling import build_model  # noqa: E402
from reid_export.verify.metrics import compute_distance, rank_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clustered(rng, n, dim=32, centres=200, spread=0.15):
    c = rng.standard_normal((centres, dim))
    return (c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, dim))).astype(np.float32)


def brute_force(queries, data, k):
    sims = normalize(queries) @ normalize(data).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return 1.0 - np.take_along_axis(sims, order, 1), order


def test_flat_index_is_exact_across_shards_and_add(tmp_path):
    rng = np.random.default_rng(0)
    data = clustered(rng, 3000)
    files = [f"{i:05d}.jpg" for i in range(3000)]
    build_index(tmp_path / "idx", data[:2000], files[:2000], IndexParams(kind="flat", shard_size=700),
                data_config={"height": 64})
    manifest = build_index(tmp_path / "idx", [data[2000:2500], data[2500:]], files[2000:], IndexParams(),
                           data_config={"height": 64}, add=True)
    assert manifest["count"] == 3000 and [e["count"] for e in manifest["shards"]] == [700, 700, 700, 700, 200]
    gindex = GalleryIndex.open(tmp_path / "idx")
    queries = clustered(rng, 50)
    dist, ids = gindex.search(queries, 10)
    exp_d, exp_i = brute_force(queries, data, 10)
    np.testing.assert_array_equal(ids, exp_i)
    np.testing.assert_allclose(dist, exp_d, atol=1e-5)
    assert gindex.files()[2999] == "02999.jpg" and len(gindex.files()) == 3000


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_kinds_report_their_recall(tmp_path, kind):
    rng = np.random.default_rng(1)
    data = clustered(rng, 4000)
    params = IndexParams(kind=kind, nlist=32, nprobe=8, pq_m=8, ef_search=64)
    manifest = build_index(tmp_path / kind, data, [str(i) for i in range(4000)], params, data_config=None,
                           recall_sample=200)
    rec = manifest["recall"]
    # The figure is the real one: recompute it against brute force.
    gindex = GalleryIndex.open(tmp_path / kind)
    queries = normalize(data[np.sort(np.random.default_rng(0).choice(4000, 200, replace=False))])
    _, ids = gindex.search(queries, 10)
    _, exact = brute_force(queries, data, 10)
    assert rec["recall@10"] == pytest.approx(recall_at_k(ids, exact, 10))
    assert rec["recall@10"] > (0.5 if kind == "ivfpq" else 0.8)
    # Fewer probes find less: the measurement is not a constant.
    if kind == "ivf":
        gindex.set_search_params(nprobe=1)
        _, ids1 = gindex.search(queries, 10)
        assert recall_at_k(ids1, exact, 10) < rec["recall@10"]


def test_recall_measure_fails_a_wrong_index():
    rng = np.random.default_rng(2)
    data = normalize(clustered(rng, 500))
    _, exact = exact_topk(data[:20], data, 10)
    assert recall_at_k(exact, exact, 10) == 1.0
    shuffled = rng.permutation(500)[:200].reshape(20, 10)
    assert recall_at_k(shuffled, exact, 10) < 0.2


def test_index_errors_are_one_line(tmp_path):
    rng = np.random.default_rng(3)
    data = clustered(rng, 100)
    np.save(tmp_path / "f.npy", data)
    assert_clean_error(run_cli("index", tmp_path / "idx", tmp_path / "f.npy"), "f.json", "extract")
    (tmp_path / "f.json").write_text(json.dumps({"files": ["a.jpg"] * 99}))
    assert_clean_error(run_cli("index", tmp_path / "idx", tmp_path / "f.npy"), "99 files")
    (tmp_path / "f.json").write_text(json.dumps({"files": [f"{i}.jpg" for i in range(100)]}))
    assert run_cli("index", tmp_path / "idx", tmp_path / "f.npy", "--no-progress").code == 0
    assert_clean_error(run_cli("index", tmp_path / "idx", tmp_path / "f.npy"), "already holds an index", "--add")
    assert_clean_error(run_cli("search", tmp_path / "nothing", "--query-features", tmp_path / "f.npy"),
                       "not an index folder")
    np.save(tmp_path / "g.npy", data[:, :16])
    (tmp_path / "g.json").write_text(json.dumps({"files": [f"{i}.jpg" for i in range(100)]}))
    assert_clean_error(run_cli("search", tmp_path / "idx", "--query-features", tmp_path / "g.npy"), "dimension 16")
    assert_clean_error(run_cli("index", tmp_path / "idx", tmp_path / "g.npy", "--add"), "32-d", "16-d")


def test_missing_faiss_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # any import of faiss now raises ImportError
    assert_clean_error(run_cli("index", tmp_path / "idx", tmp_path / "f.npy"), "faiss is not installed",
                       "pip install 'reid-export[index]'")


# ------------------------------------------------------------------ end to end with a tiny model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config(CONFIGS / "Market1501/bagtricks_R18.yml", ["INPUT.SIZE_TEST", "[64, 32]"])
    torch.manual_seed(0)
    model = randomize_bn(build_model(cfg), size=(64, 32)).eval()
    ckpt = save_checkpoint(root / "tiny.pth", model, cfg, data_config_from_cfg(cfg, model.feat_dim, "r18"))
    ds = root / "ds"
    for i in range(24):
        pid, cam = i // 4 + 1, i % 4 + 1
        split = "query" if cam == 1 else "bounding_box_test"
        write_image(ds / split / f"{pid:04d}_c{cam}s1_{i:06d}_00.jpg", seed=pid * 7 + cam % 2, size=(96, 48))
    for i in range(40):
        write_image(root / "distractors" / f"{i:05d}_x.jpg", seed=500 + i, size=(96, 48))
    return ckpt, ds, root / "distractors"


@pytest.mark.slow
def test_index_and_search_images_end_to_end(tiny, tmp_path):
    ckpt, ds, _ = tiny
    gallery = ds / "bounding_box_test"
    r = run_cli("index", tmp_path / "idx", gallery, "--model", ckpt, "--no-progress")
    assert r.code == 0, r.err
    query = sorted((ds / "query").iterdir())
    r = run_cli("search", tmp_path / "idx", *query[:3], "--model", ckpt, "-k", "5", "--report", tmp_path / "s.json",
                "--ranklist", tmp_path / "rl.png", "--no-progress")
    assert r.code == 0, r.err
    doc = json.loads((tmp_path / "s.json").read_text())
    assert [len(q["hits"]) for q in doc["queries"]] == [5, 5, 5]
    # The hits are the brute-force nearest gallery images of extract's features.
    assert run_cli("extract", ckpt, *query[:3], "-o", tmp_path / "q.npy", "--no-progress").code == 0
    assert run_cli("extract", ckpt, gallery, "-o", tmp_path / "g.npy", "--no-progress").code == 0
    qf, gf = np.load(tmp_path / "q.npy"), np.load(tmp_path / "g.npy")
    exp_d, exp_i = brute_force(qf, gf, 5)
    g_files = json.loads((tmp_path / "g.json").read_text())["files"]
    # Crops of cameras 2 and 4 share a seed (identical images), so some distances tie exactly and
    # either order is right: each hit must be a gallery file at the brute-force distance of its rank.
    all_d = 1.0 - normalize(qf) @ normalize(gf).T
    for qi, (q, row_i, row_d) in enumerate(zip(doc["queries"], exp_i, exp_d)):
        hit_files = [h["file"] for h in q["hits"]]
        assert len(set(hit_files)) == 5
        np.testing.assert_allclose([all_d[qi, g_files.index(f)] for f in hit_files], row_d, atol=1e-5)
        np.testing.assert_allclose([h["distance"] for h in q["hits"]], row_d, atol=1e-5)
        untied = [r for r in range(5) if all(abs(row_d[r] - all_d[qi, j]) > 1e-5 for j in range(len(g_files))
                                             if j != row_i[r])]
        assert all(hit_files[r] == g_files[row_i[r]] for r in untied)
    assert (tmp_path / "rl.png").stat().st_size > 1000
    # An index built from the extract output answers the same.
    assert run_cli("index", tmp_path / "idx2", tmp_path / "g.npy", "--no-progress").code == 0
    r2 = run_cli("search", tmp_path / "idx2", "--query-features", tmp_path / "q.npy", "-k", "5", "--report",
                 tmp_path / "s2.json", "--no-progress")
    assert r2.code == 0, r2.err
    assert [[h["file"] for h in q["hits"]] for q in json.loads((tmp_path / "s2.json").read_text())["queries"]] == \
        [[h["file"] for h in q["hits"]] for q in doc["queries"]]


@pytest.mark.slow
def test_eval_feature_files_and_distractors(tiny, tmp_path):
    ckpt, ds, distractors = tiny
    assert run_cli("extract", ckpt, ds / "query", "-o", tmp_path / "q.npy", "--no-progress").code == 0
    assert run_cli("extract", ckpt, ds / "bounding_box_test", "-o", tmp_path / "g.npy", "--no-progress").code == 0
    assert run_cli("extract", ckpt, distractors, "-o", tmp_path / "d.npy", "--no-progress").code == 0
    # Feature files give the full-matrix numbers of the same features.
    r = run_cli("eval", "--query-features", tmp_path / "q.npy", "--gallery-features", tmp_path / "g.npy",
                "--report", tmp_path / "e.json", "--no-progress")
    assert r.code == 0, r.err
    got = json.loads((tmp_path / "e.json").read_text())["models"][0]
    qf, gf = np.load(tmp_path / "q.npy"), np.load(tmp_path / "g.npy")
    pids = lambda n: np.array([int(f.split("/")[-1][:4]) for f in json.loads(n.read_text())["files"]])  # noqa: E731
    cams = lambda n: np.array([int(f.split("/")[-1][6]) for f in json.loads(n.read_text())["files"]])  # noqa: E731
    exp = rank_metrics(compute_distance(qf, gf), pids(tmp_path / "q.json"), pids(tmp_path / "g.json"),
                       cams(tmp_path / "q.json"), cams(tmp_path / "g.json"))
    for key in ("Rank-1", "Rank-5", "mAP", "mINP"):
        assert got[key] == pytest.approx(exp[key], abs=1e-9), key
    assert got["peak_rss_mib"] > 0
    # The model path with --distractors = the feature files with the distractors as more gallery features.
    r = run_cli("eval", ckpt, "--dataset-root", ds, "--distractors", distractors, "--report", tmp_path / "m.json",
                "--no-progress")
    assert r.code == 0, r.err
    assert "40 distractors" in r.out
    with_d = json.loads((tmp_path / "m.json").read_text())["models"][0]
    r = run_cli("eval", "--query-features", tmp_path / "q.npy", "--gallery-features", tmp_path / "g.npy",
                "--distractor-features", tmp_path / "d.npy", "--report", tmp_path / "f.json", "--no-progress")
    assert r.code == 0, r.err
    files_d = json.loads((tmp_path / "f.json").read_text())["models"][0]
    for key in ("Rank-1", "Rank-5", "mAP", "mINP"):
        assert with_d[key] == pytest.approx(files_d[key], abs=1e-9), key
    assert with_d["mAP"] <= got["mAP"] + 1e-9  # distractors can only push matches down
    assert_clean_error(run_cli("eval", "--query-features", tmp_path / "q.npy"), "go together")
    assert_clean_error(run_cli("eval", ckpt, "--dataset-root", ds, "--distractors", distractors, "--rerank"),
                       "--rerank")
