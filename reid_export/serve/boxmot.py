"""BoxMOT hand-off: an ONNX and an OpenVINO IR that BoxMOT 25's ReID backends load as they are.

BoxMOT (StrongSORT, BoT-SORT, DeepOCSORT, ... through ``boxmot.reid``) prepares every crop itself
(``boxmot/reid/core/crops.py``): ``cv2.resize`` INTER_LINEAR of the BGR crop, BGR->RGB, ``/255``,
ImageNet mean/std, float32 NCHW; no setting turns the normalisation off. A graph that normalises
inside (every ``reid-export onnx`` export) normalises twice there. Here the per-channel map from
BoxMOT's input back to the model's own input (scale, mean/std, channel swap for BGR models) is folded
into the graph (:mod:`reid_export.serve.fold`), and the files get the names and the
``.metadata.json`` sidecars that make BoxMOT pick the input size and architecture:

- ``NAME.onnx`` + ``NAME.onnx.metadata.json``: BoxMOT's ONNX backend takes H x W from the graph's
  fixed input dims (set here), the architecture from the sidecar's ``model_name``.
- ``NAME_openvino_model/NAME.xml`` (+ ``.bin``) with ``manifest.json`` (read when BoxMOT is given
  the folder) and ``NAME.xml.metadata.json`` (when given the ``.xml``): BoxMOT's OpenVINO backend
  does not read the size from the IR; without ``model_kwargs.img_size`` it uses the backbone's
  default or 256x128, which is wrong for a 384x128 model.

BoxMOT resolves the architecture from the sidecar's ``model_name``, else from the checkpoint, else
from the longest known backbone name in the file name (``boxmot/reid/core/registry.py``). Its ONNX and
OpenVINO backends never build the architecture, so an architecture BoxMOT does not know runs all the
same; only its PyTorch backend needs one of its own backbones.

Before anything is written the folded ONNX runs on BoxMOT-style input and must reproduce the
original on its own preprocessing (same resize) at the FP32 parity tolerance; the IR is checked
against the folded ONNX by :func:`reid_export.runtime.openvino_convert.convert_file`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence


from .. import __version__
from ..data_config import DataConfig
from ..deploy_preprocess import BOXMOT_INPUT, Affine, input_affine
from ..errors import ReidExportError, UsageError, options_or_fields, require_module
from ..fileio import atomic_write_files, check_output_path, sha256_file
from ..preprocess import ImageLike, expand_image_paths, read_images

BOXMOT_VERSION = "25.0.0"
KEY_BOXMOT = "reid_export.boxmot"
# boxmot 25.0.0 registered_backbone_names(): what its file-name rule can match
BOXMOT_BACKBONES = (
    "csl_tinyvit_11m", "csl_tinyvit_11m_lmbn", "csl_tinyvit_11m_v20", "csl_tinyvit_23m", "csl_tinyvit_23m_lmbn",
    "csl_tinyvit_7m", "csl_tinyvit_7m_lmbn", "csl_tinyvit_7m_v20", "csl_tinyvit_large", "csl_tinyvit_lmbn",
    "csl_tinyvit_normal", "csl_tinyvit_small", "hacnn", "hi_afa", "lmbn_ain_n", "lmbn_n", "mlfn", "mobilenetv2_x1_0",
    "mobilenetv2_x1_4", "mobilenetv4_conv_large", "mobilenetv4_conv_medium", "mobilenetv4_conv_medium_v20",
    "mobilenetv4_conv_small", "mobilenetv4_hybrid_large", "mobilenetv4_hybrid_medium",
    "mobilenetv4_hybrid_medium_v20", "osnet_ain_x0_25", "osnet_ain_x0_5", "osnet_ain_x0_75", "osnet_ain_x1_0",
    "osnet_ibn_x1_0", "osnet_x0_25", "osnet_x0_5", "osnet_x0_75", "osnet_x1_0", "resnet101", "resnet152", "resnet18",
    "resnet34", "resnet50", "resnet50_fc512", "resnext101_32x8d", "resnext50_32x4d",
)
# the BoxMOT backbones reid-export builds as torchreid (and BoxMOT) do: safe to name from a file name
SAME_NETWORK = tuple(n for n in BOXMOT_BACKBONES if n.startswith("osnet_"))
# BoxMOT tracker config keys that take an appearance threshold, a cosine distance (1 - cos of the
# L2-normalised features: scipy's cdist "cosine" in boxmot/trackers/common/association/matching.py,
# StrongSORT's NearestNeighborDistanceMetric("cosine", max_cos_dist)); a pair farther apart is not
# matched by appearance. DeepOCSORT has only a weight (w_association_emb), no threshold.
TRACKER_THRESHOLD_KEYS = {"strongsort": "max_cos_dist", "botsort": "appearance_thresh"}


def tracker_config_yaml(tracker: str, threshold) -> str:
    """A partial BoxMOT tracker config (``boxmot.trackers.config.load_tracker_config`` overlays it on
    the tracker's defaults: scalar values only, ``tracker:`` names the tracker it is for) holding the
    reference threshold (a :class:`reid_export.verify.thresholds.TrackerThreshold`)."""
    key = TRACKER_THRESHOLD_KEYS[tracker]
    return "\n".join([
        f"# {tracker} overrides written by reid-export {__version__} for this ReID model: pass this file as",
        f"# the tracker config (BoxMOT overlays it on {tracker}'s defaults). Measured: {threshold.describe()}.",
        f"tracker: {tracker}",
        f"{key}: {threshold.distance:.4f}  # cosine distance at FMR {threshold.fmr:g}, TMR {threshold.tmr:.1f}%",
    ]) + "\n"


def file_name_backbone(name: str) -> str | None:
    """BoxMOT's last resort: the longest known backbone name in the (lower-cased) file name."""
    lowered = name.lower()
    for candidate in sorted(BOXMOT_BACKBONES, key=len, reverse=True):
        if candidate in lowered:
            return candidate
    return None


@dataclass
class BoxmotResult:
    onnx_path: Path
    openvino_xml: Path | None
    sidecars: list[Path]
    data_config: DataConfig  # of the written files: BoxMOT's input
    source_config: DataConfig  # the original model's
    affine: Affine
    parity: object  # embeddings.ParityResult: folded ONNX on BoxMOT input vs the original on its own
    openvino_lines: list[str]
    architecture: str | None  # the BoxMOT backbone name written into the sidecars, None: not one of BoxMOT's
    precision: str
    num_images: int
    notes: list[str] = field(default_factory=list)
    threshold: object = None  # verify.thresholds.TrackerThreshold written into the tracker configs, or None
    tracker_configs: list[Path] = field(default_factory=list)
    collapse: object = None  # embeddings.CollapseStats of the original on the given crops, or None
    model: str = ""  # what was handed off, and its --config
    config: str | None = None

    @property
    def passed(self) -> bool:
        """The self-checks held and the files were written (a failed check raises: nothing is written)."""
        return bool(self.parity.passed)

    def verify_commands(self, model: str | Path | None = None, config: str | Path | None = None) -> list[str]:
        model = self.model if model is None else model
        config = self.config if config is None else config
        cfg = f" --config {config}" if config else ""
        out = [f"reid-export parity {model} {self.onnx_path}"
               + (f" {self.openvino_xml}" if self.openvino_xml else "") + f"{cfg} --images CROPS/",
               f"reid-export eval {model}{cfg} --dataset-root Market-1501 --deployment boxmot"]
        return out

    def to_dict(self) -> dict:
        from ..report import report_header

        a = self.affine
        return {**report_header("boxmot"), "passed": self.passed, "model": self.model, "onnx": str(self.onnx_path),
                "openvino_xml": None if self.openvino_xml is None else str(self.openvino_xml),
                "sidecars": [str(p) for p in self.sidecars], "architecture": self.architecture,
                "precision": self.precision, "data_config": self.data_config.to_dict(),
                "source_data_config": self.source_config.to_dict(),
                "folded": {"scale": list(a.scale), "bias": list(a.bias), "swap": a.swap},
                "self_check": self.parity.to_dict(), "images": self.num_images, "openvino": list(self.openvino_lines),
                "threshold": None if self.threshold is None else self.threshold.to_dict(),
                "tracker_configs": [str(p) for p in self.tracker_configs],
                "collapse": None if self.collapse is None else self.collapse.to_dict(), "notes": list(self.notes),
                "verify": self.verify_commands()}

    def table(self) -> str:
        """What ``reid-export boxmot`` prints: the model's input, what was folded, the self-check, the files."""
        from ..report import format_table

        p, a, src = self.parity, self.affine, self.source_config
        lines = [f"model input: {src.height}x{src.width} {src.channel_order.upper()}, pixel scale {src.pixel_scale:g}, "
                 f"mean {list(src.mean)}, std {list(src.std)}, normalised "
                 f"{'inside' if src.normalized_inside else 'outside'}; BoxMOT feeds RGB /255 with ImageNet mean/std",
                 "folded into the graph, per model input channel: "
                 + ", ".join(f"{s:.6g} * x{'[' + str(2 - i) + ']' if a.swap else ''} + {b:.6g}"
                             for i, (s, b) in enumerate(zip(a.scale, a.bias)))
                 + ("" if not a.identity else " (identity: the model already takes BoxMOT's input)"),
                 format_table(["check", "min cos", "max rel L2", "top-1", "result"],
                              [[f"folded {self.precision} ONNX on BoxMOT input vs original ({self.num_images} images)",
                                p.min_cosine, p.max_rel_l2, f"{p.top1_agreement:.0%}",
                                "PASS" if p.passed else "FAIL"]], floatfmt=".6g")]
        lines += list(self.openvino_lines) + [f"note: {note}" for note in self.notes]
        arch = self.architecture or "none (a model BoxMOT does not know)"
        lines.append(f"wrote {self.onnx_path}" + (f", {self.openvino_xml.parent}/" if self.openvino_xml else "")
                     + f" and {len(self.sidecars)} sidecar(s) (BoxMOT architecture: {arch}, input "
                     f"{self.data_config.height}x{self.data_config.width}, {self.data_config.feat_dim}-d)")
        if self.threshold is not None:
            lines.append(f"threshold: {self.threshold.describe()}")
            lines.append("wrote " + ", ".join(str(p) for p in self.tracker_configs)
                         + " (BoxMOT tracker configs: pass one as the tracker config)")
        lines.append("verify:")
        lines += [f"  {command}" for command in self.verify_commands()]
        return "\n".join(lines)


def _sidecar(fmt: str, architecture: str | None, label: str, data_config: DataConfig, feat_dim: int,
             precision: str, source: Path, source_sha: str, input_name: str, parity, threshold=None) -> dict:
    """What BoxMOT reads (``boxmot/reid/core/artifacts.py`` / ``registry.py``): ``model_name`` and
    ``model_kwargs`` (schema 1; ``img_size`` sets the crop size), plus our own record under ``reid_export``."""
    return {
        "schema_version": 1,
        "format": fmt,
        "model_name": architecture or label,
        "model_kwargs_schema_version": 1,
        "model_kwargs": {"img_size": [data_config.height, data_config.width]},
        "img_size": [data_config.height, data_config.width],
        "preprocess": "resize",
        "input_name": input_name,
        "precision": {"fp32": "float32", "fp16": "float16"}.get(precision, precision),
        "dynamic_batch": True,
        "source": source.name,
        "source_sha256": source_sha,
        "reid_export": {
            "version": __version__,
            "boxmot_version": BOXMOT_VERSION,
            "known_to_boxmot": architecture is not None,
            "feature_dim": feat_dim,
            "input": "RGB, cv2 INTER_LINEAR resize, /255, ImageNet mean/std outside (BoxMOT's own); "
                     "the graph maps it back to the model's input",
            "data_config": data_config.to_dict(),
            "self_check": {"min_cosine": parity.min_cosine, "max_rel_l2": parity.max_rel_l2,
                           "images": parity.num_images},
            # the reference appearance threshold (--threshold-dataset), also in the *.reid-export.yaml
            # tracker configs under the keys named below; None when not measured
            "tracker_threshold": threshold.to_dict() if threshold is not None else None,
            "tracker_config_keys": TRACKER_THRESHOLD_KEYS,
        },
    }


@dataclass
class BoxmotOptions:
    """What ``boxmot`` is asked to do, checked once by :meth:`check` before any work.

    ``config`` / ``opts``: the fast-reid/torchreid YAML and overrides for a checkpoint that lacks one;
    ``images``: crops for the self-check (default: 8 generated ones); ``name``: the output file stem
    (default: the model's); ``architecture``: the BoxMOT backbone name for the sidecars (default: found
    for OSNet models); ``openvino``: also write the OpenVINO IR; ``max_rel_l2``: the self-check tolerance
    (default: FP32 parity); ``exporter``: torch.onnx exporter for a checkpoint; ``threshold_dataset`` /
    ``threshold_fmr``: measure the tracker threshold."""

    config: str | Path | None = None
    opts: Sequence[str] = ()
    images: Sequence[str | Path] = ()
    name: str | None = None
    architecture: str | None = None
    openvino: bool = True
    max_rel_l2: float | None = None
    progress: bool = False
    exporter: str = "dynamo"
    threshold_dataset: str | Path | None = None
    threshold_fmr: float = 1e-2

    def check(self) -> "BoxmotOptions":
        """Raise a one-line :class:`ReidExportError` for a value that cannot work; returns ``self``."""
        from .deepstream import check_self_check_options

        if self.architecture is not None and self.architecture not in BOXMOT_BACKBONES:
            raise UsageError(f"`architecture` {self.architecture!r} is not a BoxMOT {BOXMOT_VERSION} backbone; leave it "
                             "out for a model BoxMOT does not know (its ONNX/OpenVINO backends do not need one)")
        if self.name is not None and (not self.name or "/" in self.name):
            raise UsageError(f"`name` {self.name!r}: give a plain file stem")
        check_self_check_options(self.max_rel_l2, self.threshold_fmr)
        if self.openvino:
            require_module("openvino", "OpenVINO (for the IR)",
                           "pip install 'reid-export[openvino]' (or write only the ONNX with `openvino=False`)")
        return self


def build(model_path: str | Path, out_dir: str | Path, options: BoxmotOptions | None = None, *,
          log: Callable[[str], None] = lambda line: None, **fields) -> BoxmotResult:
    """Fold BoxMOT's input convention into MODEL, self-check, and write the ONNX, the OpenVINO IR and
    their sidecars into ``out_dir``. Nothing is written when a check fails.

    Give ``options`` (:class:`BoxmotOptions`) or its fields as keywords. With ``threshold_dataset`` (a
    Market-1501-layout folder) the model's cosine distance at false-match rate ``threshold_fmr`` is
    measured there on BoxMOT's own preprocessing (``--deployment boxmot``: its bilinear resize) and
    written as ``strongsort.reid-export.yaml`` (``max_cos_dist``) and ``botsort.reid-export.yaml``
    (``appearance_thresh``), partial tracker configs BoxMOT overlays on its defaults, and into the
    sidecars."""
    from ..export.metadata import KEY_SOURCE, KEY_SOURCE_SHA256, base_metadata, input_info, set_metadata
    from .deepstream import sample_images

    options = options_or_fields(BoxmotOptions, options, fields, "boxmot")
    model_path = Path(model_path)
    suffix = model_path.suffix.lower()
    if suffix not in (".onnx", ".pt", ".pth", ".pkl"):
        raise UsageError(f"{model_path}: boxmot takes a checkpoint (.pth/.pt) or an ONNX (FP32, FP16 or INT8 "
                         "from reid-export, or one with a data config from reid-export annotate)")
    if not model_path.is_file():
        raise ReidExportError(f"{model_path}: no such file; check the path")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReidExportError(f"{out_dir}: is a file; give a folder for -o")
    options.check()
    stem = options.name or model_path.stem
    if not stem or "/" in stem:
        raise UsageError(f"`name` {stem!r}: give a plain file stem")

    inputs: list[ImageLike]
    if options.images:
        inputs, _, _ = read_images(expand_image_paths(options.images))
    else:
        inputs = sample_images()

    with tempfile.TemporaryDirectory(prefix=".reid-export-boxmot.") as tmp_name:
        tmp = Path(tmp_name)
        f = _fold(model_path, tmp, stem, options, log)
        onnx_out = out_dir / f"{stem}.onnx"
        ref, parity, threshold = _self_check(model_path, f, inputs, onnx_out, stem, options)
        feat_dim = int(ref.shape[1])
        written_dc = replace(f.written_dc, feat_dim=feat_dim)
        collapse = None
        if options.images:  # real crops: does the model tell them apart? (the generated ones are noise: they prove nothing)
            from ..verify.collapse import collapse_of

            collapse = collapse_of(ref)
        architecture, notes = _architecture(model_path, f.source_dc, stem, options.architecture)
        source_sha = sha256_file(model_path)
        set_metadata(f.folded, {
            **base_metadata(written_dc, f.precision),
            KEY_SOURCE: model_path.name, KEY_SOURCE_SHA256: source_sha,
            KEY_BOXMOT: {"boxmot_version": BOXMOT_VERSION, "scale": list(f.affine.scale), "bias": list(f.affine.bias),
                         "swapped_channels": f.affine.swap, "architecture": architecture},
        })
        meta = dict(fmt="onnx", architecture=architecture, label=stem, data_config=written_dc, feat_dim=feat_dim,
                    precision=f.precision, source=model_path, source_sha=source_sha,
                    input_name=input_info(f.folded)[0], parity=parity, threshold=threshold)
        files: dict[Path, bytes] = {onnx_out: f.folded.SerializeToString()}
        sidecars = [out_dir / f"{stem}.onnx.metadata.json"]
        files[sidecars[0]] = (json.dumps(_sidecar(**meta), indent=2, sort_keys=True) + "\n").encode()
        ov_lines: list[str] = []
        xml_out = None
        if options.openvino:
            xml_out, ov_lines = _openvino_files(files, sidecars, onnx_out, tmp, stem, meta, log)
        tracker_configs = []
        if threshold is not None:
            for tracker in TRACKER_THRESHOLD_KEYS:
                path = out_dir / f"{tracker}.reid-export.yaml"
                files[path] = tracker_config_yaml(tracker, threshold).encode("utf-8")
                tracker_configs.append(path)
        for path in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_output_path(path)
        atomic_write_files(files)
    return BoxmotResult(onnx_out, xml_out, sidecars, written_dc, f.source_dc, f.affine, parity, ov_lines, architecture,
                        f.precision, len(inputs), notes, threshold, tracker_configs, collapse, str(model_path),
                        None if options.config is None else str(options.config))


@dataclass
class _Folded:
    folded: object  # onnx.ModelProto taking BoxMOT's input
    source_dc: DataConfig  # the original model's
    written_dc: DataConfig  # BoxMOT's input (feat_dim not yet known)
    precision: str
    affine: Affine


def _fold(model_path: Path, tmp: Path, stem: str, options: BoxmotOptions, log) -> _Folded:
    """The model as an ONNX (a checkpoint exported into ``tmp`` first) with BoxMOT's input map folded in."""
    from ..export.metadata import load_onnx, model_precision, require_data_config
    from .fold import fix_spatial_dims, prepend_affine

    if model_path.suffix.lower() == ".onnx":
        onnx_source = model_path
    else:  # a checkpoint: export it first (checked against torch there)
        from ..export.onnx_export import export_checkpoint

        onnx_source = tmp / f"{stem}.source.onnx"
        exported = export_checkpoint(model_path, onnx_source, config=options.config, opts=options.opts,
                                     exporter=options.exporter, log=log)
        if not exported.written:
            raise ReidExportError(exported.refusal or f"{model_path}: the ONNX export failed its checks")
    model = load_onnx(onnx_source)
    source_dc = require_data_config(model, onnx_source)
    precision = model_precision(model)
    affine = input_affine(source_dc, BOXMOT_INPUT)
    folded = prepend_affine(model, affine, "boxmot", "BoxMOT")
    fix_spatial_dims(folded, source_dc.height, source_dc.width)
    # the written model's data config: BoxMOT's input; the resize stays the model's own (the graph is
    # checked against the original on the same pixels; eval --deployment boxmot measures BoxMOT's resize)
    written_dc = replace(source_dc, channel_order="rgb", pixel_scale=BOXMOT_INPUT.pixel_scale,
                         mean=BOXMOT_INPUT.mean, std=BOXMOT_INPUT.std, normalized_inside=False,
                         extra=dict(source_dc.extra, boxmot={"source_data_config": source_dc.to_dict(),
                                                             "client_resize": "linear"}))
    return _Folded(folded, source_dc, written_dc, precision, affine)


def _self_check(model_path: Path, f: _Folded, inputs, onnx_out: Path, stem: str, options: BoxmotOptions):
    """The original on its own preprocessing vs the folded graph on BoxMOT-style input, and the tracker
    threshold of the folded graph when asked: (reference features, parity, threshold or None)."""
    from ..embeddings import Tolerances, compare
    from ..runtime import open_encoder
    from ..runtime.onnx_backend import OnnxEncoder, make_session

    progress = options.progress
    if model_path.suffix.lower() != ".onnx":
        reference = open_encoder(model_path, config=options.config, opts=options.opts)
    else:
        reference = open_encoder(model_path)
    try:
        ref = reference.encode_files(inputs, batch_size=8, progress=progress, desc="original (own preprocessing)")
    finally:
        reference.close()
    candidate = OnnxEncoder(make_session(f.folded.SerializeToString()), f.written_dc, stem + ".onnx",
                            precision=f.precision)
    try:
        got = candidate.encode_files(inputs, batch_size=8, progress=progress, desc="folded (BoxMOT input)")
        tol = Tolerances.for_precision("fp32", max_rel_l2=options.max_rel_l2)
        parity = compare(ref, got, tol, str(onnx_out), "onnxruntime", f.precision)
        if not parity.passed:
            raise ReidExportError(f"{onnx_out}: the folded model does not reproduce {model_path.name} on "
                                  f"BoxMOT-style input ({'; '.join(parity.failures)}); nothing written")
        threshold = None
        if options.threshold_dataset is not None:
            from ..verify.thresholds import reference_threshold

            # the folded graph on BoxMOT's own input (its bilinear resize): what BoxMOT computes with the file
            threshold = reference_threshold(candidate, options.threshold_dataset, options.threshold_fmr,
                                            deployment="boxmot", progress=progress)
            threshold.model = model_path.name
    finally:
        candidate.close()
    return ref, parity, threshold


def _architecture(model_path: Path, source_dc: DataConfig, stem: str, architecture: str | None):
    """The BoxMOT backbone name for the sidecars (given, else BoxMOT's own file-name rule where reid-export
    builds that network as BoxMOT does) and the notes on what BoxMOT will make of the files."""
    notes: list[str] = []
    label = source_dc.model_name or model_path.stem
    if architecture is None:
        guess = file_name_backbone(label) or file_name_backbone(model_path.name)
        if guess in SAME_NETWORK:
            architecture = guess
    named = file_name_backbone(stem)
    if architecture is None:
        notes.append(f"BoxMOT {BOXMOT_VERSION} does not know this architecture ({label}): its ONNX and OpenVINO "
                     "backends run the written graph as it is (crop size from the sidecars), its PyTorch backend "
                     "cannot build it; keep each .metadata.json / manifest.json beside its model"
                     + (f" (without them BoxMOT would take the file name for {named})" if named else
                        ", without them BoxMOT's OpenVINO backend feeds 256x128"))
    elif named != architecture:
        notes.append(f"the file name {stem!r} " + (f"names BoxMOT's {named}" if named else
                     "names no BoxMOT backbone") + f"; the sidecars say {architecture}: keep them beside the files")
    if (source_dc.height, source_dc.width) != (256, 128):
        notes.append(f"input {source_dc.height}x{source_dc.width}: BoxMOT's OpenVINO backend takes it from the "
                     "sidecar (model_kwargs.img_size), its ONNX backend from the graph")
    if source_dc.interpolation != "linear":
        notes.append(f"BoxMOT resizes with cv2 INTER_LINEAR, the model's own resize is {source_dc.interpolation}: "
                     "measure the cost with reid-export eval --deployment boxmot")
    return architecture, notes


def _openvino_files(files: dict, sidecars: list, onnx_out: Path, tmp: Path, stem: str, meta: dict, log):
    """Convert the folded ONNX to ``NAME_openvino_model/NAME.xml`` (checked against it) and add the IR and
    its two sidecars to ``files``; (the .xml path, the conversion's report lines)."""
    from ..runtime.openvino_convert import convert_file

    tmp_onnx = tmp / f"{stem}.onnx"
    tmp_onnx.write_bytes(files[onnx_out])
    tmp_xml = tmp / "ir" / f"{stem}.xml"
    tmp_xml.parent.mkdir()
    report = convert_file(tmp_onnx, tmp_xml, log=log)
    ov_dir = onnx_out.parent / f"{stem}_openvino_model"
    xml_out = ov_dir / f"{stem}.xml"
    files[xml_out.with_suffix(".bin")] = tmp_xml.with_suffix(".bin").read_bytes()
    files[xml_out] = tmp_xml.read_bytes()
    ov_meta = (json.dumps(_sidecar(**{**meta, "fmt": "openvino"}), indent=2, sort_keys=True) + "\n").encode()
    for path in (ov_dir / "manifest.json", ov_dir / f"{stem}.xml.metadata.json"):
        files[path] = ov_meta
        sidecars.append(path)
    return xml_out, report.lines()
