"""Tests for reid_export.data.market (Market-1501 layout parsing)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from reid_export.data.market import (
    MARKET_DIR,
    MarketDataset,
    ReidItem,
    find_market_root,
    list_images,
    load_split,
    parse_name,
)
from reid_export.errors import ReidExportError

DATA = Path(
    os.environ.get("REID_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)

QUERY = ["0001_c1s1_000151_00.jpg", "0002_c2s1_000301_00.jpg", "-1_c3s1_000401_00.jpg"]
GALLERY = [
    "0001_c2s1_000176_01.jpg",
    "0001_c1s1_000201_02.jpg",
    "0000_c3s2_133394_05.jpg",  # distractor: kept
    "-1_c4s1_006951_01.jpg",  # junk: dropped
    "0002_c6s1_000451_01.JPG",  # extension case does not matter
]
TRAIN = ["0007_c1s1_000001_00.jpg", "0007_c2s1_000002_00.jpg", "0003_c5s1_000003_00.png"]


def write_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = np.full((8, 4, 3), 127, dtype=np.uint8)
    for name in names:
        assert cv2.imwrite(str(folder / name), img)


def make_layout(base: Path, train: bool = True) -> Path:
    write_images(base / "query", QUERY)
    write_images(base / "bounding_box_test", GALLERY)
    if train:
        write_images(base / "bounding_box_train", TRAIN)
    return base


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_parse_name():
    assert parse_name("-1_c4s1_006951_01.jpg") == (-1, 3)
    assert parse_name("0000_c3s2_133394_05.jpg") == (0, 2)
    assert parse_name("1501_c6s4_001877_00.jpg") == (1501, 5)
    assert parse_name("readme.jpg") is None
    assert parse_name("0001_c0s1_000001_00.jpg") is None  # cameras are 1-based in names


@pytest.mark.parametrize("nested", [False, True])
def test_both_root_forms(tmp_path, nested):
    base = tmp_path / MARKET_DIR if nested else tmp_path
    make_layout(base)
    assert find_market_root(tmp_path) == base
    ds = MarketDataset(tmp_path)
    assert ds.root == base
    assert [Path(it.path).name for it in ds.query] == sorted(QUERY)[1:]  # junk dropped
    assert len(ds.gallery) == 4
    assert load_split(tmp_path, "gallery") == ds.gallery


def test_junk_dropped_distractor_kept_camids_zero_based(tmp_path):
    make_layout(tmp_path)
    gallery = load_split(tmp_path, "gallery")
    by_name = {Path(it.path).name: it for it in gallery}
    assert "-1_c4s1_006951_01.jpg" not in by_name
    assert by_name["0000_c3s2_133394_05.jpg"] == ReidItem(
        str(tmp_path / "bounding_box_test" / "0000_c3s2_133394_05.jpg"), 0, 2
    )
    assert by_name["0002_c6s1_000451_01.JPG"].camid == 5
    assert [(it.pid, it.camid) for it in load_split(tmp_path, "query")] == [(1, 0), (2, 1)]
    assert all(it.pid != -1 for it in load_split(tmp_path, "train"))


def test_relabel_train(tmp_path):
    make_layout(tmp_path)
    raw = load_split(tmp_path, "train")
    assert [(it.pid, it.camid) for it in raw] == [(3, 4), (7, 0), (7, 1)]
    relabelled = load_split(tmp_path, "train", relabel=True)
    assert [(it.pid, it.camid) for it in relabelled] == [(0, 4), (1, 0), (1, 1)]
    ds = MarketDataset(tmp_path)
    assert ds.train == relabelled
    assert ds.num_train_pids == 2


def test_train_is_lazy_and_missing_train_raises(tmp_path):
    make_layout(tmp_path, train=False)
    ds = MarketDataset(tmp_path)  # a test-only copy is fine
    assert len(ds.query) == 2
    with pytest.raises(ReidExportError) as exc:
        ds.train
    assert "bounding_box_train" in one_line(exc)


def test_missing_query_is_named(tmp_path):
    write_images(tmp_path / "bounding_box_test", GALLERY)
    with pytest.raises(ReidExportError) as exc:
        MarketDataset(tmp_path)
    assert str(tmp_path / "query") in one_line(exc)
    with pytest.raises(ReidExportError) as exc:
        load_split(tmp_path, "query")
    assert str(tmp_path / "query") in one_line(exc)


def test_no_layout_names_path_and_fix(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ReidExportError) as exc:
        find_market_root(tmp_path / "elsewhere")
    msg = one_line(exc)
    assert str(tmp_path / "elsewhere") in msg and "`dataset_root`" in msg
    with pytest.raises(ReidExportError) as exc:
        find_market_root(tmp_path / "does-not-exist")
    assert "does-not-exist" in one_line(exc)


def test_empty_split_folder_raises(tmp_path):
    make_layout(tmp_path)
    for p in (tmp_path / "query").iterdir():
        p.unlink()
    with pytest.raises(ReidExportError) as exc:
        load_split(tmp_path, "query")
    assert str(tmp_path / "query") in one_line(exc)


def test_bad_names_skipped_with_one_warning(tmp_path):
    make_layout(tmp_path)
    write_images(tmp_path / "bounding_box_test", ["readme.jpg", "frame_0001.jpg"])
    (tmp_path / "bounding_box_test" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning) as record:
        gallery = load_split(tmp_path, "gallery")
    assert len(record) == 1
    msg = str(record[0].message)
    assert "2 file(s)" in msg and "frame_0001.jpg" in msg
    assert len(gallery) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_split(tmp_path, "query")  # clean folder: no warning


def test_list_images_sorted_non_recursive(tmp_path):
    write_images(tmp_path, ["b.PNG", "a.jpg", "c.bmp", "d.jpeg"])
    write_images(tmp_path / "sub", ["0001_c1s1_000001_00.jpg"])
    (tmp_path / "e.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.bmp", "d.jpeg"]


def test_one_image_walker_for_datasets_and_extract(tmp_path):
    """A dataset split and `extract dir/` list the same files: .webp and .tif crops included."""
    from reid_export.preprocess import expand_image_paths

    names = ["0001_c1s1_000001_00.webp", "0001_c2s1_000002_00.jpg", "0002_c1s1_000003_00.tif"]
    folder = tmp_path / "query"
    folder.mkdir()
    for name in names:
        assert cv2.imwrite(str(folder / name), np.full((16, 8, 3), 128, np.uint8)), name
    assert [p.name for p in list_images(folder)] == sorted(names)
    assert [Path(it.path).name for it in load_split(tmp_path, "query")] == sorted(names)
    assert expand_image_paths([folder]) == list_images(folder)


def test_unknown_split(tmp_path):
    make_layout(tmp_path)
    with pytest.raises(ReidExportError, match="unknown split"):
        load_split(tmp_path, "val")


# ----------------------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent)
# ----------------------------------------------------------------------------------------
def require(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not found (set REID_DATA to the folder holding {name}/)")
    return path


def test_market1501_mini():
    root = require("market1501-mini")
    ds = MarketDataset(root)
    assert ds.root.name == MARKET_DIR
    assert len(ds.query) == 3
    gallery_files = list_images(ds.root / "bounding_box_test")
    junk = [p for p in gallery_files if p.name.startswith("-1_")]
    assert len(gallery_files) == 60 and len(junk) > 0
    assert len(ds.gallery) == 60 - len(junk)
    assert sum(it.pid == 0 for it in ds.gallery) == 3  # distractors kept
    assert {it.camid for it in ds.query + ds.gallery} <= set(range(6))
    assert MarketDataset(ds.root).gallery == ds.gallery  # the inner folder works too


def test_cuhk03_labeled():
    root = require("cuhk03-labeled")
    ds = MarketDataset(root)
    assert len(ds.query) == 200
    assert len(ds.gallery) == 738
    assert len({it.pid for it in ds.gallery}) == 100
    assert len(ds.train) == 2426
    assert ds.num_train_pids == 250
    assert {it.pid for it in ds.train} == set(range(250))
    assert {it.camid for it in ds.query + ds.gallery + ds.train} == {0, 1}

    # An oracle distance (0 for the same person, 1 otherwise) must score 100 everywhere.
    from reid_export.verify.metrics import rank_metrics

    q_pids = np.array([it.pid for it in ds.query])
    g_pids = np.array([it.pid for it in ds.gallery])
    q_cams = np.array([it.camid for it in ds.query])
    g_cams = np.array([it.camid for it in ds.gallery])
    dist = (q_pids[:, None] != g_pids[None, :]).astype(np.float32)
    res = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams)
    # One query (0072_c2...) has gallery images of its person from its own camera only.
    has_match = ((q_pids[:, None] == g_pids[None, :]) & (q_cams[:, None] != g_cams[None, :]))
    assert res["num_valid_queries"] == has_match.any(axis=1).sum() == 199
    assert res["Rank-1"] == res["mAP"] == res["mINP"] == 100.0
