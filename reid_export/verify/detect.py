"""Find a foreign model's preprocessing by trying the conventions it plausibly expects.

A ReID model from elsewhere (an ONNX export, an OpenVINO IR) rarely says how its input was made.
Feeding it the wrong convention does not fail: features still come out, only worse, sometimes
collapsed. So ``annotate --detect`` measures instead of guessing: every combination of

* channel order: RGB or BGR,
* pixel scale: 0..1 or 0..255,
* ImageNet mean/std applied outside the model (in the units of that scale), or no normalisation
  outside (the model normalises itself, or never did),

is run on the same crops with one resize (OpenCV bilinear), then the resize modes (OpenCV
bilinear/bicubic, Pillow bilinear/bicubic) are tried for the winning convention. With labelled
crops (Market-1501 names, ``PPPP_cC...``) each trial is scored by the Market-1501 protocol and the
best mAP wins; how sure that is comes from the paired bootstrap over the queries (the runner-up
is "within noise" when the 95% interval of the difference holds 0). A convention whose features
collapse (every pair of different images at cosine >= 0.99) is never chosen. Without labels only
the collapse test can speak: a convention is chosen only when it is the one that does not collapse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..console import say
from ..data.market import MarketDataset, find_market_root, parse_name
from ..data_config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from ..embeddings import CollapseStats, collapse_stats, l2_normalize
from ..errors import ReidExportError, UsageError
from ..preprocess import expand_image_paths, preprocess_image, read_image, resize_rgb
from ..report import format_table, report_header
from . import metrics
from .retrieval import SplitArrays, per_query_ap
from .evaluation import paired_interval

SEARCH_RESIZE = "linear"                # the resize of the convention search
RESIZES = ("linear", "cubic", "pil-bilinear", "pil-bicubic")
DEFAULT_MAX_QUERIES = 100
DEFAULT_MAX_UNLABELLED = 64
SAME_FEATURES = 0.99                    # mean cosine above which two conventions give the same features


@dataclass(frozen=True)
class Convention:
    channel_order: str          # rgb | bgr
    pixel_scale: float          # 1 | 255
    imagenet_outside: bool      # ImageNet mean/std applied before the model
    interpolation: str = SEARCH_RESIZE

    @property
    def label(self) -> str:
        if self.imagenet_outside:
            return f"{self.channel_order.upper()}, ImageNet mean/std outside, {self.interpolation}"
        return f"{self.channel_order.upper()} 0..{self.pixel_scale:g}, no normalisation outside, {self.interpolation}"

    def same_pixels(self, other: "Convention") -> bool:
        return (self.channel_order, self.pixel_scale, self.imagenet_outside) == (
            other.channel_order, other.pixel_scale, other.imagenet_outside)

    def data_config(self, height: int, width: int, model_name: str = "") -> DataConfig:
        if self.imagenet_outside:
            mean = tuple(v * self.pixel_scale for v in IMAGENET_MEAN)
            std = tuple(v * self.pixel_scale for v in IMAGENET_STD)
            if self.channel_order == "bgr":
                mean, std = mean[::-1], std[::-1]
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return DataConfig(height=height, width=width, channel_order=self.channel_order,
                          pixel_scale=self.pixel_scale, mean=mean, std=std, interpolation=self.interpolation,
                          normalized_inside=not self.imagenet_outside, model_name=model_name)


def conventions(interpolation: str = SEARCH_RESIZE) -> list[Convention]:
    """The six distinct inputs: with ImageNet mean/std outside the pixel scale makes no difference
    ((x/255 - m)/s equals (x - 255 m)/(255 s)), so that case is tried once, as 0..1 (torchreid's)."""
    out = []
    for order in ("rgb", "bgr"):
        out.append(Convention(order, 1.0, True, interpolation))
        out += [Convention(order, scale, False, interpolation) for scale in (1.0, 255.0)]
    return out


def _inputs(arrays: list[np.ndarray], config: DataConfig) -> np.ndarray:
    """The model input of already resized RGB uint8 images: the one preprocessing function, which
    skips the resize for an image already at the input size."""
    return np.stack([preprocess_image(a, config) for a in arrays])


@dataclass
class Trial:
    """One convention run on the crops: its retrieval (labelled) and whether its features collapse."""

    convention: Convention
    stage: str                           # convention | resize | current
    collapse: CollapseStats | None
    metrics: dict = field(default_factory=dict)
    ap: np.ndarray | None = None         # per-query AP (percent), for the bootstrap
    features: np.ndarray | None = None   # L2-normalised, one row per crop
    agreement: float | None = None       # mean cosine, crop by crop, to the best trial's features

    @property
    def collapsed(self) -> bool:
        return bool(self.collapse and self.collapse.collapsed)

    @property
    def mAP(self) -> float:
        return float(self.metrics.get("mAP", float("nan")))

    def row(self) -> dict:
        out = {"convention": self.convention.label, "stage": self.stage, "channel_order": self.convention.channel_order,
               "pixel_scale": self.convention.pixel_scale, "imagenet_outside": self.convention.imagenet_outside,
               "interpolation": self.convention.interpolation, "collapsed": self.collapsed}
        if self.collapse is not None:
            out["min_pair_cosine"] = round(self.collapse.min_pair_cosine, 4)
            out["mean_pair_cosine"] = round(self.collapse.mean_pair_cosine, 4)
        for key in ("mAP", "Rank-1"):
            if key in self.metrics:
                out[key] = round(float(self.metrics[key]), 3)
        if self.agreement is not None:
            out["mean_cosine_to_best"] = round(self.agreement, 4)
        return out


@dataclass
class Margin:
    """The winner against another trial: mean d AP (points) and its 95% paired-bootstrap interval."""

    against: str
    delta: float
    ci95: tuple[float, float]

    @property
    def within_noise(self) -> bool:
        return not (self.ci95[0] > 0)

    def text(self) -> str:
        verdict = "within noise" if self.within_noise else "clear"
        return (f"{self.delta:+.2f} mAP over {self.against} (95% interval {self.ci95[0]:+.2f} .. "
                f"{self.ci95[1]:+.2f}: {verdict})")

    def to_dict(self) -> dict:
        return {"against": self.against, "delta_mAP": round(self.delta, 3),
                "ci95": [round(v, 3) for v in self.ci95], "within_noise": self.within_noise}


@dataclass
class DetectReport:
    model: str
    images: str
    labelled: bool
    num_queries: int
    num_gallery: int
    input_size: tuple[int, int]
    trials: list[Trial] = field(default_factory=list)
    chosen: Trial | None = None
    convention_margin: Margin | None = None     # best convention vs the runner-up convention
    resize_margin: Margin | None = None         # best resize vs the runner-up resize
    current: Trial | None = None                # the data config the model already carried
    current_config: DataConfig | None = None
    refusal: str | None = None                  # why nothing was chosen
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    output: Path | None = None                  # the annotated model, when written
    written_config: DataConfig | None = None

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    @property
    def exit_code(self) -> int:
        return 1 if self.chosen is None else 0

    def data_config(self, model_name: str = "") -> DataConfig:
        if self.chosen is None:
            raise ReidExportError(self.refusal or "no convention chosen")
        return self.chosen.convention.data_config(*self.input_size, model_name=model_name)

    def table(self) -> str:
        ordered = sorted(self.trials, key=lambda t: (t.collapsed, -np.nan_to_num(t.mAP, nan=-1.0),
                                                     t.collapse.mean_pair_cosine if t.collapse else 1.0))
        headers = ["convention", "stage"] + (["mAP", "Rank-1", "cos to best"] if self.labelled else []) + [
            "min pair cos", "mean pair cos", "verdict"]
        rows = []
        for t in ordered:
            verdict = "collapsed" if t.collapsed else ""
            if t is self.chosen:
                verdict = "chosen"
            row = [t.convention.label, t.stage]
            if self.labelled:
                row += [t.metrics.get("mAP"), t.metrics.get("Rank-1"), t.agreement]
            row += [t.collapse.min_pair_cosine if t.collapse else None,
                    t.collapse.mean_pair_cosine if t.collapse else None, verdict]
            rows.append(row)
        return format_table(headers, rows, floatfmt=".2f" if self.labelled else ".3f")

    def lines(self) -> list[str]:
        out = []
        what = (f"{self.num_queries} queries, {self.num_gallery} gallery images" if self.labelled
                else f"{self.num_queries} unlabelled images")
        out.append(f"detect {self.model}: {len(self.trials)} trials on {what} from {self.images} "
                   f"({self.seconds:.0f} s)")
        if self.chosen is not None:
            out.append(f"chosen: {self.chosen.convention.label}")
        if self.convention_margin:
            out.append(f"convention: {self.convention_margin.text()}")
        if self.resize_margin:
            out.append(f"resize: {self.resize_margin.text()}; rule: the best mAP wins, a resize within noise "
                       "of it would do as well")
        out.extend(self.notes)
        return out

    def to_dict(self) -> dict:
        out = report_header("annotate --detect")
        out.update({
            "model": self.model, "images": self.images, "labelled": self.labelled,
            "num_queries": self.num_queries, "num_gallery": self.num_gallery,
            "input_size": list(self.input_size), "trials": [t.row() for t in self.trials],
            "chosen": self.chosen.row() if self.chosen else None,
            "data_config": self.data_config().to_dict() if self.chosen else None,
            "convention_margin": self.convention_margin.to_dict() if self.convention_margin else None,
            "resize_margin": self.resize_margin.to_dict() if self.resize_margin else None,
            "current_data_config": self.current_config.to_dict() if self.current_config else None,
            "current": self.current.row() if self.current else None,
            "refusal": self.refusal, "notes": self.notes, "seconds": round(self.seconds, 1),
            "output": str(self.output) if self.output else None,
        })
        return out


@dataclass
class _Crops:
    """The crops detection runs on, decoded once: labels (None when unlabelled) and the two splits."""

    images: list[np.ndarray]
    query: SplitArrays | None
    gallery: SplitArrays | None
    query_rows: np.ndarray | None       # rows of ``images`` that are the queries / the gallery
    gallery_rows: np.ndarray | None
    source: str

    @property
    def labelled(self) -> bool:
        return self.query is not None


def _pick_identities(query_items, gallery_items, max_queries: int):
    """Whole identities, spread over the sorted ids, until ``max_queries`` queries are taken; the
    gallery keeps the images of those identities (and the distractors among them)."""
    gallery_cams: dict[int, set[int]] = {}
    for it in gallery_items:
        gallery_cams.setdefault(it.pid, set()).add(it.camid)
    usable = [q for q in query_items if gallery_cams.get(q.pid, set()) - {q.camid}]
    if not usable:
        return [], []
    by_pid: dict[int, list] = {}
    for q in usable:
        by_pid.setdefault(q.pid, []).append(q)
    pids = sorted(by_pid)
    per_pid = max(1, len(usable) // len(pids))
    want = max(1, min(len(pids), -(-max_queries // per_pid)))
    chosen = [pids[int(i)] for i in np.linspace(0, len(pids) - 1, want).round().astype(int)]
    chosen = list(dict.fromkeys(chosen))
    queries = [q for pid in chosen for q in by_pid[pid]][:max_queries]
    keep = {q.pid for q in queries}
    gallery = [g for g in gallery_items if g.pid in keep]
    return queries, gallery


def _load_crops(images: str | Path, max_queries: int, max_unlabelled: int, progress: bool) -> _Crops:
    from ..data.market import ReidItem

    root = Path(images)
    if not root.exists():
        raise ReidExportError(f"{root}: no such folder; point `images` at labelled crops (a Market-1501 layout or "
                              "a folder of PPPP_cC... named images)")
    dataset = None
    if root.is_dir():
        try:
            find_market_root(root)
        except ReidExportError:
            pass
        else:
            dataset = MarketDataset(root)
    if dataset is not None:
        queries, gallery = _pick_identities(dataset.query, dataset.gallery, max_queries)
        if not queries:
            raise ReidExportError(f"{root}: no query has a gallery image of the same person from another camera; "
                                  "check the PPPP_cC... names")
        paths = [q.path for q in queries] + [g.path for g in gallery]
        q_rows = np.arange(len(queries))
        g_rows = np.arange(len(queries), len(paths))
        source = f"{dataset.root}"
    else:
        files = expand_image_paths([root])
        items = []
        for path in files:
            parsed = parse_name(path.name)
            if parsed is not None and parsed[0] != -1:
                items.append(ReidItem(str(path), *parsed))
        queries, gallery = _pick_identities(items, items, max_queries) if len(items) == len(files) else ([], [])
        if not queries:
            # unlabelled (or labels that give no cross-camera match): collapse test only
            rng = np.random.default_rng(0)
            take = sorted(rng.choice(len(files), min(len(files), max_unlabelled), replace=False)) \
                if len(files) > max_unlabelled else range(len(files))
            chosen = [files[i] for i in take]
            if len(chosen) < 3:
                raise ReidExportError(f"{root}: {len(chosen)} images; detection needs at least 3 different crops "
                                      "(better: Market-named PPPP_cC... crops of several people)")
            decoded = [read_image(p) for p in tqdm(chosen, desc="decode", unit="img", disable=not progress,
                                                   leave=False)]
            return _Crops(decoded, None, None, None, None, str(root))
        # a flat labelled folder: every image is a query against all the others (the protocol drops
        # the query itself with the same-identity same-camera images)
        paths = [g.path for g in gallery]
        index = {p: i for i, p in enumerate(paths)}
        q_rows = np.array([index[q.path] for q in queries])
        g_rows = np.arange(len(paths))
        source = str(root)
    decoded = [read_image(p) for p in tqdm(paths, desc="decode", unit="img", disable=not progress, leave=False)]
    return _Crops(decoded, SplitArrays.of(queries), SplitArrays.of(gallery), q_rows, g_rows, source)


def _open(model: Path, height: int, width: int):
    from ..runtime import open_encoder

    placeholder = DataConfig(height=height, width=width)
    return open_encoder(model, data_config=placeholder)


def _input_size(model: Path, input_size: tuple[int, int] | None) -> tuple[int, int]:
    if model.suffix.lower() == ".xml":
        from ..runtime.openvino_backend import read_model, static_shape

        shape = static_shape(read_model(model))
    else:
        from ..export.metadata import input_info, load_onnx

        _, shape, _ = input_info(load_onnx(model))
    fixed = len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:])
    if input_size is not None:
        if fixed and tuple(shape[2:]) != tuple(input_size):
            raise UsageError(f"`input_size` {input_size[0]} {input_size[1]} does not match the model input {shape}; "
                             f"use `input_size` {shape[2]} {shape[3]}")
        return tuple(input_size)
    if not fixed:
        raise UsageError(f"{model}: the model input {shape} has no fixed height/width; pass `input_size` H W")
    return int(shape[2]), int(shape[3])


def _current_config(model: Path) -> DataConfig | None:
    if model.suffix.lower() == ".xml":
        from ..runtime.openvino_backend import read_data_config, read_model

        return read_data_config(read_model(model), model)
    from ..export.metadata import load_onnx, read_data_config

    return read_data_config(load_onnx(model), str(model))


def _as_convention(config: DataConfig) -> Convention | None:
    """The convention a data config states, when it is one detection tries (else None)."""
    for c in conventions(config.interpolation):
        want = c.data_config(config.height, config.width)
        if (want.channel_order, want.normalized_inside) != (config.channel_order, config.normalized_inside):
            continue
        if config.normalized_inside:
            if want.pixel_scale == config.pixel_scale:
                return c
            continue
        scale = config.pixel_scale / want.pixel_scale  # the same input in either pixel scale
        if np.allclose(np.multiply(want.mean, scale), config.mean, rtol=1e-3) and np.allclose(
                np.multiply(want.std, scale), config.std, rtol=1e-3):
            return c
    return None


def detect_convention(model: str | Path, images: str | Path, input_size: tuple[int, int] | None = None,
                      max_queries: int = DEFAULT_MAX_QUERIES, max_unlabelled: int = DEFAULT_MAX_UNLABELLED,
                      batch_size: int = 32, progress: bool = True, resizes: tuple[str, ...] = RESIZES,
                      log: Callable[[str], None] = say) -> DetectReport:
    """Try the conventions on the crops in ``images`` and choose one (see the module text).

    ``resizes``: the interpolations tried for the winning convention (the search itself resizes with
    ``SEARCH_RESIZE``); an empty tuple keeps that one."""
    start = time.time()
    model = Path(model)
    if max_queries < 1:
        raise UsageError(f"`max_queries` must be >= 1, got {max_queries}")
    height, width = _input_size(model, input_size)
    current_config = _current_config(model)
    crops = _load_crops(images, max_queries, max_unlabelled, progress)
    trials = len(conventions()) + len(set(resizes) - {SEARCH_RESIZE}) + (current_config is not None)
    runner = _TrialRunner(_open(model, height, width), crops, height, width, batch_size,
                          tqdm(total=trials, desc="detect", unit="trial", disable=not progress, leave=False))
    report = DetectReport(str(model), crops.source, crops.labelled,
                          len(crops.query.paths) if crops.labelled else len(crops.images),
                          len(crops.gallery.paths) if crops.labelled else 0, (height, width),
                          current_config=current_config)
    try:
        first = [runner.run(c, "convention") for c in conventions()]
        report.trials.extend(first)
        alive = [t for t in first if not t.collapsed]
        if not alive:
            report.refusal = (f"{model}: every convention tried collapses its features (every pair of different "
                              f"crops at cosine >= {first[0].collapse.threshold:g}); it is not a ReID model fed "
                              "any of RGB/BGR, 0..1/0..255, with or without ImageNet mean/std: check the model")
        elif not crops.labelled:
            _choose_unlabelled(report, alive, images)
        else:
            _choose_labelled(report, alive, runner.run, resizes)
        if current_config is not None:
            report.current = _judge_current(report, current_config, runner.run)
    finally:
        runner.close()
    report.seconds = time.time() - start
    return report


class _TrialRunner:
    """Runs one convention on the crops: resized once per interpolation, encoded in batches, scored
    (collapse; with identities, Rank-1/mAP and each query's AP)."""

    def __init__(self, encoder, crops, height: int, width: int, batch_size: int, bar):
        self.encoder, self.crops, self.height, self.width = encoder, crops, height, width
        self.batch_size, self.bar = batch_size, bar
        self.resized: dict[str, list[np.ndarray]] = {}

    def features(self, convention: Convention) -> np.ndarray:
        height, width = self.height, self.width
        if convention.interpolation not in self.resized:
            self.resized[convention.interpolation] = [
                img if img.shape[:2] == (height, width) else resize_rgb(img, height, width, convention.interpolation)
                for img in self.crops.images]
        arrays = self.resized[convention.interpolation]
        config = convention.data_config(height, width)
        out = [self.encoder(_inputs(arrays[i:i + self.batch_size], config))
               for i in range(0, len(arrays), self.batch_size)]
        return np.concatenate(out)

    def run(self, convention: Convention, stage: str) -> Trial:
        crops = self.crops
        feats = self.features(convention)
        self.bar.update(1)
        if not np.isfinite(feats).all():
            return Trial(convention, stage, collapse_stats(np.zeros((max(len(feats), 3), 1))))
        if crops.labelled:
            gal = feats[crops.gallery_rows]
            stats = collapse_stats(gal if len(gal) <= 512 else gal[:512])
        else:
            stats = collapse_stats(feats)
        trial = Trial(convention, stage, stats, features=l2_normalize(feats.astype(np.float64)))
        if crops.labelled:
            distmat = metrics.compute_distance(feats[crops.query_rows], feats[crops.gallery_rows], "cosine")
            trial.metrics = metrics.rank_metrics(distmat, crops.query.pids, crops.gallery.pids,
                                                 crops.query.camids, crops.gallery.camids)
            trial.ap = per_query_ap(distmat, crops.query, crops.gallery) * 100.0
        return trial

    def close(self) -> None:
        self.bar.close()
        self.encoder.close()


def _choose_unlabelled(report: DetectReport, alive: list[Trial], images) -> None:
    """Without identities only collapse is measured: the one convention that does not collapse, else a refusal."""
    if len(alive) == 1:
        report.chosen = alive[0]
        report.notes.append("note: unlabelled crops: chosen as the only convention whose features do not "
                            "collapse; retrieval was not measured")
    else:
        names = " / ".join(t.convention.label for t in alive)
        report.refusal = (f"{images}: the crops carry no identities, so only collapse can be measured and "
                          f"{len(alive)} conventions do not collapse ({names}); give crops named "
                          "PPPP_cC... (Market-1501 layout) or state the convention with annotate's options")


def _choose_labelled(report: DetectReport, alive: list[Trial], run: Callable[[Convention, str], Trial],
                     resizes: tuple[str, ...]) -> None:
    """The convention of the best mAP (the least preprocessing among equals) and its margin over the
    runner-up, then the best of ``resizes`` for it and that margin."""
    ranked = sorted(alive, key=lambda t: -t.mAP)
    best = _choose_among_equals(ranked, report)
    others = [t for t in ranked if t is not best and (t.agreement or 0.0) < SAME_FEATURES]
    if others:
        lo, hi = paired_interval(others[0].ap, best.ap)
        report.convention_margin = Margin(others[0].convention.label, best.mAP - others[0].mAP, (lo, hi))
    resize_trials = [best] + [run(Convention(best.convention.channel_order, best.convention.pixel_scale,
                                             best.convention.imagenet_outside, r), "resize")
                              for r in dict.fromkeys(resizes) if r != best.convention.interpolation]
    report.trials.extend(resize_trials[1:])
    resize_ranked = sorted((t for t in resize_trials if not t.collapsed), key=lambda t: -t.mAP)
    report.chosen = resize_ranked[0]
    if len(resize_ranked) > 1:
        lo, hi = paired_interval(resize_ranked[1].ap, report.chosen.ap)
        report.resize_margin = Margin(resize_ranked[1].convention.interpolation,
                                      report.chosen.mAP - resize_ranked[1].mAP, (lo, hi))
    if report.convention_margin and report.convention_margin.within_noise:
        report.notes.append(f"warning: the runner-up convention ({report.convention_margin.against}) is "
                            "within noise of the chosen one; check on more queries (--max-queries) or ask "
                            "the model's authors")


def _preference(t: Trial) -> tuple:
    """The least preprocessing first: no normalisation outside, then 0..255 pixels."""
    return (t.convention.imagenet_outside, t.convention.pixel_scale != 255.0)


def _choose_among_equals(ranked: list[Trial], report: DetectReport) -> Trial:
    """The best mAP, unless the model cannot tell it from other conventions: when conventions give the
    same features (mean cosine >= SAME_FEATURES crop by crop; a model that normalises its input itself
    barely sees a change of scale or shift), their mAP differs by rounding only, retrieval cannot
    choose, and the one with the least preprocessing is taken (no normalisation outside, 0..255
    pixels: what models that normalise inside, fast-reid's and Open Model Zoo's, take)."""
    best = ranked[0]
    for t in ranked:
        t.agreement = float(np.mean(np.sum(t.features * best.features, axis=1)))
    equals = [t for t in ranked if t is best or t.agreement >= SAME_FEATURES]
    if len(equals) == 1:
        return best
    chosen = min(equals, key=_preference)
    names = " / ".join(t.convention.label for t in equals)
    report.notes.append(f"note: {len(equals)} conventions give the same features (mean cosine >= {SAME_FEATURES:g}: "
                        f"{names}): the model normalises its input itself; chosen by rule, the least preprocessing "
                        "(no normalisation outside, then 0..255)")
    if chosen is not best:
        for t in ranked:
            t.agreement = float(np.mean(np.sum(t.features * chosen.features, axis=1)))
    return chosen


def _judge_current(report: DetectReport, config: DataConfig, run) -> Trial | None:
    """Score the data config the model already carries and say when it is wrong."""
    convention = _as_convention(config)
    if convention is None:
        report.notes.append(f"note: the data config {report.model} carries ({config.channel_order} "
                            f"0..{config.pixel_scale:g}, mean {list(config.mean)}) is not one of the conventions "
                            "tried; it was not scored")
        return None
    trial = next((t for t in report.trials if t.convention == convention), None)
    if trial is None:
        trial = run(convention, "current")
    trial = Trial(trial.convention, "current", trial.collapse, trial.metrics, trial.ap)
    if trial.collapsed:
        report.notes.append(f"warning: the data config {report.model} carries ({convention.label}) collapses its "
                            f"features (every pair of different crops at cosine >= {trial.collapse.min_pair_cosine:.3f}): "
                            "it is wrong (normalised twice, or the wrong pixel scale?)")
    elif report.chosen is not None and report.labelled and not convention.same_pixels(report.chosen.convention):
        lo, hi = paired_interval(trial.ap, report.chosen.ap)
        margin = Margin(convention.label, report.chosen.mAP - trial.mAP, (lo, hi))
        if not margin.within_noise:
            report.notes.append(f"warning: the data config {report.model} carries ({convention.label}) scores mAP "
                                f"{trial.mAP:.2f}, {margin.delta:.2f} below the detected one: it is wrong")
    return trial


def detect_and_annotate(model: str | Path, output: str | Path, images: str | Path,
                        input_size: tuple[int, int] | None = None, max_queries: int = DEFAULT_MAX_QUERIES,
                        model_name: str = "", progress: bool = True,
                        log: Callable[[str], None] = say) -> DetectReport:
    """:func:`detect_convention`, then the chosen data config written into ``output`` as ``annotate``
    writes it (ONNX metadata, or an IR's rt_info). Nothing is written when nothing was chosen
    (``report.passed`` is False and ``report.refusal`` says why)."""
    from ..fileio import check_output_path

    model = Path(model)
    check_output_path(output)
    report = detect_convention(model, images, input_size=input_size, max_queries=max_queries, progress=progress,
                               log=log)
    if report.chosen is None:
        return report
    config = report.data_config(model_name)
    if model.suffix.lower() == ".xml":
        from ..runtime.openvino_convert import annotate_ir

        written = annotate_ir(model, output, config, log=log)
    else:
        from ..export.annotate import annotate_file

        written = annotate_file(model, output, config, log=log)
    report.output, report.written_config = written.output, written.data_config
    return report
