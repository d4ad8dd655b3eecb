"""``annotate --detect``: a foreign model's preprocessing found by measuring, not guessed.

Real models (skipped without ../shared): torchreid's OSNet-x0.5 ONNX is found to take RGB with ImageNet
mean/std outside, Intel's OMZ 0288 IR BGR 0..255 normalised inside (their READMEs say so), and a
graph that would be normalised twice by the data config it carries is flagged. Generated models
(always): a model whose features collapse under every convention is refused with one line and
nothing written, and unlabelled crops cannot pick among conventions that do not collapse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import DATA, assert_clean_error, data_dir, run_cli, write_image
from reid_export.export.metadata import load_onnx, read_data_config
from reid_export.verify.detect import Convention, _as_convention, conventions, detect_convention

pytestmark = pytest.mark.slow  # a development run skips it: pytest -m "not slow"

MODELS = Path(os.environ.get("REID_MODELS", DATA.parent / "models"))
OSNET = MODELS / "osnet_x0_5_msmt17_combineall.onnx"
OMZ = MODELS / "person-reidentification-retail-0288.FP32.xml"
QUERIES = 10  # whole identities of CUHK03 with their gallery images: ~50 crops, 9 trials each


def real_model(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real model {path} not present (set REID_MODELS to the folder holding it)")
    return path


def pooled_model(path: Path, bias: float, height: int | str = 32, width: int | str = 16, feat_dim: int = 8) -> Path:
    """A tiny ONNX 'ReID model': channel means -> linear map -> + bias. A large bias makes every image's
    feature point the same way (collapsed, whatever the input convention); bias 0 keeps them apart."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(3, feat_dim)).astype(np.float32), "w")
    shift = numpy_helper.from_array(np.full(feat_dim, bias, dtype=np.float32), "b")
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["proj"]),
             helper.make_node("Add", ["proj", "b"], ["features"])]
    graph = helper.make_graph(nodes, "pooled",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, height, width])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", feat_dim])],
                              [weight, shift])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def crops(folder: Path, names) -> Path:
    for i, name in enumerate(names):
        write_image(folder / name, seed=i, size=(48, 24))
    return folder


def test_every_convention_collapses_refused_with_one_line_and_nothing_written(tmp_path):
    model = pooled_model(tmp_path / "collapsed.onnx", bias=1e4)
    labelled = crops(tmp_path / "labelled", [f"{p:04d}_c{c}s1_000{i}00_00.jpg" for p in (1, 2, 3)
                                             for i, c in enumerate((1, 2, 2))])
    out = tmp_path / "out.onnx"
    result = run_cli("annotate", model, "-o", out, "--no-progress", "--detect", labelled, "--input-size", 32, 16,
                     "--report", tmp_path / "detect.json")
    assert_clean_error(result, "every convention tried collapses", "nothing written")
    assert not out.exists()
    report = json.loads((tmp_path / "detect.json").read_text())
    assert report["labelled"] and report["chosen"] is None
    assert len(report["trials"]) == len(conventions()) and all(t["collapsed"] for t in report["trials"])
    assert "collapsed" in result.out  # the table of what was tried

    unlabelled = crops(tmp_path / "unlabelled", [f"crop{i}.jpg" for i in range(6)])
    assert_clean_error(run_cli("annotate", model, "-o", out, "--no-progress", "--detect", unlabelled, "--input-size", 32, 16),
                       "every convention tried collapses")
    assert not out.exists()


