"""``reid-export triton``: the generated model repository, every config.pbtxt parsed with Triton's own
ModelConfig protobuf (tritonclient, the triton extra)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import assert_clean_error, run_cli
from reid_export.data_config import DataConfig
from reid_export.errors import ReidExportError
from reid_export.export.metadata import base_metadata, set_metadata
from reid_export.serve.triton import parse_config
from reid_export.trt.sidecar import make_sidecar, write_sidecar

pytestmark = pytest.mark.usefixtures("one_torch_thread")

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason="tritonclient not installed: pip install 'reid-export[triton]' (Triton's ModelConfig protobuf)")

DC = DataConfig(height=64, width=32, interpolation="linear", feat_dim=24, model_name="tiny")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, 2, 1)

    def forward(self, x):
        return self.conv((x - 120.0) / 60.0).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton")
    fp32 = folder / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tiny().eval(), (torch.randn(1, 3, 64, 32),), str(fp32), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["features"], dynamic_axes={"input": {0: "N"},
                                                                                         "features": {0: "N"}})
    model = onnx.load(str(fp32))
    set_metadata(model, base_metadata(DC, "fp32"))
    onnx.save(model, str(fp32))
    fp16 = folder / "tiny.fp16.onnx"
    res = run_cli("quantize", fp32, "-o", fp16, "--precision", "fp16")
    assert res.code == 0, res
    plans = []
    for cc in ("8.6", "9.0"):
        plan = folder / f"tiny.sm{cc.replace('.', '')}.engine"
        plan.write_bytes(f"not a real engine for {cc}".encode())  # Triton is not started here: bytes are copied
        write_sidecar(plan, make_sidecar(DC, "fp16", "10.9.0", "GPU", cc, {"min": [1, 3, 64, 32], "opt": [8, 3, 64, 32],
                                                                          "max": [16, 3, 64, 32]},
                                         str(fp32), "abc123", {}, "input", "features"))
        plans.append(plan)
    return folder, fp32, fp16, plans


def _parse(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_for_onnx_fp16_with_tensorrt_and_multi_arch_plans(models, tmp_path):
    _, fp32, fp16, plans = models
    repo = tmp_path / "repo"
    res = run_cli("triton", fp32, "-o", repo, "--kind", "cpu", "--instances", "2", "--max-batch-size", "16",
                  "--preferred-batch-size", "4,8", "--max-queue-delay-us", "500")
    assert res.code == 0, res
    assert "checked with Triton's ModelConfig protobuf" in res.out
    res = run_cli("triton", fp16, *plans, "-o", repo, "--name", "tiny_fp16", "--name", "tiny_trt",
                  "--tensorrt-accelerator", "fp16", "--gpus", "0,1")
    assert res.code == 0, res

    cfg = _parse(repo / "tiny" / "config.pbtxt")
    assert cfg.name == "tiny" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert list(cfg.input[0].dims) == [3, 64, 32] and cfg.input[0].name == "input"
    assert cfg.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(cfg.output[0].dims) == [24] and cfg.output[0].name == "features"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert (repo / "tiny" / "1" / "model.onnx").read_bytes() == fp32.read_bytes()

    cfg = _parse(repo / "tiny_fp16" / "config.pbtxt")
    accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert len(accel) == 1 and accel[0].name == "tensorrt" and accel[0].parameters["precision_mode"] == "FP16"
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(cfg.instance_group[0].gpus) == [0, 1] and cfg.max_batch_size == 32
    assert (repo / "tiny_fp16" / "1" / "model.onnx").read_bytes() == fp16.read_bytes()

    cfg = _parse(repo / "tiny_trt" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 16  # the engine profile's max
    assert dict(cfg.cc_model_filenames) == {"8.6": "model_sm86.plan", "9.0": "model_sm90.plan"}
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]  # the profile's opt
    for cc, plan in zip(("86", "90"), plans):
        assert (repo / "tiny_trt" / "1" / f"model_sm{cc}.plan").read_bytes() == plan.read_bytes()
    assert "TensorRT 10.9.0 for compute capability 8.6, 9.0" in (repo / "tiny_trt" / "README.md").read_text()

    for name in ("tiny", "tiny_fp16", "tiny_trt"):
        dc = DataConfig.from_json((repo / name / "data_config.json").read_text())
        assert dc.to_dict() == DC.to_dict() | {"feat_dim": 24}
        readme = (repo / name / "README.md").read_text()
        assert "64x32" in readme and "Do not normalise" in readme and "RGB" in readme
    top = (repo / "README.md").read_text()
    assert all(f"[{n}]" in top for n in ("tiny", "tiny_fp16", "tiny_trt"))
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_a_single_plan_and_the_validator_rejects_broken_configs(models, tmp_path):
    _, _, _, plans = models
    repo = tmp_path / "repo"
    res = run_cli("triton", plans[0], "-o", repo, "--max-batch-size", "4")
    assert res.code == 0, res
    cfg = _parse(repo / "tiny" / "config.pbtxt")
    assert cfg.default_model_filename == "model.plan" and not cfg.cc_model_filenames and cfg.max_batch_size == 4
    # the check can fail: a misspelt field, a wrong enum, a string where a number goes
    text = (repo / "tiny" / "config.pbtxt").read_text()
    for broken in (text.replace("max_batch_size", "max_batch"), text.replace("TYPE_FP32", "TYPE_FLOAT32"),
                   text.replace("max_batch_size: 4", 'max_batch_size: "four"')):
        with pytest.raises(ReidExportError, match="not a valid Triton model config"):
            parse_config(broken)
    assert parse_config(text).max_batch_size == 4


def test_an_existing_repository_needs_force(models, tmp_path):
    folder, fp32, fp16, plans = models
    repo = tmp_path / "repo"
    assert run_cli("triton", fp32, "-o", repo).code == 0
    assert_clean_error(run_cli("triton", fp32, "-o", repo), "already exists", "--force")
    assert run_cli("triton", fp32, "-o", repo, "--force", "--max-batch-size", "8").code == 0
    assert _parse(repo / "tiny" / "config.pbtxt").max_batch_size == 8


def _checkpoint(tmp_path, fp32):
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"x")
    return ckpt


def _bare_onnx(tmp_path, fp32):
    bare = tmp_path / "bare.onnx"
    model = onnx.load(str(fp32))
    del model.metadata_props[:]
    onnx.save(model, str(bare))
    return bare


def _orphan_plan(tmp_path, fp32):
    orphan = tmp_path / "orphan.plan"
    orphan.write_bytes(b"x")
    return orphan


# (case, models: "fp32" / "fp16" / "plan" or a maker of a bad file, extra flags, what the one line says)
BAD_INPUTS = [
    ("plan-batch-over-profile", ["plan"], ["--max-batch-size", "64"], "exceeds the engine's profile maximum 16"),
    ("two-plans-one-arch", ["plan", "plan"], [], "compute capability 8.6"),
    ("cpu-with-trt-accelerator", ["fp32"], ["--kind", "cpu", "--tensorrt-accelerator", "fp16"], "runs on a GPU"),
    ("int8-accelerator-on-fp32", ["fp32"], ["--tensorrt-accelerator", "int8"], "needs a Q/DQ"),
    ("plan-on-cpu", ["plan"], ["--kind", "cpu"], "runs on a GPU"),
    ("preferred-over-max", ["fp32"], ["--preferred-batch-size", "64"], "exceeds --max-batch-size 32"),
    ("a-checkpoint", [_checkpoint], [], "reid-export onnx"),
    ("onnx-without-metadata", [_bare_onnx], [], "annotate"),
    ("plan-without-sidecar", [_orphan_plan], [], "reid-export trt"),
    ("too-few-names", ["fp32", "fp16"], ["--name", "one"], "--name given 1 times"),
    ("bad-name", ["fp32"], ["--name", "bad name"], "bad name"),
    ("two-models-one-name", ["fp32", "fp32"], [], "two models would be named"),
]


@pytest.mark.parametrize("case,inputs,flags,says", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_triton_bad_inputs(models, tmp_path, case, inputs, flags, says):
    """One line naming the problem, exit non-zero, no repository left behind."""
    folder, fp32, fp16, plans = models
    given = {"fp32": fp32, "fp16": fp16, "plan": plans[0]}
    paths = [given[m] if isinstance(m, str) else m(tmp_path, fp32) for m in inputs]
    out = tmp_path / "repo"
    assert_clean_error(run_cli("triton", *paths, "-o", out, *flags), says)
    assert not out.exists() or not any(out.iterdir())


def test_fixed_batch_onnx_gets_max_batch_size_zero(models, tmp_path):
    folder, fp32, _, _ = models
    fixed = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tiny().eval(), (torch.randn(1, 3, 64, 32),), str(fixed), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["features"])
    model = onnx.load(str(fixed))
    set_metadata(model, base_metadata(DC, "fp32"))
    onnx.save(model, str(fixed))
    res = run_cli("triton", fixed, "-o", tmp_path / "repo")
    assert res.code == 0, res
    assert "fixed batch 1" in res.out
    cfg = _parse(tmp_path / "repo" / "fixed" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 3, 64, 32]
    assert not cfg.HasField("dynamic_batching")
    # the client README's numbers are what extract computes: the repository's copy gives the same features
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 64, 32)).astype(np.float32)
    import onnxruntime as ort

    a = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(tmp_path / "repo" / "fixed" / "1" / "model.onnx"),
                             providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(a, b)
    assert json.loads((tmp_path / "repo" / "fixed" / "data_config.json").read_text())["height"] == 64


# --------------------------------------------------------------------------- a real Triton server

# Triton's onnxruntime backend ships in no PyPI package; nvidia-pytriton bundles the Triton server
# binary with its python backend only. So the server runs the repository's model.onnx with ONNX
# Runtime inside a python-backend model, under the generated config.pbtxt with one line changed
# (platform: "onnxruntime_onnx" -> backend: "python"). The stub of that pytriton build reads and
# writes tensors correctly only through DLPack (as_numpy()/Tensor(name, ndarray) give wrong bytes
# with numpy 2), hence from_dlpack.
PYTHON_MODEL = '''
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        cfg = json.loads(args["model_config"])
        self.input, self.output = cfg["input"][0]["name"], cfg["output"][0]["name"]

    def execute(self, requests):
        out = []
        for request in requests:
            x = np.from_dlpack(pb_utils.get_input_tensor_by_name(request, self.input))
            y = np.ascontiguousarray(self.session.run(None, {self.input: x})[0], dtype=np.float32)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(self.output, y)]))
        return out
'''


def _tritonserver():
    """(server binary, its python backend folder, its library folder) from nvidia-pytriton, or skip."""
    import importlib.util
    import sys
    import sysconfig
    from pathlib import Path

    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        pytest.skip("no Triton server: pip install --no-deps nvidia-pytriton (bundles tritonserver + python backend)")
    root = Path(spec.origin).parent / "tritonserver"
    binary, stub = root / "bin" / "tritonserver", root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    if not binary.exists() or not (stub / "triton_python_backend_stub").exists():
        pytest.skip(f"{root}: no tritonserver binary or python backend stub for this Python")
    libdir = sysconfig.get_config_var("LIBDIR")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir:
        pytest.skip("this Python has no shared libpython, which Triton's python backend stub loads")
    return binary, root / "backends" / "python", stub / "triton_python_backend_stub", Path(spec.origin).parents[1] / "nvidia_pytriton.libs", Path(libdir)


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_triton_server_serves_the_repository_and_returns_extracts_features(models, tmp_path, image_dir):
    import os
    import shutil
    import subprocess
    import sys
    import time

    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
    binary, backend, stub, libs, libdir = _tritonserver()
    _, fp32, _, _ = models
    repo = tmp_path / "repo"
    res = run_cli("triton", fp32, "-o", repo, "--kind", "cpu", "--max-batch-size", "8", "--preferred-batch-size", "4")
    assert res.code == 0, res
    config = repo / "tiny" / "config.pbtxt"
    text = config.read_text()
    assert 'platform: "onnxruntime_onnx"' in text
    config.write_text(text.replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
    _parse(config)
    (repo / "tiny" / "1" / "model.py").write_text(PYTHON_MODEL)
    backends = tmp_path / "backends" / "python"
    backends.mkdir(parents=True)
    for item in backend.iterdir():
        if item.is_file():
            shutil.copy(item, backends / item.name)
    shutil.copy(stub, backends / stub.name)
    http, grpc_port, metrics = _free_ports(3)
    import site

    # the stub embeds this Python: its home, and its site-packages (a venv's too) for numpy/onnxruntime
    env = dict(os.environ, LD_LIBRARY_PATH=f"{libs}:{libdir}", PYTHONHOME=sys.base_prefix,
               PYTHONPATH=os.pathsep.join(site.getsitepackages()))
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([str(binary), "--model-repository", str(repo), "--backend-directory",
                               str(tmp_path / "backends"), "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
                               "--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics),
                               "--allow-metrics", "false", "--exit-timeout-secs", "5"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 90
        while True:
            try:
                if client.is_model_ready("tiny"):
                    break
            except Exception:  # not listening yet
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("tritonserver did not get the model ready:\n"
                            + (tmp_path / "server.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        meta = client.get_model_metadata("tiny")
        assert meta.inputs[0].name == "input" and list(meta.inputs[0].shape) == [-1, 3, 64, 32]
        assert meta.outputs[0].name == "features" and list(meta.outputs[0].shape) == [-1, 24]
        served = client.get_model_config("tiny").config
        assert served.max_batch_size == 8 and list(served.dynamic_batching.preferred_batch_size) == [4]

        # the client preprocesses as the repository's README / data_config.json say
        from reid_export.runtime import expand_image_paths, preprocess

        dc = DataConfig.from_json((repo / "tiny" / "data_config.json").read_text())
        paths = expand_image_paths([image_dir])
        batch = preprocess(paths, dc)
        inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        got = client.infer("tiny", [inp]).as_numpy("features")
        singles = []
        for row in batch:  # one request per crop, batched or not by the server
            one = grpcclient.InferInput("input", [1, *row.shape], "FP32")
            one.set_data_from_numpy(row[None])
            singles.append(client.infer("tiny", [one]).as_numpy("features")[0])
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    feats = tmp_path / "feats.npy"
    res = run_cli("extract", fp32, image_dir, "-o", feats, "--no-progress")
    assert res.code == 0, res
    want = np.load(feats)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(singles), want, rtol=1e-5, atol=1e-6)
