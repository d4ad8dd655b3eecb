"""OpenVINO IR: the commands that have a route for it take it (triton: Triton's openvino backend), the
others say in one line that they have none and what to do instead. And every ``reid-export`` command a
generated Triton README shows runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_clean_error, command_lines, parse_command_line, run_cli, write_image

pytest.importorskip("openvino")


def tiny_onnx(path: Path, batch: int | str = "N") -> Path:
    """Conv -> global average pool -> 8 features, input [batch, 3, 32, 16]."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["images", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"])]
    graph = helper.make_graph(nodes, "tiny",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 32, 16])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


ANNOTATE = ("--mean", "0,0,0", "--std", "1,1,1", "--pixel-scale", "255", "--channel-order", "bgr",
            "--interpolation", "linear", "--normalized-inside")


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    """A plain IR (no data config, like Open Model Zoo's, fixed batch 1) and its annotated copy."""
    import openvino as ov

    folder = tmp_path_factory.mktemp("ir")
    plain = folder / "plain.xml"
    ov.save_model(ov.convert_model(str(tiny_onnx(folder / "tiny.onnx", batch=1))), str(plain), compress_to_fp16=False)
    annotated = folder / "annotated.xml"
    result = run_cli("annotate", plain, "-o", annotated, *ANNOTATE)
    assert result.code == 0, result
    return plain, annotated


def test_commands_without_an_ir_route_say_so_in_one_line(ir, tmp_path):
    plain, annotated = ir
    out = tmp_path / "out.onnx"
    assert_clean_error(run_cli("onnx", annotated, "-o", out), "already an exported model", "no IR -> ONNX route",
                       "triton take .xml")
    assert_clean_error(run_cli("quantize", annotated, "-o", out, "--precision", "int8"),
                       "cannot be quantized here", "the ONNX it came from", "NNCF")
    assert_clean_error(run_cli("quantize", annotated, "-o", out, "--precision", "fp16"),
                       "cannot be quantized here", "openvino --fp16")
    assert_clean_error(run_cli("deepstream", annotated, "-o", tmp_path / "ds"), "not an OpenVINO IR",
                       "the ONNX it came from")
    assert list(tmp_path.iterdir()) == []


def test_triton_serves_an_ir_with_the_openvino_backend(ir, tmp_path):
    plain, annotated = ir
    result = run_cli("triton", annotated, "-o", tmp_path / "repo")
    assert result.code == 0, result
    folder = tmp_path / "repo" / "annotated"
    config = (folder / "config.pbtxt").read_text()
    assert 'backend: "openvino"' in config and "platform:" not in config
    assert "kind: KIND_CPU" in config and "max_batch_size: 0" in config and "dims: [ 1, 3, 32, 16 ]" in config
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.bin", "model.xml"]
    try:
        from reid_export.serve.triton import parse_config

        parsed = parse_config(config)
        assert parsed.backend == "openvino" and parsed.default_model_filename == "model.xml"
    except Exception as exc:  # noqa: BLE001 - tritonclient is an extra
        if "tritonclient" not in str(exc):
            raise
    # the copy in the repository still carries its data config: extract runs on it
    assert run_cli("extract", folder / "1" / "model.xml", write_image(tmp_path / "c.jpg"), "-o", tmp_path / "f.npy",
                   "--no-progress").code == 0

    # an IR without a data config: the hint names annotate and --detect
    assert_clean_error(run_cli("triton", plain, "-o", tmp_path / "repo2"), "carries no reid-export data config",
                       "--detect")
    assert_clean_error(run_cli("triton", annotated, "-o", tmp_path / "repo3", "--tensorrt-accelerator", "fp16"),
                       "openvino backend", "--tensorrt-accelerator applies to ONNX")


def test_every_command_a_triton_readme_shows_runs(ir, tmp_path):
    plain, annotated = ir
    onnx_model = tmp_path / "m.onnx"
    assert run_cli("annotate", tiny_onnx(tmp_path / "raw.onnx"), "-o", onnx_model, *ANNOTATE).code == 0
    result = run_cli("triton", onnx_model, annotated, "-o", tmp_path / "repo")
    assert result.code == 0, result
    readmes = sorted((tmp_path / "repo").glob("*/README.md")) + [tmp_path / "repo" / "README.md"]
    shown = {readme: command_lines(readme.read_text()) for readme in readmes}
    assert sum(map(len, shown.values())) >= 2, shown
    for readme, lines in shown.items():
        for line in lines:
            parse_command_line(line)  # every option exists, every argument is there
            if line.startswith("reid-export extract "):  # and it runs, in the folder the README is in
                crops = readme.parent / "crops"
                for i in range(3):
                    write_image(crops / f"{i}.jpg", seed=i)
                cwd = os.getcwd()
                os.chdir(readme.parent)
                try:
                    ran = run_cli(*__import__("shlex").split(line)[1:], "--no-progress")
                finally:
                    os.chdir(cwd)
                assert ran.code == 0, (line, ran)
                assert np.load(readme.parent / "features.npy").shape == (3, 8)


def test_the_old_readme_command_would_have_failed():
    """The check can fail: the command the README used to show (an --images option) does not parse."""
    import click

    with pytest.raises(click.UsageError):
        parse_command_line("reid-export extract MODEL --images crops/")
