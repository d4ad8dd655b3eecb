"""DeepStream hand-off: an ONNX that takes what the tracker feeds, and its nvtracker ``ReID:`` section.

DeepStream's tracker (NvDCF / NvDeepSORT) crops each object, scales it to ``inferDims`` and
normalises with one scalar for all channels: ``y = netScaleFactor * (x - offsets)`` on 0..255
pixels in ``colorFormat`` order. fast-reid and torchreid models normalise per channel, so NVIDIA's
sample configs approximate the three stds by their mean (0.01735207 = 1/57.63). Here the model's
exact per-channel normalisation (and pixel scale, and a channel swap where the tracker's colour
order differs) is folded into the graph as a Mul and an Add before its first layer, so the config
says ``offsets: [0, 0, 0]`` and ``netScaleFactor: 1.0`` and nothing is approximated.

Before anything is written, :func:`build` runs the original model on its own preprocessing and
the folded one on DeepStream-style input (0..255, the tracker's colour order, same resize) and
requires the two embeddings to agree at the FP32 parity tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .. import __version__
from ..data_config import DataConfig
from ..errors import ReidExportError
from ..fileio import atomic_write_files, check_output_path, sha256_file
from ..preprocess import ImageLike, expand_image_paths, read_images
from ..deploy_preprocess import Deployment, input_affine, net_scale_factor

COLOR_FORMAT = {"rgb": 0, "bgr": 1}  # ReID colorFormat
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}  # ReID networkMode
REID_TYPE = {"deepsort": 1, "reassoc": 2, "both": 3}  # 0 is the dummy ReID (no features)
KEY_DEEPSTREAM = "reid_export.deepstream"


@dataclass
class FoldedModel:
    model: onnx.ModelProto
    data_config: DataConfig  # of the folded model: 0..255 in the tracker's colour order, normalised inside
    scale: list[float]  # per channel of the tracker's input, what the folded Mul multiplies by
    bias: list[float]
    swapped_channels: bool


def fold_normalisation(model: onnx.ModelProto, data_config: DataConfig, color_order: str) -> FoldedModel:
    """A copy of ``model`` whose input is 0..255 pixels in ``color_order`` with the model's own
    preprocessing after the resize (channel order, pixel scale, per-channel mean/std) inside."""
    from .fold import check_image_input, prepend_affine

    if color_order not in COLOR_FORMAT:
        raise ReidExportError(f"colour order must be rgb or bgr, got {color_order!r}", exit_code=2)
    check_image_input(model, "DeepStream")
    # what the tracker hands over: 0..255 pixels in its colour order, nothing subtracted or divided
    tracker = replace(data_config, channel_order=color_order, pixel_scale=255.0, mean=(0.0, 0.0, 0.0),
                      std=(1.0, 1.0, 1.0), normalized_inside=False)
    affine = input_affine(data_config, tracker)
    folded = prepend_affine(model, affine, "deepstream", "DeepStream")
    scale, bias, swap = list(affine.scale), list(affine.bias), affine.swap
    # the folded model's data config: 0..255 in the tracker's colour order, normalisation inside
    # (mean/std recorded in pixel units and that order, for reference)
    to_px = 255.0 / data_config.pixel_scale
    mean = [m * to_px for m in data_config.mean]
    std = [s * to_px for s in data_config.std]
    if swap:
        mean, std = mean[::-1], std[::-1]
    new_dc = replace(data_config, channel_order=color_order, pixel_scale=255.0, mean=tuple(mean), std=tuple(std),
                     normalized_inside=True, extra=dict(data_config.extra, deepstream_folded=True))
    # what the tracker's channel c becomes at the model input (after the optional swap)
    if swap:
        scale, bias = scale[::-1], bias[::-1]
    return FoldedModel(folded, new_dc, [float(v) for v in scale], [float(v) for v in bias], swap)


def reid_section(data_config: DataConfig, feature_size: int, onnx_file: str, network_mode: str = "fp32",
                 reid_type: str = "deepsort", batch_size: int = 100, workspace_mb: int = 1000,
                 history_size: int = 100, keep_aspect: bool = False) -> dict:
    """The nvtracker ``ReID:`` keys for a folded model (offsets 0, netScaleFactor 1: exact)."""
    engine = f"{onnx_file}_b{batch_size}_gpu0_{network_mode}.engine"  # DeepStream's naming (its samples: *.etlt_b100_gpu0_int8.engine)
    return {
        "reidType": REID_TYPE[reid_type],
        "batchSize": batch_size,
        "workspaceSize": workspace_mb,
        "reidFeatureSize": int(feature_size),
        "reidHistorySize": history_size,
        "inferDims": [3, data_config.height, data_config.width],
        "inputOrder": 0,
        "colorFormat": COLOR_FORMAT[data_config.channel_order],
        "networkMode": NETWORK_MODE[network_mode],
        "offsets": [0.0, 0.0, 0.0],
        "netScaleFactor": 1.0,
        "keepAspc": 1 if keep_aspect else 0,
        "addFeatureNormalization": 1,
        "onnxFile": onnx_file,
        "modelEngineFile": engine,
    }


_COMMENTS = {
    "reidType": "1 NvDeepSORT association, 2 re-association, 3 both",
    "workspaceSize": "MB for the TensorRT engine build",
    "reidFeatureSize": "the model's embedding size",
    "inferDims": "C, H, W of the model input",
    "inputOrder": "0 NCHW",
    "colorFormat": "0 RGB, 1 BGR: the order the folded ONNX takes",
    "networkMode": "0 FP32, 1 INT8, 2 FP16",
    "offsets": "exact: the model's mean is inside the ONNX",
    "netScaleFactor": "exact: the model's per-channel std is inside the ONNX",
    "keepAspc": "0: stretch, as the model's own preprocessing; 1: letterbox (eval --deployment deepstream-folded measures it)",
    "addFeatureNormalization": "L2-normalise the features (the model outputs them unnormalised)",
    "onnxFile": "relative to this file",
    "modelEngineFile": "built from onnxFile when missing (TensorRT engines are tied to the GPU and TensorRT version)",
}


def format_reid_yaml(section: dict, header: Sequence[str] = ()) -> str:
    """The ``ReID:`` section as YAML (lists in flow style, one comment per key)."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines.append("ReID:")
    for key, value in section.items():
        if isinstance(value, list):
            text = "[" + ", ".join(_scalar(v) for v in value) + "]"
        else:
            text = _scalar(value)
        comment = _COMMENTS.get(key)
        lines.append(f"  {key}: {text}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines) + "\n"


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sample_images(count: int = 8, seed: int = 0) -> list[np.ndarray]:
    """Crops for the self-check when no images are given: smooth random RGB of several aspect ratios."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = int(rng.integers(48, 320)), int(rng.integers(24, 160))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append(cv2.GaussianBlur(img, (7, 7), 0))
    return out


@dataclass
class DeepStreamResult:
    onnx_path: Path
    yaml_path: Path
    section: dict
    folded: FoldedModel
    parity: object  # embeddings.ParityResult, folded vs original
    scalar_parity: object  # NVIDIA's scalar approximation vs the model's own normalisation
    num_images: int
    notes: list[str] = field(default_factory=list)
    threshold: object = None  # verify.thresholds.TrackerThreshold written into the config, or None
    collapse: object = None  # embeddings.CollapseStats of the self-check crops when they were real (--images)

    @property
    def passed(self) -> bool:
        """The self-check held and the files were written (a failed check raises: nothing is written)."""
        return bool(self.parity.passed)

    def to_dict(self) -> dict:
        from ..report import report_header

        return {**report_header("deepstream"), "passed": self.passed, "onnx": str(self.onnx_path),
                "tracker_config": str(self.yaml_path), "reid_section": self.section,
                "data_config": self.folded.data_config.to_dict(), "self_check": self.parity.to_dict(),
                "nvidia_scalar_check": self.scalar_parity.to_dict(), "images": self.num_images,
                "threshold": None if self.threshold is None else self.threshold.to_dict(),
                "collapse": None if self.collapse is None else self.collapse.to_dict(), "notes": list(self.notes)}

    def table(self) -> str:
        """What ``reid-export deepstream`` prints: the self-check beside NVIDIA's scalar, and the files."""
        from ..deploy_preprocess import net_scale_factor
        from ..report import format_table

        p, s = self.parity, self.scalar_parity
        lines = [f"self-check on {self.num_images} images (same resize, DeepStream-style input for the folded model):",
                 format_table(["candidate", "min cos", "max rel L2", "top-1", "result"],
                              [["folded ONNX, offsets 0, netScaleFactor 1", p.min_cosine, p.max_rel_l2,
                                f"{p.top1_agreement:.0%}", "PASS" if p.passed else "FAIL"],
                               [f"NVIDIA scalar {net_scale_factor(self.folded.data_config):.8f} (not used)",
                                s.min_cosine, s.max_rel_l2, f"{s.top1_agreement:.0%}", "-"]], floatfmt=".6g")]
        if self.threshold is not None:
            lines.append(f"threshold: {self.threshold.describe()}; minMatchingScore4ReidSimilarity "
                         f"{self.threshold.similarity:.4f}")
        sec = self.section
        lines.append(f"wrote {self.onnx_path} and {self.yaml_path} (ReID: reidFeatureSize {sec['reidFeatureSize']}, "
                     f"inferDims {sec['inferDims']}, colorFormat {sec['colorFormat']}, keepAspc {sec['keepAspc']})")
        return "\n".join(lines)


def build(model_path: str | Path, out_dir: str | Path, images: Sequence[str | Path] = (), color_order: str | None = None,
          network_mode: str | None = None, reid_type: str = "deepsort", batch_size: int = 100,
          workspace_mb: int = 1000, history_size: int = 100, keep_aspect: bool = False,
          name: str | None = None, progress: bool = False, max_rel_l2: float | None = None,
          threshold_dataset: str | Path | None = None, threshold_fmr: float = 1e-2) -> DeepStreamResult:
    """Fold, self-check and write ``OUT_DIR/NAME.deepstream.onnx`` and ``NAME.tracker-reid.yml``.

    With ``threshold_dataset`` (a Market-1501-layout folder) the model's cosine distance at false-match
    rate ``threshold_fmr`` is measured on it (:func:`~reid_export.verify.thresholds.reference_threshold`,
    the crops resized as the tracker will: letterbox with ``keep_aspect``, else stretched, bilinear)
    and written as ``minMatchingScore4ReidSimilarity`` (the similarity ``1 - distance``) in the
    ``DataAssociator`` section (NvDeepSORT association) and/or ``TrajectoryManagement`` (re-association).
    Nothing is written when the self-check fails (the error says by how much).
    """
    from ..export.metadata import (KEY_SOURCE, KEY_SOURCE_SHA256, base_metadata, load_onnx, model_precision,
                                   refuse_openvino_ir, require_data_config, set_metadata)
    from ..runtime import open_encoder
    from ..runtime.onnx_backend import OnnxEncoder, make_session
    from ..embeddings import Tolerances, compare

    model_path = Path(model_path)
    refuse_openvino_ir(model_path, "deepstream")
    if model_path.suffix.lower() != ".onnx":
        raise ReidExportError(f"{model_path}: deepstream takes an ONNX model; export a checkpoint first with "
                              f"`reid-export onnx {model_path} -o model.onnx`", exit_code=2)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReidExportError(f"{out_dir}: is a file; give a folder for -o")
    model = load_onnx(model_path)
    data_config = require_data_config(model, model_path)
    precision = model_precision(model)
    network_mode = network_mode or ("fp32" if precision == "fp32" else precision)
    if network_mode not in NETWORK_MODE:
        raise ReidExportError(f"`network_mode` must be one of {', '.join(NETWORK_MODE)}", exit_code=2)
    if reid_type not in REID_TYPE:
        raise ReidExportError(f"`reid_type` must be one of {', '.join(REID_TYPE)}", exit_code=2)
    color_order = color_order or data_config.channel_order
    stem = name or model_path.stem
    onnx_out = out_dir / f"{stem}.deepstream.onnx"
    yaml_out = out_dir / f"{stem}.tracker-reid.yml"

    folded = fold_normalisation(model, data_config, color_order)
    inputs: list[ImageLike]
    if images:
        paths = expand_image_paths(images)
        inputs, _, _ = read_images(paths)
    else:
        inputs = sample_images()
    original = open_encoder(model_path)
    ref = original.encode_files(inputs, batch_size=8, progress=progress, desc="original (own preprocessing)")
    # NVIDIA's sample normalisation on the same resized images: what folding avoids
    scalar = Deployment("scalar", "", letterbox=False, resize=data_config.interpolation, scalar_normalisation=True)
    original.preprocessing = scalar.preprocess
    approx = original.encode_files(inputs, batch_size=8, progress=progress, desc="NVIDIA scalar normalisation")
    original.close()
    session = make_session(folded.model.SerializeToString())
    ds = OnnxEncoder(session, folded.data_config, onnx_out, precision=precision)
    got = ds.encode_files(inputs, batch_size=8, progress=progress, desc="folded (DeepStream input)")
    ds.close()
    tol = Tolerances.for_precision("fp32", max_rel_l2=max_rel_l2)
    parity = compare(ref, got, tol, str(onnx_out), "onnxruntime", precision)
    scalar_parity = compare(ref, approx, Tolerances(), "NVIDIA scalar", "onnxruntime", precision)
    if not parity.passed:
        raise ReidExportError(f"{onnx_out}: the folded model does not reproduce {model_path.name} on DeepStream-style "
                              f"input ({'; '.join(parity.failures)}); nothing written")
    collapse = None
    if images:  # real crops: are they told apart? (the generated ones are noise; they prove nothing here)
        from ..verify.collapse import collapse_of

        collapse = collapse_of(ref)
    threshold = None
    if threshold_dataset is not None:
        from ..verify.thresholds import reference_threshold

        threshold = reference_threshold(model_path, threshold_dataset, threshold_fmr,
                                        deployment="deepstream-folded" if keep_aspect else "bilinear",
                                        progress=progress)
    feature_size = int(ref.shape[1])
    section = reid_section(folded.data_config, feature_size, onnx_out.name, network_mode, reid_type, batch_size,
                           workspace_mb, history_size, keep_aspect)
    set_metadata(folded.model, {
        **base_metadata(replace(folded.data_config, feat_dim=feature_size), precision),
        KEY_SOURCE: str(model_path), KEY_SOURCE_SHA256: sha256_file(model_path),
        KEY_DEEPSTREAM: {"color_format": color_order, "scale": folded.scale, "bias": folded.bias,
                         "swapped_channels": folded.swapped_channels, "reid": section,
                         "threshold": threshold.to_dict() if threshold else None},
    })
    header = [f"DeepStream nvtracker ReID section for {onnx_out.name}, written by reid-export {__version__}",
              f"from {model_path.name}'s data config ({data_config.height}x{data_config.width}, "
              f"{data_config.channel_order.upper()}, mean {list(data_config.mean)}, std {list(data_config.std)},",
              f"pixel scale {data_config.pixel_scale:g}, normalised {'inside' if data_config.normalized_inside else 'outside'}"
              " the original graph). The normalisation is folded into the ONNX: offsets 0 and",
              "netScaleFactor 1.0 are exact. Merge this section into the tracker's ll-config-file.",
              f"Self-check on {len(inputs)} images: folded vs original min cosine {parity.min_cosine:.7f}, "
              f"max relative L2 {parity.max_rel_l2:.2e};",
              f"NVIDIA's sample scalar (offsets = mean, netScaleFactor {net_scale_factor(data_config):.8f}) instead: "
              f"max relative L2 {scalar_parity.max_rel_l2:.3g}."]
    text = format_reid_yaml(section, header) + (threshold_yaml(threshold, reid_type) if threshold else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_path(onnx_out)
    atomic_write_files({onnx_out: folded.model.SerializeToString(), yaml_out: text.encode("utf-8")})
    return DeepStreamResult(onnx_out, yaml_out, section, folded, parity, scalar_parity, len(inputs),
                            threshold=threshold, collapse=collapse)


# Where NvMultiObjectTracker reads the least ReID similarity of a match (its sample configs and
# docs): DataAssociator for NvDeepSORT's association, TrajectoryManagement for re-association.
# The score is the dot product of the L2-normalised features (addFeatureNormalization: 1), so the
# cosine similarity, 1 - the cosine distance eval reports.
THRESHOLD_SECTIONS = {"deepsort": ("DataAssociator",), "reassoc": ("TrajectoryManagement",),
                      "both": ("DataAssociator", "TrajectoryManagement")}


def threshold_yaml(threshold, reid_type: str) -> str:
    """The ``minMatchingScore4ReidSimilarity`` key(s) for a measured threshold, as YAML sections to merge
    into the tracker config's own (its other keys there stay as they are)."""
    lines = ["", f"# Measured by reid-export: {threshold.describe()}.",
             "# minMatchingScore4ReidSimilarity = 1 - cosine distance. Merge into the config's own section(s)."]
    for section in THRESHOLD_SECTIONS[reid_type]:
        lines += [f"{section}:",
                  f"  minMatchingScore4ReidSimilarity: {threshold.similarity:.4f}  # cosine distance "
                  f"{threshold.distance:.4f} at FMR {threshold.fmr:g}, TMR {threshold.tmr:.1f}%"]
    return "\n".join(lines) + "\n"
