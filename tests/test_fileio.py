"""Atomic outputs get the mode a plain open(..., "w") gives, not mkstemp's private 0600."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from conftest import CONFIGS, run_cli
from reid_export.checkpoint import save_checkpoint
from reid_export.config import load_config
from reid_export.data_config import data_config_from_cfg
from reid_export.fileio import atomic_open, atomic_write_bytes, atomic_write_files, atomic_write_json
from reid_export.modeling import build_model


@pytest.fixture
def umask():
    """Set a umask for one test and restore the old one."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_open_mode(path) -> int:
    with open(path, "w"):
        pass
    try:
        return mode(path)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_new_files_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    expected = plain_open_mode(tmp_path / "plain")
    assert expected == 0o666 & ~mask
    atomic_write_bytes(tmp_path / "a.onnx", b"x")
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    with atomic_open(tmp_path / "e.engine") as fh:
        fh.write(b"y")
    atomic_write_files({tmp_path / "f.npy": b"1", tmp_path / "f.json": b"2"})
    for name in ("a.onnx", "r.json", "e.engine", "f.npy", "f.json"):
        assert mode(tmp_path / name) == expected, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o640


@pytest.mark.slow
def test_command_outputs_are_readable_by_group_and_other(tmp_path, umask, image_dir):
    """Real outputs under umask 022 (a checkpoint, features and their JSON) are 0644: a serving
    container or another user can read them."""
    umask(0o022)
    cfg = load_config(CONFIGS / "Market1501" / "bagtricks_R18.yml", ["INPUT.SIZE_TEST", "[64, 32]"])
    model = build_model(cfg).eval()
    ckpt = save_checkpoint(tmp_path / "m.pth", model, cfg, data_config_from_cfg(cfg, feat_dim=model.feat_dim))
    out = tmp_path / "feats.npy"
    result = run_cli("extract", ckpt, image_dir, "-o", out, "--no-progress")
    assert result.code == 0, result
    assert np.load(out).shape[0] == 4
    for path in (ckpt, out, out.with_suffix(".json")):
        m = mode(path)
        assert m == 0o644 and m & stat.S_IRGRP and m & stat.S_IROTH, (path, oct(m))
