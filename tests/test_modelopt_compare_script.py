"""benchmarks/modelopt_compare.py without ModelOpt: the copy it hands ModelOpt, the metadata it puts back,
its Q/DQ placement count and its FP16-float-parts detection (a stand-in ``modelopt`` package plays ModelOpt)."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import load_benchmark


@pytest.fixture(scope="module")
def mc():
    return load_benchmark("modelopt_compare")


def _qdq_graph(scale_type=TensorProto.FLOAT) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(Q/DQ weight) -> Sigmoid -> Mul(Q/DQ both inputs): 3 activation, 1 weight DQ use."""
    np_type = np.float16 if scale_type == TensorProto.FLOAT16 else np.float32
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0.05, dtype=np_type), "s"),
             numpy_helper.from_array(np.array(0, dtype=np.int8), "z")]
    dq = lambda i, o: helper.make_node("DequantizeLinear", [i, "s", "z"], [o])  # noqa: E731
    q = lambda i, o: helper.make_node("QuantizeLinear", [i, "s", "z"], [o])  # noqa: E731
    nodes = [q("x", "xq"), dq("xq", "xd"), q("w", "wq"), dq("wq", "wd"),
             helper.make_node("Conv", ["xd", "wd"], ["c"]), helper.make_node("Sigmoid", ["c"], ["g"]),
             q("g", "gq"), dq("gq", "gd"), q("c", "cq"), dq("cq", "cd"),
             helper.make_node("Mul", ["cd", "gd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_placement_counts_activation_and_weight_inputs_by_consumer(mc, tmp_path):
    path = tmp_path / "g.onnx"
    onnx.save(_qdq_graph(), str(path))
    placement = mc.qdq_placement(path)
    assert placement["consumers"] == {"Conv": {"activation": 1, "weight": 1}, "Mul": {"activation": 2}}
    assert placement["q_nodes"] == placement["dq_nodes"] == 4
    assert not mc.fp16_qdq(path)
    onnx.save(_qdq_graph(TensorProto.FLOAT16), str(path))
    assert mc.fp16_qdq(path)                          # FP16 scales: scored with ONNX Runtime's optimisations off


def test_held_out_metrics_tell_a_broken_candidate_from_a_good_one(mc):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(24, 16)).astype(np.float32)
    good = mc.held_out_metrics(ref, ref + 0.01 * rng.normal(size=ref.shape).astype(np.float32))
    bad = mc.held_out_metrics(ref, rng.normal(size=ref.shape).astype(np.float32))
    assert good["pair_error"] < 0.05 and good["min_cosine"] > 0.99 and good["top1"] == 1.0
    assert bad["pair_error"] > 0.5 and bad["mean_cosine"] < 0.5


FAKE_MAIN = """
import argparse, shutil
p = argparse.ArgumentParser()
p.add_argument("--onnx_path"); p.add_argument("--output_path"); p.add_argument("--quantize_mode")
p.add_argument("--calibration_method"); p.add_argument("--calibration_data_path"); p.add_argument("--calibration_eps")
a = p.parse_args()
import onnxruntime as ort
assert ort.SessionOptions().intra_op_num_threads == 1      # the launcher's one-thread sessions
shutil.copyfile(a.onnx_path, a.output_path)
if a.calibration_method == "entropy":                       # plays a ModelOpt that rewrites its input in place
    open(a.onnx_path, "ab").write(b"\\0")
if a.calibration_method == "fail":
    raise SystemExit("no luck")
"""


@pytest.mark.slow
def test_modelopt_runs_on_a_copy_and_gets_our_metadata_back(mc, tmp_path, monkeypatch):
    from reid_export.export.metadata import set_metadata

    pkg = tmp_path / "fake" / "modelopt" / "onnx" / "quantization"
    pkg.mkdir(parents=True)
    for folder in (pkg.parent.parent, pkg.parent, pkg):
        (folder / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(FAKE_MAIN))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]))
    model = _qdq_graph()
    set_metadata(model, {"reid_export.data_config": {"height": 4, "width": 4}})
    source = tmp_path / "m.onnx"
    onnx.save(model, str(source))
    before = source.read_bytes()
    calib = tmp_path / "c.npy"
    np.save(calib, np.zeros((2, 3, 4, 4), np.float32))

    facts = mc.run_modelopt(sys.executable, source, "max", calib, tmp_path / "max", 1, reuse=False)
    assert facts["returncode"] == 0 and not facts["input_rewritten"], facts
    out = onnx.load(facts["output"])
    props = {p.key: p.value for p in out.metadata_props}
    assert json.loads(props["reid_export.modelopt"])["method"] == "max"
    assert json.loads(props["reid_export.data_config"]) == {"height": 4, "width": 4}  # copied from the source

    rewritten = mc.run_modelopt(sys.executable, source, "entropy", calib, tmp_path / "entropy", 1, reuse=False)
    assert rewritten["input_rewritten"] is True       # caught, and only the copy was touched
    assert source.read_bytes() == before

    failed = mc.run_modelopt(sys.executable, source, "fail", calib, tmp_path / "fail", 1, reuse=False)
    assert failed["returncode"] != 0 and "no luck" in failed["error"]
    assert (tmp_path / "max" / "facts.json").is_file()


def test_the_script_does_not_import_modelopt(mc):
    assert "modelopt" not in sys.modules
    text = (mc.__file__ and open(mc.__file__).read()) or ""
    assert "\nimport modelopt" not in text and "\nfrom modelopt" not in text
