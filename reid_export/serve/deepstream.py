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
from ..errors import ReidExportError, options_or_fields
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


@dataclass
class DeepStreamOptions:
    """What ``deepstream`` is asked to do, checked once by :meth:`check` before any work.

    ``images``: crops for the self-check (default: 8 generated ones); ``color_order`` the tracker feeds
    (``rgb``/``bgr``; default: the model's own); ``network_mode`` DeepStream builds (``fp32``/``fp16``/
    ``int8``; default: the ONNX's precision); ``reid_type`` (``deepsort``, ``reassoc``, ``both``);
    ``batch_size``, ``workspace_mb``, ``history_size`` and ``keep_aspect`` of the ``ReID:`` section;
    ``name``: the output file stem (default: the model's); ``max_rel_l2``: the self-check tolerance
    (default: FP32 parity); ``threshold_dataset`` / ``threshold_fmr``: measure the tracker threshold."""

    images: Sequence[str | Path] = ()
    color_order: str | None = None
    network_mode: str | None = None
    reid_type: str = "deepsort"
    batch_size: int = 100
    workspace_mb: int = 1000
    history_size: int = 100
    keep_aspect: bool = False
    name: str | None = None
    progress: bool = False
    max_rel_l2: float | None = None
    threshold_dataset: str | Path | None = None
    threshold_fmr: float = 1e-2

    def check(self) -> "DeepStreamOptions":
        """Raise a one-line :class:`ReidExportError` (exit code 2) for a value that cannot work; returns ``self``."""
        if self.color_order is not None and self.color_order not in COLOR_FORMAT:
            raise ReidExportError(f"colour order must be rgb or bgr, got {self.color_order!r}", exit_code=2)
        if self.network_mode is not None and self.network_mode not in NETWORK_MODE:
            raise ReidExportError(f"`network_mode` must be one of {', '.join(NETWORK_MODE)}", exit_code=2)
        if self.reid_type not in REID_TYPE:
            raise ReidExportError(f"`reid_type` must be one of {', '.join(REID_TYPE)}", exit_code=2)
        for key in ("batch_size", "workspace_mb", "history_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ReidExportError(f"`{key}` must be an integer >= 1, got {value!r}", exit_code=2)
        if self.name is not None and (not self.name or "/" in self.name):
            raise ReidExportError(f"`name` {self.name!r}: give a plain file stem", exit_code=2)
        check_self_check_options(self.max_rel_l2, self.threshold_fmr)
        return self


def check_self_check_options(max_rel_l2: float | None, threshold_fmr: float) -> None:
    """The self-check tolerance and the threshold's false-match rate, shared with :mod:`.boxmot`."""
    if max_rel_l2 is not None and not max_rel_l2 > 0:
        raise ReidExportError(f"`max_rel_l2` must be > 0, got {max_rel_l2:g}", exit_code=2)
    if not 0.0 < threshold_fmr < 1.0:
        raise ReidExportError(f"`threshold_fmr` must be between 0 and 1, got {threshold_fmr:g}", exit_code=2)


def build(model_path: str | Path, out_dir: str | Path, options: DeepStreamOptions | None = None,
          **fields) -> DeepStreamResult:
    """Fold, self-check and write ``OUT_DIR/NAME.deepstream.onnx`` and ``NAME.tracker-reid.yml``.

    Give ``options`` (:class:`DeepStreamOptions`) or its fields as keywords. With ``threshold_dataset``
    (a Market-1501-layout folder) the model's cosine distance at false-match rate ``threshold_fmr`` is
    measured on it (:func:`~reid_export.verify.thresholds.reference_threshold`, the crops resized as the
    tracker will: letterbox with ``keep_aspect``, else stretched, bilinear) and written as
    ``minMatchingScore4ReidSimilarity`` (the similarity ``1 - distance``) in the ``DataAssociator``
    section (NvDeepSORT association) and/or ``TrajectoryManagement`` (re-association).
    Nothing is written when the self-check fails (the error says by how much).
    """
    from ..export.metadata import load_onnx, model_precision, refuse_openvino_ir, require_data_config

    options = options_or_fields(DeepStreamOptions, options, fields, "deepstream")
    options.check()
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
    network_mode = options.network_mode or ("fp32" if precision == "fp32" else precision)
    if network_mode not in NETWORK_MODE:
        raise ReidExportError(f"`network_mode` must be one of {', '.join(NETWORK_MODE)}", exit_code=2)
    color_order = options.color_order or data_config.channel_order
    stem = options.name or model_path.stem
    onnx_out = out_dir / f"{stem}.deepstream.onnx"
    yaml_out = out_dir / f"{stem}.tracker-reid.yml"

    folded = fold_normalisation(model, data_config, color_order)
    check = _self_check(model_path, folded, data_config, precision, onnx_out, options)
    threshold = None
    if options.threshold_dataset is not None:
        from ..verify.thresholds import reference_threshold

        threshold = reference_threshold(model_path, options.threshold_dataset, options.threshold_fmr,
                                        deployment="deepstream-folded" if options.keep_aspect else "bilinear",
                                        progress=options.progress)
    section = reid_section(folded.data_config, check.feature_size, onnx_out.name, network_mode, options.reid_type,
                           options.batch_size, options.workspace_mb, options.history_size, options.keep_aspect)
    _write(model_path, data_config, folded, precision, color_order, section, check, threshold, options.reid_type,
           onnx_out, yaml_out)
    return DeepStreamResult(onnx_out, yaml_out, section, folded, check.parity, check.scalar_parity, check.num_images,
                            threshold=threshold, collapse=check.collapse)


@dataclass
class _SelfCheck:
    parity: object  # embeddings.ParityResult, folded vs original
    scalar_parity: object  # NVIDIA's scalar approximation vs the model's own normalisation
    num_images: int
    feature_size: int
    collapse: object  # embeddings.CollapseStats of real crops, or None


def _self_check(model_path: Path, folded: FoldedModel, data_config: DataConfig, precision: str, onnx_out: Path,
                options: DeepStreamOptions) -> _SelfCheck:
    """The original on its own preprocessing, NVIDIA's scalar normalisation and the folded model on
    DeepStream-style input, on the same crops; raises when the folded model misses the FP32 tolerance."""
    from ..embeddings import Tolerances, compare
    from ..runtime import open_encoder
    from ..runtime.onnx_backend import OnnxEncoder, make_session

    progress = options.progress
    inputs: list[ImageLike]
    if options.images:
        paths = expand_image_paths(options.images)
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
    tol = Tolerances.for_precision("fp32", max_rel_l2=options.max_rel_l2)
    parity = compare(ref, got, tol, str(onnx_out), "onnxruntime", precision)
    scalar_parity = compare(ref, approx, Tolerances(), "NVIDIA scalar", "onnxruntime", precision)
    if not parity.passed:
        raise ReidExportError(f"{onnx_out}: the folded model does not reproduce {model_path.name} on DeepStream-style "
                              f"input ({'; '.join(parity.failures)}); nothing written")
    collapse = None
    if options.images:  # real crops: are they told apart? (the generated ones are noise; they prove nothing here)
        from ..verify.collapse import collapse_of

        collapse = collapse_of(ref)
    return _SelfCheck(parity, scalar_parity, len(inputs), int(ref.shape[1]), collapse)


def _write(model_path: Path, data_config: DataConfig, folded: FoldedModel, precision: str, color_order: str,
           section: dict, check: _SelfCheck, threshold, reid_type: str, onnx_out: Path, yaml_out: Path) -> None:
    """The folded ONNX (with its metadata) and the tracker's ``ReID:`` section, both or neither."""
    from ..export.metadata import KEY_SOURCE, KEY_SOURCE_SHA256, base_metadata, set_metadata

    parity, scalar_parity = check.parity, check.scalar_parity
    set_metadata(folded.model, {
        **base_metadata(replace(folded.data_config, feat_dim=check.feature_size), precision),
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
              f"Self-check on {check.num_images} images: folded vs original min cosine {parity.min_cosine:.7f}, "
              f"max relative L2 {parity.max_rel_l2:.2e};",
              f"NVIDIA's sample scalar (offsets = mean, netScaleFactor {net_scale_factor(data_config):.8f}) instead: "
              f"max relative L2 {scalar_parity.max_rel_l2:.3g}."]
    text = format_reid_yaml(section, header) + (threshold_yaml(threshold, reid_type) if threshold else "")
    out_dir = onnx_out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_path(onnx_out)
    atomic_write_files({onnx_out: folded.model.SerializeToString(), yaml_out: text.encode("utf-8")})


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