def coloured_crops(folder: Path, count: int) -> Path:
    """Crops of clearly different colours (channel means far apart)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        colour = rng.integers(0, 256, 3)
        img = np.clip(colour + rng.normal(0, 10, (48, 24, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"crop{i}.png"), img)
    return folder


def test_unlabelled_crops_cannot_choose_among_conventions_that_do_not_collapse(tmp_path):
    model = pooled_model(tmp_path / "spread.onnx", bias=0.0)
    unlabelled = coloured_crops(tmp_path / "unlabelled", 8)
    report = detect_convention(model, unlabelled, input_size=(32, 16), progress=False)
    assert report.chosen is None and not report.labelled
    assert "carry no identities" in report.refusal
    assert any(not t.collapsed for t in report.trials)
    result = run_cli("annotate", model, "-o", tmp_path / "out.onnx", "--no-progress", "--detect", unlabelled, "--input-size", 32, 16)
    assert_clean_error(result, "carry no identities", "PPPP_cC")
    assert not (tmp_path / "out.onnx").exists()


def test_detect_option_errors(tmp_path):
    model = pooled_model(tmp_path / "m.onnx", bias=0.0)
    folder = crops(tmp_path / "c", [f"crop{i}.jpg" for i in range(3)])
    assert_clean_error(run_cli("annotate", model, "-o", tmp_path / "o.onnx", "--detect", folder, "--mean", "0,0,0"),
                       "--detect finds the convention itself", "--mean")
    assert_clean_error(run_cli("annotate", model, "-o", tmp_path / "o.onnx", "--mean", "0,0,0"),
                       "--std", "--detect")
    dynamic = pooled_model(tmp_path / "dynamic.onnx", bias=0.0, height="H", width="W")
    assert_clean_error(run_cli("annotate", dynamic, "-o", tmp_path / "o.onnx", "--no-progress", "--detect", folder),
                       "no fixed height/width", "--input-size")
    assert_clean_error(run_cli("annotate", model, "-o", tmp_path / "o.onnx", "--no-progress", "--detect", folder,
                               "--input-size", 64, 32), "does not match the model input")
    assert_clean_error(run_cli("annotate", model, "-o", tmp_path / "o.onnx", "--no-progress", "--detect", tmp_path / "missing",
                               "--input-size", 32, 16), "missing", "no such folder")


def test_a_data_config_maps_back_to_its_convention():
    for c in conventions("pil-bilinear"):
        assert _as_convention(c.data_config(256, 128)) == c
    # ImageNet mean/std in 0..255 units is the same input as in 0..1 units
    same = Convention("rgb", 1.0, True, "cubic").data_config(256, 128)
    same.pixel_scale, same.mean, same.std = 255.0, tuple(v * 255 for v in same.mean), tuple(v * 255 for v in same.std)
    assert _as_convention(same) == Convention("rgb", 1.0, True, "cubic")


@pytest.fixture(scope="module")
def cuhk03():
    return data_dir("cuhk03-labeled")


def test_detects_torchreid_osnet_onnx_rgb_imagenet_outside(cuhk03, tmp_path):
    model = real_model(OSNET)
    out = tmp_path / "osnet.onnx"
    result = run_cli("annotate", model, "-o", out, "--no-progress", "--detect", cuhk03, "--max-queries", QUERIES,
                     "--report", tmp_path / "r.json")
    assert result.code == 0, result
    config = read_data_config(load_onnx(out))
    assert (config.channel_order, config.normalized_inside) == ("rgb", False)
    np.testing.assert_allclose(np.array(config.mean) / config.pixel_scale, (0.485, 0.456, 0.406), rtol=1e-6)
    np.testing.assert_allclose(np.array(config.std) / config.pixel_scale, (0.229, 0.224, 0.225), rtol=1e-6)
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["convention_margin"]["within_noise"], report["convention_margin"]
    assert report["resize_margin"] is not None  # the resizes were tried for the winner
    assert "chosen" in result.out and "BGR" in result.out


def test_detects_omz_ir_bgr_0_255_normalised_inside(cuhk03, tmp_path):
    from reid_export.runtime.openvino_backend import read_data_config as ir_config, read_model

    model = real_model(OMZ)
    out = tmp_path / "omz.xml"
    result = run_cli("annotate", model, "-o", out, "--no-progress", "--detect", cuhk03, "--max-queries", QUERIES)
    assert result.code == 0, result
    config = ir_config(read_model(out), out)
    assert (config.channel_order, config.pixel_scale, config.normalized_inside) == ("bgr", 255.0, True)
    # RGB is measurably worse; the BGR variants the IR cannot tell apart are said to be equal
    assert "give the same features" in result.out


def test_double_normalised_graph_is_flagged(cuhk03, tmp_path):
    """A graph that normalises itself (fast-reid's mean/std inside) whose data config says ImageNet
    mean/std outside: detection scores that config, flags it and writes the one that fits."""
    src = load_onnx(real_model(OSNET))
    graph = src.graph
    raw = "raw_pixels"
    mean = numpy_helper.from_array(np.array([123.675, 116.28, 103.53], np.float32).reshape(1, 3, 1, 1), "inside_mean")
    std = numpy_helper.from_array(np.array([58.395, 57.12, 57.375], np.float32).reshape(1, 3, 1, 1), "inside_std")
    first = graph.input[0].name
    nodes = [helper.make_node("Sub", [raw, "inside_mean"], ["centred"]),
             helper.make_node("Div", ["centred", "inside_std"], [first])]
    new_input = helper.make_tensor_value_info(raw, TensorProto.FLOAT, ["N", 3, 256, 128])
    inside = helper.make_graph(nodes + list(graph.node), "inside", [new_input], list(graph.output),
                               list(graph.initializer) + [mean, std])
    model = helper.make_model(inside, opset_imports=src.opset_import)
    model.ir_version = src.ir_version
    plain = tmp_path / "inside.onnx"
    onnx.save(model, str(plain))
    wrong = tmp_path / "wrong.onnx"
    assert run_cli("annotate", plain, "-o", wrong, "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                   "--pixel-scale", "1", "--channel-order", "rgb", "--interpolation", "linear").code == 0

    report = detect_convention(wrong, cuhk03, max_queries=6, progress=False, resizes=())
    assert report.current is not None and report.current.convention.imagenet_outside
    assert report.chosen.convention.channel_order == "rgb" and not report.chosen.convention.imagenet_outside
    assert report.chosen.convention.pixel_scale == 255.0
    flagged = [n for n in report.notes if n.startswith("warning: the data config")]
    assert flagged and "it is wrong" in flagged[0], report.notes
    assert report.current.collapsed or report.chosen.mAP - report.current.mAP > 10
