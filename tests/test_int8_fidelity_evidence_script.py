"""benchmarks/int8_fidelity_evidence.py: the per-query differences, the bound at 2,000 queries, the thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import load_benchmark, write_image


@pytest.fixture(scope="module")
def ev():
    return load_benchmark("int8_fidelity_evidence")


def _retrieval(seed=0, ids=60, dim=32):
    """Features of a query/gallery split (one query and three gallery images per identity, two cameras)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    pids, cams, feats = [], [], []
    for part, per, cam in (("query", 1, 0), ("gallery", 3, 1)):
        for pid in range(ids):
            for _ in range(per):
                pids.append(pid + 1)
                cams.append(cam)
                feats.append(centres[pid] + rng.normal(scale=1.2, size=dim))
    info = {"pids": pids, "camids": cams, "segments": {"test_query": (0, ids), "test_gallery": (ids, 4 * ids)}}
    return np.array(feats), info


def test_per_query_rank1_and_ap_are_the_verifiers_metrics(ev):
    from reid_export.verify.metrics import compute_distance, rank_metrics

    feats, info = _retrieval()
    pq = ev.per_query(feats, info, "test")
    pids, cams = np.array(info["pids"]), np.array(info["camids"])
    ref = rank_metrics(compute_distance(feats[:60], feats[60:]), pids[:60], pids[60:], cams[:60], cams[60:])
    assert pq["r1"].mean() * 100 == pytest.approx(ref["Rank-1"])
    assert pq["ap"].mean() * 100 == pytest.approx(ref["mAP"])
    assert 0 < pq["r1"].mean() < 1  # a test with something to lose


@pytest.mark.slow
def test_identical_candidate_is_exact_and_a_broken_one_is_far(ev):
    feats, info = _retrieval()
    base = ev.per_query(feats, info, "test")
    same = ev.per_query(feats.copy(), info, "test")
    assert np.array_equal(same["ap"], base["ap"]) and np.array_equal(same["r1"], base["r1"])
    free = ev.label_free(feats, feats.copy())
    assert free["pair_error"] == 0 and free["spearman"] == pytest.approx(1) and free["top1_agreement"] == 1
    broken = feats + np.random.default_rng(1).normal(scale=1.5, size=feats.shape)
    worse = ev.per_query(broken, info, "test")
    d = (worse["ap"] - base["ap"]) * 100
    b = ev.bound(float(d.mean()), float(d.std(ddof=1)), len(d))
    assert b["point"] > 0.5 and b["conservative"] > b["point"]
    bad = ev.label_free(feats, broken)
    assert bad["pair_error"] > 0.3 and bad["spearman"] < 0.95 and bad["top1_agreement"] < 0.9
    spread = ev.resample(d / 100, 20, np.random.default_rng(0))
    assert spread["n"] == 20 and spread["sd"] > 0


def _row(name, pe, bound_value):
    entry = {f"bound2000_{m}": {"point": bound_value, "conservative": bound_value}
             for m in ("R1", "mAP")}
    entry.update({f"noise2000_{m}": bound_value for m in ("R1", "mAP")})
    return {"model": "m", "candidate": name, "kind": "int8", "finite": True, "pair_error": pe,
            "top1_agreement": 1 - pe, "test": entry, "split": entry,
            "pooled": {f"bound2000_{m}": {"point": bound_value} for m in ("R1", "mAP")}}


def test_loosest_threshold_stops_before_the_first_unsafe_candidate(ev):
    rows = [_row("a", 0.02, 0.2), _row("b", 0.05, 0.45), _row("c", 0.08, 0.7), _row("d", 0.10, 0.3)]
    t = ev.loosest_threshold(rows, "pair_error", +1)
    assert t["threshold_last_safe"] == 0.05 and t["first_unsafe"] == "m c" and t["admitted"] == 2
    t = ev.loosest_threshold(rows, "top1_agreement", -1)
    assert t["direction"] == ">=" and t["threshold_last_safe"] == pytest.approx(0.95)
    assert ev.loosest_threshold([_row("x", 0.01, 0.9)], "pair_error", +1)["threshold_last_safe"] is None
    assert math.isinf(ev.worst_bound({**_row("n", 0.3, 0.1), "split": None}))


def test_a_split_that_holds_calibration_crops_is_refused(ev, tmp_path, capsys):
    root = tmp_path / "data"
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir(parents=True)
    for pid in range(1, 9):
        for cam in (1, 2):
            write_image(root / "bounding_box_train" / f"{pid:04d}_c{cam}s1_000001_00.jpg", seed=pid * 3 + cam,
                        size=(16, 8))
            write_image(root / ("query" if cam == 1 else "bounding_box_test") / f"{pid + 50:04d}_c{cam}s1_000001_00.jpg",
                        seed=pid * 7 + cam, size=(16, 8))
    bad = tmp_path / "bad"  # a "split" made of all the training crops, the quantizer's included
    for folder, cam in (("query", 1), ("bounding_box_test", 2)):
        (bad / folder).mkdir(parents=True)
        for path in (root / "bounding_box_train").glob(f"*_c{cam}s1_*"):
            (bad / folder / path.name).symlink_to(path)
    with pytest.raises(SystemExit, match="calibration/held-out images"):
        ev.image_lists(root, bad)
    segments, paths, *_ = ev.image_lists(root, root)  # the test set as its own "split": nothing shared
    assert segments["heldout"][0] == 0 and segments["split_gallery"][1] == len(paths)
    assert ev.main(["run", "--model", "m=x.onnx", "--dataset", str(tmp_path / "nowhere"), "--split", str(root),
                    "--work", str(tmp_path / "w")]) == 2
    assert "bounding_box_train: not a folder" in capsys.readouterr().err
    assert ev.main(["analyse", "--work", str(tmp_path / "w"), "-o", str(tmp_path / "x.json")]) == 2
    assert "no cached features" in capsys.readouterr().err
