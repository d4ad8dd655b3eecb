"""BoxMOT hand-off: ``reid-export boxmot`` folds BoxMOT's input convention into the graph, writes the names
and sidecars BoxMOT reads, and BoxMOT 25.0.0's own ReID backends (in their own venv, no install allowed)
compute the model's features from those files; ``--deployment boxmot`` reproduces BoxMOT's input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from conftest import (CONFIGS, REPO, SmallReidNet, assert_clean_error, data_dir, export_small_onnx,
                      negative_pair_distances, randomize_bn, run_cli)
from reid_export.data_config import DataConfig
from reid_export.deploy_preprocess import BOXMOT_INPUT, DEPLOYMENTS, input_affine
from reid_export.embeddings import collapse_stats
from reid_export.export.metadata import get_metadata, input_info, read_data_config
from reid_export.preprocess import preprocess

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MEAN, STD = BOXMOT_INPUT.mean, BOXMOT_INPUT.std
# one raw graph, described four ways: the affine differs per convention, the self-check and parity must hold
CONVENTIONS = {
    "fastreid": dict(pixel_scale=255.0, channel_order="rgb", mean=(123.675, 116.28, 103.53),
                     std=(58.395, 57.12, 57.375), normalized_inside=True),
    "omz-bgr": dict(pixel_scale=255.0, channel_order="bgr", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                    normalized_inside=True),
    "torchreid": dict(pixel_scale=1.0, channel_order="rgb", mean=MEAN, std=STD, normalized_inside=False),
    "bgr-outside": dict(pixel_scale=255.0, channel_order="bgr", mean=(104.0, 117.0, 123.0), std=(57.0, 57.5, 58.0),
                        normalized_inside=False),
}


def _rgb(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


# --------------------------------------------------------------------------- the affine and the deployment

@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_boxmot_deployment_gives_each_model_its_own_input(convention):
    """On a crop already at the model's size (no resize), BoxMOT's tensor mapped by the folded affine is the
    model's own preprocessing; fed unfolded it is not (except for a model that takes BoxMOT's input)."""
    dc = DataConfig(height=64, width=32, interpolation="linear", **CONVENTIONS[convention])
    img = _rgb(64, 32)
    own = preprocess([img], dc)
    fed = DEPLOYMENTS["boxmot"].preprocess([img], dc)
    np.testing.assert_allclose(fed, own, rtol=1e-5, atol=1e-4 * max(1.0, float(np.abs(own).max())))
    unfolded = DEPLOYMENTS["boxmot-unfolded"].preprocess([img], dc)
    if convention == "torchreid":
        assert input_affine(dc, BOXMOT_INPUT).identity
        np.testing.assert_allclose(unfolded, own, atol=1e-5)
    else:
        assert np.abs(unfolded - own).max() > 1.0  # BoxMOT's input is not this model's input


def test_boxmot_deployment_resizes_bilinear_with_opencv():
    dc = DataConfig(height=64, width=32, interpolation="cubic")  # the model's own resize is not BoxMOT's
    img = _rgb(150, 61, seed=3)
    fed = DEPLOYMENTS["boxmot"].preprocess([img], dc)[0]
    linear = cv2.resize(img, (32, 64), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_allclose(fed, linear, atol=2e-3)  # /255, mean/std and back: float rounding only
    cubic = preprocess([img], dc)[0]
    assert np.abs(fed - cubic).max() > 1.0


# --------------------------------------------------------------------------- the hand-off on small graphs

@pytest.fixture(scope="module")
def raw_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bx")
    torch.manual_seed(0)
    # statistics of 0..255-like input: every convention stays in range
    raw = export_small_onnx(SmallReidNet(), folder / "raw.onnx", torch.randn(8, 3, 64, 32) * 50 + 100)
    proto = onnx.load(str(raw))  # symbolic H/W, as ONNX from elsewhere may have: the hand-off fixes them
    for axis, label in ((2, "H"), (3, "W")):
        proto.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = label
    del proto.graph.value_info[:]
    onnx.save(proto, str(raw))
    return raw


def _annotated(raw, folder, convention):
    c = CONVENTIONS[convention]
    path = folder / f"small_{convention}.onnx"
    args = ["annotate", raw, "-o", path, "--input-size", "64", "32", "--mean", ",".join(map(str, c["mean"])),
            "--std", ",".join(map(str, c["std"])), "--pixel-scale", f"{c['pixel_scale']:g}",
            "--channel-order", c["channel_order"], "--interpolation", "linear"]
    res = run_cli(*args, *(["--normalized-inside"] if c["normalized_inside"] else []))
    assert res.code == 0, res
    return path


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_handoff_onnx_takes_boxmot_input_and_parity_verifies_it(raw_onnx, tmp_path, image_dir, convention):
    model = _annotated(raw_onnx, tmp_path, convention)
    out = tmp_path / "out"
    res = run_cli("boxmot", model, "-o", out, "--no-openvino", "--images", image_dir)
    assert res.code == 0, res
    written = out / model.name
    proto = onnx.load(str(written))
    dc = read_data_config(proto)
    assert (dc.channel_order, dc.pixel_scale, dc.mean, dc.std, dc.normalized_inside) == ("rgb", 1.0, MEAN, STD, False)
    assert input_info(proto)[1][1:] == [3, 64, 32]  # BoxMOT's ONNX backend reads H x W from the graph
    sidecar = json.loads((out / f"{model.name}.metadata.json").read_text())
    assert sidecar["model_kwargs"] == {"img_size": [64, 32]} and sidecar["model_kwargs_schema_version"] == 1
    assert sidecar["model_name"] == "small_" + convention  # not a BoxMOT backbone: named as ours
    assert "does not know this architecture" in res.out
    assert "PASS" in res.out and "reid-export parity" in res.out
    # our own verifiers read the new data config: parity of the original against the hand-off passes at FP32
    res = run_cli("parity", model, written, "--images", image_dir, "--no-progress")
    assert res.code == 0, res.out
    # and the hand-off's input differs from the original's (except for the torchreid convention: identity)
    folded = [n.op_type for n in proto.graph.node if n.name.startswith("boxmot_")]
    if convention == "torchreid":
        assert folded == []
    else:
        swap = CONVENTIONS[convention]["channel_order"] == "bgr"
        assert folded == ["Gather", "Mul", "Add"] if swap else ["Mul", "Add"]
        assert [n.op_type for n in proto.graph.node[:len(folded)]] == folded


def test_a_wrong_fold_fails_the_self_check_and_writes_nothing(raw_onnx, tmp_path, monkeypatch):
    from reid_export.deploy_preprocess import Affine
    from reid_export.serve import boxmot

    model = _annotated(raw_onnx, tmp_path, "fastreid")

    def no_swap_scale(model_dc, feeder):  # the mean/std folded, the /255 forgotten
        a = input_affine(model_dc, feeder)
        return Affine(tuple(s / 255 for s in a.scale), a.bias, a.swap)

    monkeypatch.setattr(boxmot, "input_affine", no_swap_scale)
    out = tmp_path / "out"
    res = run_cli("boxmot", model, "-o", out, "--no-openvino")
    assert_clean_error(res, "does not reproduce", "nothing written")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_int8_and_fp16_handoffs_keep_their_precision_and_pass_parity(raw_onnx, tmp_path, image_dir):
    model = _annotated(raw_onnx, tmp_path, "fastreid")
    int8, fp16 = tmp_path / "small.int8.onnx", tmp_path / "small.fp16.onnx"
    assert run_cli("quantize", model, "-o", fp16, "--precision", "fp16").code == 0
    res = run_cli("quantize", model, "-o", int8, "--precision", "int8", "--calib-dir", image_dir, "--calib-size", "4",
                  "--max-float", "0", "--allow-below-gate")
    assert res.code == 0, res
    out = tmp_path / "out"
    for source in (int8, fp16):
        res = run_cli("boxmot", source, "-o", out, "--no-openvino", "--images", image_dir)
        assert res.code == 0, res
    q_src, q_out = onnx.load(str(int8)), onnx.load(str(out / int8.name))
    qdq = {n.op_type for n in q_src.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    assert qdq == {"QuantizeLinear", "DequantizeLinear"}
    # every Q/DQ scale and zero point exactly as calibrated; the affine feeds the first QuantizeLinear
    params = {i for n in q_src.graph.node if n.op_type in qdq for i in n.input[1:]}
    src_init = {i.name: i.SerializeToString() for i in q_src.graph.initializer if i.name in params}
    out_init = {i.name: i.SerializeToString() for i in q_out.graph.initializer if i.name in params}
    assert src_init and src_init == out_init
    add = next(n for n in q_out.graph.node if n.op_type == "Add")
    first_q = next(n for n in q_out.graph.node if n.op_type == "QuantizeLinear")
    assert first_q.input[0] == add.output[0]
    assert get_metadata(q_out)["reid_export.precision"] == "int8"
    h = onnx.load(str(out / fp16.name))
    assert input_info(h)[2] == onnx.TensorProto.FLOAT and h.graph.output[0].type.tensor_type.elem_type == 1
    # parity: each hand-off against its own original within that precision's gate (default tolerances)
    for source in (int8, fp16):
        res = run_cli("parity", source, out / source.name, "--images", image_dir, "--no-progress")
        assert res.code == 0, res.out
    # and the INT8 gate can fail: the INT8 original fed BoxMOT's input without the fold
    res = run_cli("parity", int8, int8, "--images", image_dir, "--no-progress", "--deployment", "boxmot-unfolded")
    assert res.code == 1 and "FAIL" in res.out


def test_boxmot_bad_inputs(raw_onnx, tmp_path):
    assert_clean_error(run_cli("boxmot", tmp_path / "missing.onnx", "-o", tmp_path / "o"), "missing.onnx")
    txt = tmp_path / "m.txt"
    txt.write_text("x")
    assert_clean_error(run_cli("boxmot", txt, "-o", tmp_path / "o"), "m.txt", "checkpoint")
    assert_clean_error(run_cli("boxmot", raw_onnx, "-o", tmp_path / "o", "--no-openvino"), "annotate")
    model = _annotated(raw_onnx, tmp_path, "fastreid")
    (tmp_path / "file").write_text("x")
    assert_clean_error(run_cli("boxmot", model, "-o", tmp_path / "file"), "is a file")
    assert_clean_error(run_cli("boxmot", model, "-o", tmp_path / "o", "--boxmot-arch", "bot_r50"),
                       "not a BoxMOT", "leave it out")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- BoxMOT's own backends

OSNET_PT = REPO.parent / "shared" / "models" / "torchreid_osnet_x0_25_market1501.pt"
OSNET_CFG = CONFIGS / "torchreid" / "osnet_x0_25.yml"


@pytest.fixture(scope="module")
def boxmot_python():
    venv = Path(os.environ.get("REID_BOXMOT_VENV", REPO / ".venv-boxmot"))
    python = venv / "bin" / "python"
    if not python.exists():
        pytest.skip(f"BoxMOT client venv {venv} missing: create it with .ci/boxmot-venv (BoxMOT 25.0.0, onnxruntime "
                    "1.24.3, no torchvision)")
    return python


@pytest.fixture(scope="module")
def boxmot_run(boxmot_python, tmp_path_factory):
    """Every hand-off the tests below look at, and BoxMOT's features for them (one BoxMOT process)."""
    models = Path(os.environ.get("REID_MODELS", REPO.parent / "shared" / "models"))
    pt = models / OSNET_PT.name
    if not pt.exists():
        pytest.skip(f"{pt} missing (the real torchreid OSNet-x0.25 Market-1501 checkpoint)")
    crops_src = data_dir("parity-images")
    d = tmp_path_factory.mktemp("boxmot_client")
    crops = []
    for i, path in enumerate(sorted(crops_src.glob("*.jpg"))):  # real crops as they are, and at 384x128 (no resize)
        img = cv2.imread(str(path))
        crops.append(path)
        big = d / "crops" / f"{i}_384.png"
        big.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(big), cv2.resize(img, (128, 384), interpolation=cv2.INTER_CUBIC))
        crops.append(big)
    # the user's case: a plain export, loaded by BoxMOT as it is; the hand-off built from it
    plain = d / "plain" / "torchreid_osnet_x0_25_market1501.onnx"
    plain.parent.mkdir()
    res = run_cli("onnx", pt, "--config", OSNET_CFG, "-o", plain, "--exporter", "torchscript")
    assert res.code == 0, res
    res = run_cli("boxmot", plain, "-o", d / "osnet")
    assert res.code == 0, res
    assert "osnet_x0_25" in res.out
    # a fast-reid-style BoT at 384x128 (random weights, trained-like statistics), from its checkpoint
    from reid_export.checkpoint import save_checkpoint
    from reid_export.config import load_config
    from reid_export.data_config import data_config_from_cfg
    from reid_export.modeling import build_model

    cfg = load_config(CONFIGS / "Market1501" / "bagtricks_R18.yml", ["INPUT.SIZE_TEST", "[384, 128]"])
    torch.manual_seed(0)
    bot = randomize_bn(build_model(cfg), seed=0, size=(384, 128))
    ckpt = d / "bot_r18_384.pth"
    save_checkpoint(ckpt, bot, cfg, data_config_from_cfg(cfg, bot.feat_dim, "bot_r18_384"))
    res = run_cli("boxmot", ckpt, "-o", d / "bot", "--exporter", "torchscript")
    assert res.code == 0, res
    assert "does not know this architecture" in res.out and "384x128" in res.out
    # the same IR without its sidecars: what BoxMOT does from the folder name alone
    bare = d / "bare" / "bot_r18_384_openvino_model"
    shutil.copytree(d / "bot" / "bot_r18_384_openvino_model", bare)
    (bare / "manifest.json").unlink()
    (bare / "bot_r18_384.xml.metadata.json").unlink()
    weights = {"pt": pt, "onnx": d / "osnet" / plain.name, "openvino": d / "osnet" / "torchreid_osnet_x0_25_market1501_openvino_model",
               "plain": plain, "bot_onnx": d / "bot" / "bot_r18_384.onnx",
               "bot_openvino": d / "bot" / "bot_r18_384_openvino_model", "bot_bare": bare}
    out = d / "features.npz"
    env = dict(os.environ, PIP_NO_INDEX="1", PYTHONNOUSERSITE="1")
    proc = subprocess.run([str(boxmot_python), str(REPO / "tests" / "boxmot_client.py"), str(out), *map(str, crops),
                           "--", *map(str, weights.values())], capture_output=True, text=True, env=env, timeout=300,
                          cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    npz = np.load(out)
    info = json.loads(str(npz["info"]))
    names = list(weights)
    result = {"info": info, "crops": crops, "d": d, "ckpt": ckpt, "weights": weights}
    for i, name in enumerate(names):
        result[name] = {**info["models"][i], "features": npz[f"f{i}"] if f"f{i}" in npz else None}
    return result


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_boxmot_runs_in_its_own_environment_without_installing(boxmot_run):
    info = boxmot_run["info"]
    assert info["onnxruntime"] == "1.24.3" and not info["torchvision_imported"]  # the client ran (no pip: see client)
    import onnxruntime

    assert onnxruntime.__version__ != "1.24.3" or "boxmot" in sys.prefix  # the main environment keeps its own


def test_the_install_guard_refuses_what_boxmot_would_install(boxmot_python, tmp_path):
    env = dict(os.environ, PIP_NO_INDEX="1", PYTHONNOUSERSITE="1")
    proc = subprocess.run([str(boxmot_python), str(REPO / "tests" / "boxmot_client.py"), "--guard-check"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "tried to pip-install" in proc.stderr, proc.stderr[-2000:]


def test_boxmot_onnx_and_openvino_backends_match_its_pytorch_backend_on_the_handoff(boxmot_run):
    ref = boxmot_run["pt"]
    assert (ref["backend"], ref["model_name"]) == ("PyTorchBackend", "osnet_x0_25")
    for name, backend in (("onnx", "ONNXBackend"), ("openvino", "OpenVinoBackend")):
        got = boxmot_run[name]
        assert (got["backend"], got["model_name"], got["input_shape"]) == (backend, "osnet_x0_25", [256, 128])
        cos = _cos(ref["features"], got["features"])
        assert cos.min() >= 0.9999, (name, cos)


def test_boxmot_on_a_plain_export_normalises_twice_and_collapses(boxmot_run):
    """The failure the hand-off fixes: far from BoxMOT's PyTorch features, nearly one vector for all crops."""
    ref, plain = boxmot_run["pt"]["features"], boxmot_run["plain"]["features"]
    cos = _cos(ref, plain)
    assert cos.mean() < 0.9, cos
    real = slice(0, None, 2)  # the original crops, different people
    stats = collapse_stats(plain[real])
    assert stats is not None and stats.collapsed, stats
    assert not collapse_stats(boxmot_run["onnx"]["features"][real]).collapsed


def test_boxmot_backends_on_a_384x128_handoff_match_our_extract(boxmot_run, tmp_path):
    from reid_export.runtime import open_encoder
    from reid_export.verify.parity import use_deployment

    onnx_path = boxmot_run["weights"]["bot_onnx"]
    crops = boxmot_run["crops"]
    big = crops[1::2]  # already 384x128: no resize anywhere, so our plain extract is the reference
    res = run_cli("extract", onnx_path, *big, "-o", tmp_path / "f.npy", "--no-progress")
    assert res.code == 0, res
    ours = np.load(tmp_path / "f.npy")
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    for name, backend in (("bot_onnx", "ONNXBackend"), ("bot_openvino", "OpenVinoBackend")):
        got = boxmot_run[name]
        assert (got["backend"], got["input_shape"]) == (backend, [384, 128])
        cos = _cos(ours, got["features"][1::2])
        assert cos.min() >= 0.9999, (name, cos)
    # on the small real crops BoxMOT resizes (cv2 linear): our boxmot deployment reproduces its input
    encoder = use_deployment(open_encoder(onnx_path), "boxmot")
    emulated = encoder.encode_files(crops[0::2], batch_size=8)
    encoder.close()
    assert _cos(emulated, boxmot_run["bot_onnx"]["features"][0::2]).min() >= 0.9999
    # without its sidecars BoxMOT's OpenVINO backend takes 256x128 for this 384x128 model
    bare = boxmot_run["bot_bare"]
    assert bare["input_shape"] == [256, 128] or bare.get("error"), bare


# --------------------------------------------------------------------------- tracker thresholds

def test_handoff_writes_the_measured_threshold_where_boxmot_trackers_read_it(raw_onnx, tmp_path, boxmot_python):
    from reid_export.runtime import open_encoder

    root = data_dir("market1501-mini")
    model = _annotated(raw_onnx, tmp_path, "fastreid")
    out = tmp_path / "bx"
    res = run_cli("boxmot", model, "-o", out, "--no-openvino", "--threshold-dataset", root, "--threshold-fmr", "0.1")
    assert res.code == 0, res
    # the same threshold computed here, independently: BoxMOT's preprocessing (bilinear, /255, ImageNet),
    # cosine distances of query x gallery, the 14th smallest of the 131 different-identity pairs
    with open_encoder(out / "small_fastreid.onnx") as enc:  # the hand-off file on its own data config
        neg = negative_pair_distances(enc, root, "boxmot")
    assert neg.size == 131
    expected = float(neg[13])
    side = json.loads((out / "small_fastreid.onnx.metadata.json").read_text())
    assert side["reid_export"]["tracker_threshold"]["distance"] == pytest.approx(expected, abs=1e-4)
    # BoxMOT's own tracker-config loader overlays the written files on its defaults
    script = ("import json, sys\nfrom boxmot.trackers.config import load_tracker_config\n"
              "print(json.dumps({t: load_tracker_config(t, sys.argv[i + 1]) for i, t in "
              "enumerate(['strongsort', 'botsort'])}))")
    env = dict(os.environ, PIP_NO_INDEX="1", PYTHONNOUSERSITE="1")
    proc = subprocess.run([str(boxmot_python), "-c", script, str(out / "strongsort.reid-export.yaml"),
                           str(out / "botsort.reid-export.yaml")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resolved = json.loads(proc.stdout.strip().splitlines()[-1])
    assert resolved["strongsort"]["max_cos_dist"] == pytest.approx(expected, abs=1e-4)
    assert resolved["botsort"]["appearance_thresh"] == pytest.approx(expected, abs=1e-4)
    assert resolved["strongsort"]["max_iou_dist"] == 0.7  # the tracker's other defaults stay
    # an FMR the set cannot resolve: one line, nothing written
    res = run_cli("boxmot", model, "-o", tmp_path / "bx2", "--no-openvino", "--threshold-dataset", root,
                  "--threshold-fmr", "0.001")
    assert_clean_error(res, "131 negative pairs")
    assert not (tmp_path / "bx2").exists() or not any((tmp_path / "bx2").iterdir())


def test_handoff_warns_when_the_model_collapses_on_the_given_crops(raw_onnx, tmp_path, parity_images):
    # the same small graph annotated as taking ImageNet-normalised input although it expects 0..255:
    # every real crop lands near one vector, and the hand-off says so (it still writes: the fold is exact)
    twice = tmp_path / "twice.onnx"
    assert run_cli("annotate", raw_onnx, "-o", twice, "--input-size", "64", "32", "--mean", "0.485,0.456,0.406",
                   "--std", "0.229,0.224,0.225", "--pixel-scale", "1", "--channel-order", "rgb",
                   "--interpolation", "linear").code == 0
    res = run_cli("boxmot", twice, "-o", tmp_path / "a", "--no-openvino", "--images", parity_images[0].parent)
    assert res.code == 0, res
    assert "collapsed embeddings" in res.err
    good = _annotated(raw_onnx, tmp_path, "fastreid")
    res = run_cli("boxmot", good, "-o", tmp_path / "b", "--no-openvino", "--images", parity_images[0].parent)
    assert res.code == 0, res
    assert "collapsed" not in res.err
