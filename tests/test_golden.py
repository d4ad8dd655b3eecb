"""fast-reid's own features are the authority: reproduce ``../shared/golden/fastreid`` exactly.

Each golden folder holds a checkpoint in fast-reid's format, the config fast-reid dumped for it
and the features fast-reid's own ``build_model`` + eval forward computed on ``images/`` (see its
README). They are reproduced within relative L2 1e-5 per image, plain and with the flip test,
through the torch backend, through ``reid-export extract`` and through the exported ONNX (FP32,
dynamic batch, run at batch 1 and 5). The stem that reid-train used before 0.2.0 (a padded
max-pool) misses them by far: the tests can tell the two apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import fastreid_reference as ref
from conftest import REPO, run_cli
from reid_export.checkpoint import extract_state_dict, read_checkpoint
from reid_export.config import load_config
from reid_export.export.onnx_export import export_checkpoint
from reid_export.runtime.encoder import open_encoder
from reid_export.preprocess import preprocess, read_images

GOLDEN = Path(os.environ.get("REID_GOLDEN", REPO.parent / "shared" / "golden")) / "fastreid"
MODELS = ["bot_R18", "agw_R50-ibn"]
TOLERANCE = 1e-5
# The golden features were computed on fast-reid's demo-predictor pixels (OpenCV cubic); a fast-reid file
# left to its default gets fast-reid's evaluation resize (Pillow bicubic), so these tests name the resize.
DEMO_RESIZE = ["INPUT.INTERPOLATION", "cubic"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def golden(name: str) -> dict:
    folder = GOLDEN / name
    if not (folder / "features.npy").exists():
        pytest.skip(f"golden data {folder} not present (set REID_GOLDEN to the folder holding fastreid/)")
    order = json.loads((folder / "inputs.json").read_text())["images"]
    plain = np.load(folder / "features.npy")
    flipped = np.load(folder / "features_flipped.npy")
    return {"checkpoint": folder / "model_final.fp16.pth", "config": folder / "config.yaml",
            "images": [GOLDEN / "images" / n for n in order], "features": plain,
            "flip_test": (plain + flipped) / 2.0}


def rel_l2(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Relative L2 error of each row."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)


def assert_reproduces(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    worst = rel_l2(ours, theirs).max()
    assert worst <= TOLERANCE, f"{what}: worst relative L2 {worst:.3e} > {TOLERANCE:.0e}"


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    return request.param, golden(request.param)


def test_torch_backend_reproduces_fastreid(case):
    name, g = case
    with open_encoder(g["checkpoint"], config=g["config"], opts=DEMO_RESIZE) as enc:
        assert enc.backend == "torch"
        plain = enc.encode_files(g["images"], batch_size=4, progress=False)
        flip = enc.encode_files(g["images"], batch_size=4, progress=False, flip_test=True)
    assert_reproduces(plain, g["features"], f"{name} torch")
    assert_reproduces(flip, g["flip_test"], f"{name} torch flip test")


def test_extract_cli_reproduces_fastreid(case, tmp_path):
    name, g = case
    for flip, expected in ((False, g["features"]), (True, g["flip_test"])):
        out = tmp_path / f"feats_{flip}.npy"
        args = ["extract", g["checkpoint"], *g["images"], "-o", out, "--config", g["config"], "--no-progress"]
        result = run_cli(*args, *(["--flip-test"] if flip else []), "--opts", *DEMO_RESIZE)
        assert result.code == 0, result
        assert "note:" not in result.err  # a fast-reid file gets fast-reid's stem without a word
        assert_reproduces(np.load(out), expected, f"{name} extract flip={flip}")
        listed = json.loads(out.with_suffix(".json").read_text())
        assert [Path(p).name for p in listed["files"]] == [p.name for p in g["images"]]


@pytest.fixture(scope="module")
def exported(case, tmp_path_factory):
    name, g = case
    out = tmp_path_factory.mktemp("golden-onnx") / f"{name}.onnx"
    export_checkpoint(g["checkpoint"], out, config=g["config"], opts=DEMO_RESIZE, log=lambda line: None)
    return name, g, out


def test_onnx_export_reproduces_fastreid(exported):
    name, g, path = exported
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value, "the export must have a dynamic batch"
    with open_encoder(path) as enc:
        assert enc.backend == "onnxruntime"
        arrays, _, _ = read_images(g["images"])
        batch = preprocess(arrays, enc.data_config)
        for size in (1, 5):  # the same graph at two batch sizes, and the whole set in pieces of each
            plain = np.concatenate([enc.encode_batch(batch[i:i + size]) for i in range(0, len(batch), size)])
            flip = np.concatenate([enc.encode_batch(batch[i:i + size], flip_test=True)
                                   for i in range(0, len(batch), size)])
            assert_reproduces(plain, g["features"], f"{name} ONNX batch {size}")
            assert_reproduces(flip, g["flip_test"], f"{name} ONNX batch {size} flip test")


def test_old_padded_stem_misses_fastreid(case):
    """The pre-0.2.0 stem (max-pool padding 1) is far outside the tolerance: these tests catch it."""
    name, g = case
    with open_encoder(g["checkpoint"], config=g["config"],
                      opts=["MODEL.BACKBONE.STEM_POOL_PADDING", "1", *DEMO_RESIZE]) as enc:
        assert enc.model.backbone.maxpool.padding == 1
        feats = enc.encode_files(g["images"], batch_size=4, progress=False)
    assert rel_l2(feats, g["features"]).min() > 100 * TOLERANCE


def test_fastreid_file_defaults_to_fastreids_evaluation_resize(case):
    """Without INPUT.INTERPOLATION a fast-reid file gets Pillow bicubic (what fast-reid trained and evaluates it
    with); on these pixels the demo-path features are out of reach, so the resize is what the tests above name."""
    name, g = case
    with open_encoder(g["checkpoint"], config=g["config"]) as enc:
        assert enc.data_config.interpolation == "pil-bicubic"
        feats = enc.encode_files(g["images"], batch_size=4, progress=False)
    assert rel_l2(feats, g["features"]).max() > 100 * TOLERANCE


def test_functional_reference_agrees_with_golden(case):
    """tests/fastreid_reference.py serves tests where the golden folder is absent: it must agree with it."""
    name, g = case
    state = {k: v.float() for k, v in extract_state_dict(read_checkpoint(g["checkpoint"])).items()}
    images = torch.cat([ref.demo_preprocess(p, (256, 128)) for p in g["images"]])
    fixed_gem = load_config(g["config"]).MODEL.HEADS.POOL_LAYER == "GeneralizedMeanPooling"  # p = 3, not stored
    with torch.no_grad():
        feats = (ref.forward_gem3 if fixed_gem else ref.forward)(state, images).numpy()
    assert_reproduces(feats, g["features"], f"{name} functional reference")
