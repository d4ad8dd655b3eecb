"""fast-reid-style configuration: YAML files with ``_BASE_`` inheritance and ``--opts`` overrides.

The defaults below carry every key of fast-reid's (v1.x) ``fastreid/config/defaults.py``, so the
full dump that fast-reid writes next to its checkpoints (``cfg.dump()``) loads as it is. A key that
is not known is an error that suggests the closest known key; a value of the wrong type is an
error that names the key and the type it expects.

reid-export adds a few keys (:data:`OWN_KEYS`). fast-reid's ``get_cfg().merge_from_file`` rejects
any key it does not know, so what we write for fast-reid (:func:`fastreid_dump`: ``config.yaml``
and the config embedded in checkpoints) leaves them out; they travel beside it, in a sidecar file
(``config.reid-export.yaml`` next to ``config.yaml``, read by :func:`load_config`) and in the
checkpoint's own ``reid_export_cfg`` dict.
"""

from __future__ import annotations

import ast
import copy
import difflib
import warnings
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ReidExportError, UsageError

BASE_KEY = "_BASE_"
# The keys reid-export adds to fast-reid's config (fast-reid's merge_from_file rejects them).
OWN_KEYS = ("MODEL.BACKBONE.STEM_POOL_PADDING", "INPUT.INTERPOLATION", "DATASETS.ROOT", "SEED",
            "MODEL.LOSSES.TRI.GLOBAL_MINING", "SOLVER.AMP.CHANNELS_LAST")
# Own keys written beside the config only when they differ from these defaults (added later: files that
# never set them stay as they were).
OWN_KEYS_IF_SET = {"MODEL.LOSSES.TRI.GLOBAL_MINING": False, "SOLVER.AMP.CHANNELS_LAST": None}
SIDECAR_SUFFIX = ".reid-export.yaml"


