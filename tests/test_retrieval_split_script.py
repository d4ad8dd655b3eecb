"""benchmarks/retrieval_split.py: a second test set from a training folder, without quantize's crops."""

from __future__ import annotations

import re

import pytest

from conftest import load_benchmark, write_image


@pytest.fixture(scope="module")
def split():
    return load_benchmark("retrieval_split")


def _train_folder(root, ids=40):
    train = root / "bounding_box_train"
    train.mkdir(parents=True)
    for pid in range(1, ids + 1):
        cams = [1] if pid % 10 == 0 else [1, 2]  # every tenth identity is seen by one camera only
        for cam in cams:
            for k in range(1 + pid % 3):
                write_image(train / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg", seed=pid * 10 + cam, size=(16, 8))
    return train


def test_split_leaves_out_quantize_images_and_every_query_has_a_cross_camera_match(split, tmp_path):
    from reid_export.export.quantize import select_images

    train = _train_folder(tmp_path / "data")
    out = tmp_path / "split"
    assert split.main([str(tmp_path / "data"), "-o", str(out), "--calib-size", "20", "--val-size", "8"]) == 0
    calib, val = select_images([train], 20, [], 8, 0, lambda line: None)
    used = {p.name for p in calib + val}
    queries = sorted(p.name for p in (out / "query").iterdir())
    gallery = sorted(p.name for p in (out / "bounding_box_test").iterdir())
    assert queries and gallery
    assert not used & set(queries + gallery)          # nothing quantize calibrates or gates on
    assert not set(queries) & set(gallery)
    assert len(queries) + len(gallery) <= len(list(train.iterdir())) - len(used)
    parse = lambda name: tuple(int(x) for x in re.match(r"(\d+)_c(\d+)", name).groups())  # noqa: E731
    for q in queries:
        pid, cam = parse(q)
        assert any(parse(g)[0] == pid and parse(g)[1] != cam for g in gallery), q
        assert pid % 10 != 0  # one-camera identities give no query
    assert (out / "query" / queries[0]).resolve().parent == train.resolve()  # links, not copies
    # another seed draws other calibration images, so another split
    assert split.main([str(tmp_path / "data"), "-o", str(tmp_path / "other"), "--calib-size", "20",
                       "--val-size", "8", "--seed", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "other" / "query").iterdir()) != queries or \
        sorted(p.name for p in (tmp_path / "other" / "bounding_box_test").iterdir()) != gallery


def test_split_without_usable_identities_fails(split, tmp_path):
    train = tmp_path / "data" / "bounding_box_train"
    train.mkdir(parents=True)
    for k in range(12):  # one identity, one camera
        write_image(train / f"0001_c1s1_{k:06d}_00.jpg", seed=k, size=(16, 8))
    assert split.main([str(tmp_path / "data"), "-o", str(tmp_path / "split"), "--calib-size", "4",
                       "--val-size", "2"]) == 1


def test_split_refuses_a_folder_with_real_images(split, tmp_path):
    _train_folder(tmp_path / "data", ids=12)
    (tmp_path / "out" / "query").mkdir(parents=True)
    write_image(tmp_path / "out" / "query" / "0001_c1s1_000000_00.jpg", size=(16, 8))
    assert split.main([str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--calib-size", "4", "--val-size", "2"]) == 2
    assert (tmp_path / "out" / "query" / "0001_c1s1_000000_00.jpg").is_file()  # left alone