class CfgNode(dict):
    """A nested dict with attribute access (``cfg.MODEL.BACKBONE.DEPTH``)."""

    def __init__(self, init: dict | None = None):
        super().__init__()
        for key, value in (init or {}).items():
            self[key] = CfgNode(value) if isinstance(value, dict) and not isinstance(value, CfgNode) else value

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def clone(self) -> "CfgNode":
        return copy.deepcopy(self)

    def to_dict(self) -> dict:
        out = {}
        for key, value in self.items():
            if isinstance(value, CfgNode):
                out[key] = value.to_dict()
            elif isinstance(value, tuple):
                out[key] = list(value)
            else:
                out[key] = value
        return out

    def dump(self) -> str:
        """YAML text that :func:`load_config_text` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=True)


def _C() -> CfgNode:  # noqa: N802 - fast-reid's name for the default node
    """fast-reid v1.x defaults, plus the few keys reid-export adds (marked)."""
    mean = [0.485 * 255, 0.456 * 255, 0.406 * 255]
    std = [0.229 * 255, 0.224 * 255, 0.225 * 255]
    return CfgNode({
        "MODEL": {
            "DEVICE": "cuda",
            "META_ARCHITECTURE": "Baseline",
            "FREEZE_LAYERS": [],
            "QUEUE_SIZE": 8192,
            "BACKBONE": {
                "NAME": "build_resnet_backbone",
                "DEPTH": "50x",
                "LAST_STRIDE": 1,
                "FEAT_DIM": 2048,
                "NORM": "BN",
                "WITH_IBN": False,
                "WITH_SE": False,
                "WITH_NL": False,
                "SIE_COE": 3.0,
                "STRIDE_SIZE": (16, 16),
                "DROP_PATH_RATIO": 0.1,
                "DROP_RATIO": 0.0,
                "ATT_DROP_RATE": 0.0,
                "PRETRAIN": False,
                "PRETRAIN_PATH": "",
                # reid-export: padding of the ResNet stem max-pool. None: fast-reid's (0), unless the
                # checkpoint says it was trained with reid-train's padded pool of before 0.2.0 (1).
                "STEM_POOL_PADDING": None,
            },
            "HEADS": {
                "NAME": "EmbeddingHead",
                "NORM": "BN",
                "NUM_CLASSES": 0,
                "EMBEDDING_DIM": 0,
                "WITH_BNNECK": False,
                "NECK_FEAT": "before",
                "POOL_LAYER": "GlobalAvgPool",
                "CLS_LAYER": "Linear",
                "MARGIN": 0.0,
                "SCALE": 1,
            },
            "LOSSES": {
                "NAME": ("CrossEntropyLoss",),
                "CE": {"EPSILON": 0.0, "ALPHA": 0.2, "SCALE": 1.0},
                "FL": {"ALPHA": 0.25, "GAMMA": 2, "SCALE": 1.0},
                # reid-export: GLOBAL_MINING mines over the global batch under torchrun (trainer/distributed.py)
                "TRI": {"MARGIN": 0.3, "NORM_FEAT": False, "HARD_MINING": False, "SCALE": 1.0,
                        "GLOBAL_MINING": False},
                "CIRCLE": {"MARGIN": 0.25, "GAMMA": 128, "SCALE": 1.0},
                "COSFACE": {"MARGIN": 0.25, "GAMMA": 128, "SCALE": 1.0},
            },
            "WEIGHTS": "",
            "PIXEL_MEAN": mean,
            "PIXEL_STD": std,
        },
        "KD": {
            "MODEL_CONFIG": [],
            "MODEL_WEIGHTS": [],
            "EMA": {"ENABLED": False, "MOMENTUM": 0.999},
        },
        "INPUT": {
            "SIZE_TRAIN": [256, 128],
            "SIZE_TEST": [256, 128],
            # reid-export: the resize (data_config.INTERPOLATIONS), in training and at test time. None:
            # decided by the checkpoint (checkpoint.resolve_interpolation): the one a reid-train checkpoint
            # records, fast-reid's evaluation resize (pil-bicubic) for a fast-reid file, OpenCV cubic for
            # a new reid-train run.
            "INTERPOLATION": None,
            "CROP": {"ENABLED": False, "SIZE": [224, 224], "SCALE": [0.16, 1], "RATIO": [3.0 / 4.0, 4.0 / 3.0]},
            "FLIP": {"ENABLED": False, "PROB": 0.5},
            "PADDING": {"ENABLED": False, "MODE": "constant", "SIZE": 10},
            "CJ": {"ENABLED": False, "PROB": 0.5, "BRIGHTNESS": 0.15, "CONTRAST": 0.15,
                   "SATURATION": 0.1, "HUE": 0.1},
            "AFFINE": {"ENABLED": False},
            "AUTOAUG": {"ENABLED": False, "PROB": 0.0},
            "AUGMIX": {"ENABLED": False, "PROB": 0.0},
            "REA": {"ENABLED": False, "PROB": 0.5, "VALUE": list(mean)},
            "RPT": {"ENABLED": False, "PROB": 0.5},
        },
        "DATASETS": {
            "NAMES": ("Market1501",),
            "TESTS": ("Market1501",),
            "COMBINEALL": False,
            # reid-export: folder that holds the datasets (env REID_DATASETS when empty).
            "ROOT": "",
        },
        "DATALOADER": {
            "SAMPLER_TRAIN": "TrainingSampler",
            "NUM_INSTANCE": 4,
            "NUM_WORKERS": 8,
            "SET_WEIGHT": [],
        },
        "SOLVER": {
            # reid-export: CHANNELS_LAST None = on with AMP on CUDA, True/False to force it
            "AMP": {"ENABLED": False, "CHANNELS_LAST": None},
            "OPT": "Adam",
            "MAX_EPOCH": 120,
            "BASE_LR": 3e-4,
            "HEADS_LR_FACTOR": 1.0,
            "MOMENTUM": 0.9,
            "NESTEROV": False,
            "WEIGHT_DECAY": 0.0005,
            "WEIGHT_DECAY_NORM": 0.0005,
            "BIAS_LR_FACTOR": 1.0,
            "WEIGHT_DECAY_BIAS": 0.0005,
            "SCHED": "MultiStepLR",
            "DELAY_EPOCHS": 0,
            "GAMMA": 0.1,
            "STEPS": [30, 55],
            "ETA_MIN_LR": 1e-7,
            "WARMUP_FACTOR": 0.1,
            "WARMUP_ITERS": 1000,
            "WARMUP_METHOD": "linear",
            "FREEZE_ITERS": 0,
            "CHECKPOINT_PERIOD": 20,
            "IMS_PER_BATCH": 64,
            "CLIP_GRADIENTS": {"ENABLED": False, "CLIP_TYPE": "norm", "CLIP_VALUE": 5.0, "NORM_TYPE": 2.0},
        },
        "TEST": {
            "EVAL_PERIOD": 20,
            "IMS_PER_BATCH": 64,
            "METRIC": "cosine",
            "ROC": {"ENABLED": False},
            "FLIP": {"ENABLED": False},
            "AQE": {"ENABLED": False, "ALPHA": 3.0, "QE_TIME": 1, "QE_K": 5},
            "RERANK": {"ENABLED": False, "K1": 20, "K2": 6, "LAMBDA": 0.3},
            "PRECISE_BN": {"ENABLED": False, "DATASET": "Market1501", "NUM_ITER": 300},
        },
        "OUTPUT_DIR": "logs/",
        "CUDNN_BENCHMARK": False,
        # reid-export: random seed for training (< 0: no fixed seed).
        "SEED": -1,
    })


# Keys of older fast-reid releases (v0.x / v1.0 configs and dumps). They are accepted and
# ignored with a warning, since nothing in the newer layout reads them.
LEGACY_KEYS = {
    "MODEL.OPEN_LAYERS", "MODEL.BACKBONE.NORM_SPLIT", "MODEL.HEADS.NORM_SPLIT",
    "MODEL.HEADS.IN_FEAT", "MODEL.HEADS.REDUCTION_DIM", "MODEL.LOSSES.TRI.USE_COSINE_DIST",
    "INPUT.DO_FLIP", "INPUT.FLIP_PROB", "INPUT.DO_PAD", "INPUT.PADDING_MODE", "INPUT.DO_CJ",
    "INPUT.DO_AUTOAUG", "INPUT.DO_AUGMIX", "INPUT.REA.MEAN", "DATALOADER.PK_SAMPLER",
    "DATALOADER.NAIVE_WAY", "SOLVER.MAX_ITER", "SOLVER.DELAY_ITERS", "SOLVER.LOG_PERIOD",
    "SOLVER.SWA", "SOLVER.FP16_ENABLED", "SOLVER.WARMUP_EPOCHS", "SOLVER.FREEZE_FC_ITERS",
    "TEST.PRECISE_BN.NUM_ITER", "MODEL.HEADS.NUM_FEATS",
}

# Old names of values that fast-reid renamed; mapped to the current names on load.
_LEGACY_VALUES = {
    "MODEL.HEADS.POOL_LAYER": {
        "avgpool": "GlobalAvgPool", "maxpool": "GlobalMaxPool", "gempool": "GeneralizedMeanPooling",
        "gempoolP": "GeneralizedMeanPoolingP", "avgmaxpool": "AdaptiveAvgMaxPool",
        "fastavgpool": "GlobalAvgPool", "identity": "Identity", "flatten": "Flatten",
    },
    "MODEL.HEADS.CLS_LAYER": {"linear": "Linear", "circleSoftmax": "CircleSoftmax",
                              "circle": "CircleSoftmax", "arcface": "ArcSoftmax",
                              "arcSoftmax": "ArcSoftmax", "cosSoftmax": "CosSoftmax"},
    "MODEL.HEADS.NAME": {"BNneckHead": "EmbeddingHead"},
}


def get_cfg() -> CfgNode:
    """A fresh copy of the defaults."""
    return _C()


def _all_keys(node: CfgNode, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, CfgNode):
            keys.extend(_all_keys(value, full + "."))
    return keys


def _suggest(defaults: CfgNode, full_key: str) -> str:
    close = difflib.get_close_matches(full_key, _all_keys(defaults), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _coerce(full_key: str, value: Any, default: Any, source: str) -> Any:
    """Convert ``value`` to the type of ``default`` the way yacs does, or fail clearly."""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    if full_key == "MODEL.BACKBONE.DEPTH":
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value}x"  # fast-reid < 1.0 wrote DEPTH: 50
        if not isinstance(value, str):
            raise ReidExportError(f"{source}: MODEL.BACKBONE.DEPTH must look like '50x', got {value!r}")
        return value
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)) and not isinstance(value, bool) and isinstance(value, (int, float)):
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            return value  # fast-reid itself allows e.g. SCALE: 64 vs 1.0; keep the float
        return type(default)(value) if isinstance(default, float) else value
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif isinstance(default, str) and isinstance(value, str):
        mapped = _LEGACY_VALUES.get(full_key, {})
        return mapped.get(value, value)
    expected = type(default).__name__
    raise ReidExportError(
        f"{source}: {full_key} expects a {expected} (default {default!r}), got {value!r}; fix the value"
    )


def _merge(target: CfgNode, data: dict, source: str, prefix: str = "") -> None:
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        if key == BASE_KEY:
            continue
        if key not in target:
            if full_key in LEGACY_KEYS or any(full_key.startswith(k + ".") for k in LEGACY_KEYS):
                warnings.warn(f"{source}: ignoring key {full_key} of an older fast-reid release", stacklevel=3)
                continue
            raise ReidExportError(
                f"{source}: unknown config key {full_key}{_suggest(get_cfg(), full_key)}; "
                "remove it or correct its name"
            )
        default = target[key]
        if isinstance(default, CfgNode):
            if isinstance(value, dict):
                _merge(default, value, source, full_key + ".")
                continue
            if full_key in LEGACY_KEYS:  # e.g. INPUT.PADDING: 10 of old configs
                warnings.warn(f"{source}: ignoring key {full_key} of an older fast-reid release", stacklevel=3)
                continue
            raise ReidExportError(f"{source}: {full_key} is a section, got the value {value!r}")
        target[key] = _coerce(full_key, value, default, source)


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ReidExportError(f"{path}: config file not found; check the path")
    if path.is_dir():
        raise ReidExportError(f"{path}: is a directory, expected a YAML config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ReidExportError(f"{path}: not valid YAML{where}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ReidExportError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    return data


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    path = path.resolve() if path.exists() else path
    if path in seen:
        raise ReidExportError(f"{path}: _BASE_ includes itself (cycle through {', '.join(map(str, seen))})")
    data = _read_yaml(path)
    layers: list[tuple[dict, str]] = []
    bases = data.get(BASE_KEY)
    if bases:
        for base in [bases] if isinstance(bases, str) else list(bases):
            base_path = Path(base).expanduser()
            if not base_path.is_absolute():
                base_path = path.parent / base_path
            if not base_path.exists():
                raise ReidExportError(f"{path}: _BASE_ file {base_path} not found; fix the _BASE_ path")
            layers.extend(_load_with_bases(base_path, seen + (path,)))
    layers.append((data, str(path)))
    return layers


def parse_opts(opts: Iterable[str]) -> list[tuple[str, Any]]:
    """``["MODEL.BACKBONE.DEPTH", "101x", ...]`` -> ``[(key, value), ...]`` (values parsed as YAML)."""
    opts = list(opts)
    if len(opts) % 2:
        raise UsageError(f"`opts` takes KEY VALUE pairs, got an odd count: {' '.join(opts)}")
    pairs = []
    for key, raw in zip(opts[0::2], opts[1::2]):
        if not isinstance(raw, str):  # the Python API may pass values, not command-line text
            pairs.append((str(key), raw))
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        pairs.append((key, value))
    return pairs


def merge_opts(cfg: CfgNode, opts: Iterable[str]) -> CfgNode:
    for key, value in parse_opts(opts):
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), CfgNode):
                raise UsageError(f"`opts`: unknown config key {key}{_suggest(get_cfg(), key)}")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], CfgNode):
            raise UsageError(f"`opts`: unknown config key {key}{_suggest(get_cfg(), key)}")
        try:
            node[parts[-1]] = _coerce(key, value, node[parts[-1]], "`opts`")
        except ReidExportError as exc:
            raise UsageError(str(exc)) from None
    return cfg


def sidecar_path(path: str | Path) -> Path:
    """``logs/x/config.yaml`` -> ``logs/x/config.reid-export.yaml`` (our keys for that config)."""
    path = Path(path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def _own_layer(data: dict, source: str) -> dict:
    """The sidecar's content, checked to hold only :data:`OWN_KEYS`."""
    flat = _flat_keys(data)
    foreign = [k for k in flat if k not in OWN_KEYS]
    if foreign:
        raise ReidExportError(f"{source}: holds {', '.join(foreign)}, which belong in the config file itself; "
                              f"this file takes only {', '.join(OWN_KEYS)}")
    return data


def _flat_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def config_layers(path: str | Path) -> list[tuple[dict, str]]:
    """The YAML mappings that make up a config file, in merge order: its ``_BASE_`` chain, the file,
    then the sidecar with our keys beside it (when there is one)."""
    path = Path(path).expanduser()
    layers = _load_with_bases(path)
    side = sidecar_path(path)
    if path.is_file() and side.is_file():
        layers.append((_own_layer(_read_yaml(side), str(side)), str(side)))
    return layers


def load_config(path: str | Path, opts: Iterable[str] = ()) -> CfgNode:
    """Defaults <- ``_BASE_`` chain <- the file <- its sidecar (``NAME.reid-export.yaml``) <- ``opts``."""
    cfg = get_cfg()
    for data, source in config_layers(path):
        _merge(cfg, data, source)
    return merge_opts(cfg, opts)


def load_config_text(text: str, opts: Iterable[str] = (), source: str = "<embedded config>",
                     own: dict | None = None) -> CfgNode:
    """A config from YAML text (the copy embedded in our checkpoints), then ``own`` (our keys kept
    beside it: the checkpoint's ``reid_export_cfg``), then ``opts``."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        raise ReidExportError(f"{source}: embedded config is not valid YAML; pass `config`") from None
    if not isinstance(data, dict):
        raise ReidExportError(f"{source}: embedded config is not a YAML mapping; pass `config`")
    cfg = get_cfg()
    _merge(cfg, data, source)
    if own:
        _merge(cfg, _own_layer(own, f"{source} (reid_export_cfg)"), f"{source} (reid_export_cfg)")
    return merge_opts(cfg, opts)


def split_own(cfg: CfgNode) -> tuple[dict, dict]:
    """(the config as fast-reid knows it, :data:`OWN_KEYS` as a nested dict), both plain dicts."""
    theirs = cfg.to_dict()
    own: dict = {}
    for key in OWN_KEYS:
        *parents, leaf = key.split(".")
        node, target = theirs, own
        for part in parents:
            node = node.get(part, {})
            target = target.setdefault(part, {})
        if leaf in node:
            value = node.pop(leaf)
            if key not in OWN_KEYS_IF_SET or value != OWN_KEYS_IF_SET[key]:
                target[leaf] = value
    return theirs, _prune(own)


def _prune(d: dict) -> dict:
    """``d`` without the sections left empty."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            value = _prune(value)
            if not value:
                continue
        out[key] = value
    return out


def fastreid_dump(cfg: CfgNode) -> str:
    """YAML that fast-reid's ``get_cfg().merge_from_file`` accepts unchanged: the config without our keys."""
    return yaml.safe_dump(split_own(cfg)[0], sort_keys=True)


def own_dump(cfg: CfgNode) -> str:
    """The sidecar's YAML: only our keys, with a line that says what the file is."""
    header = ("# reid-export's own settings for the config.yaml beside this file (fast-reid's config does not\n"
              "# know these keys, so they are kept here); reid-export merges this file after that one.\n")
    return header + yaml.safe_dump(split_own(cfg)[1], sort_keys=True)


def write_config(path: str | Path, cfg: CfgNode) -> Path:
    """Write ``path`` (fast-reid's keys only: its ``merge_from_file`` takes it unchanged) and its sidecar
    (our keys), together and atomically; :func:`load_config` of ``path`` gives ``cfg`` back."""
    from .fileio import atomic_write_files

    path = Path(path)
    atomic_write_files({path: fastreid_dump(cfg).encode("utf-8"),
                        sidecar_path(path): own_dump(cfg).encode("utf-8")})
    return path
