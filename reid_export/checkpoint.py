"""Read and write checkpoints fast-reid's ``Checkpointer`` loads, safely.

Files are read with ``torch.load(weights_only=True)``: a checkpoint that tries to run code is
refused. A checkpoint is a dict with ``model`` (a state dict with fast-reid's key names) plus, in
ours, ``cfg`` (the YAML text of the config, fast-reid's keys only, so that fast-reid's
``merge_from_file`` takes it unchanged), ``reid_export_cfg`` (our keys: the stem padding, the resize
interpolation, the dataset root, the seed) and ``data_config``, so that a checkpoint alone rebuilds
its model. Checkpoints written before ``reid_export_cfg`` existed carry our keys inside ``cfg``;
they load as before. The training state (``optimizer``, ``scheduler``, ``epoch``, ...) is
reid-train's own: fast-reid's ``Checkpointer`` loads the weights but cannot resume it.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from . import __version__
from .config import CfgNode, fastreid_dump, load_config, load_config_text, split_own
from .data_config import DataConfig, data_config_from_cfg
from .errors import ReidExportError, ReidExportNote
from .fileio import atomic_write_bytes, check_input_file

CLASSIFIER_KEY = "heads.weight"
_LEGACY_RENAMES = (
    (re.compile(r"^heads\.bnneck\."), "heads.bottleneck.0."),
    (re.compile(r"^heads\.classifier\.weight$"), "heads.weight"),
)
_STRAY_KEYS = ("pixel_mean", "pixel_std")


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint object, loaded without executing any pickled code."""
    path = check_input_file(path, "checkpoint")
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles would be lines beside ours
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text or "Unsupported class" in text:
            raise ReidExportError(
                f"{path}: refused to load: the file contains pickled code or objects other than tensors "
                "(loading is weights_only); re-save it as a plain state dict: "
                "torch.save({'model': model.state_dict()}, 'clean.pth')"
            ) from None
        raise ReidExportError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, UnicodeDecodeError,
            AttributeError, IndexError, KeyError, TypeError, MemoryError, OverflowError) as exc:
        del exc
        raise ReidExportError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated)") from None
    if not isinstance(obj, dict):
        raise ReidExportError(f"{path}: expected a dict (a state dict or {{'model': state_dict, ...}}), "
                              f"got {type(obj).__name__}")
    return obj


def extract_state_dict(obj: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint object, keys normalised to the current fast-reid names."""
    if isinstance(obj.get("model"), dict):
        state = obj["model"]
    elif isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    else:
        state = obj
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ReidExportError(f"{source}: holds no weights (no 'model' state dict with tensors)")
    state = normalize_keys(tensors)
    # reid-export: a torchreid OSNet file (no backbone./heads. prefixes) gets our names, classifier dropped
    from .modeling.osnet import is_torchreid_layout, torchreid_to_reid_export
    return torchreid_to_reid_export(state) if is_torchreid_layout(state) else state


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        for pattern, repl in _LEGACY_RENAMES:
            key = pattern.sub(repl, key)
        if key in _STRAY_KEYS:
            continue  # older fast-reid registered mean/std as persistent buffers
        out[key] = value
    return out


def _hints(missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    keys = missing + unexpected + mismatched
    hints = []
    if any(".NL_" in k or k.startswith("backbone.NL_") for k in keys):
        hints.append("MODEL.BACKBONE.WITH_NL")
    if any(".IN." in k or ".BN." in k for k in keys):
        hints.append("MODEL.BACKBONE.WITH_IBN")
    if any(re.search(r"layer\d\.\d+\.(conv3|bn3)", k) for k in keys) or any(
            re.match(r"backbone\.layer\d\.\d+\.", k) for k in missing + unexpected):
        hints.append("MODEL.BACKBONE.DEPTH")
    if any("pool_layer" in k for k in keys):
        hints.append("MODEL.HEADS.POOL_LAYER")
    if any(k.startswith("heads.bottleneck") for k in keys):
        hints.append("MODEL.HEADS.EMBEDDING_DIM / MODEL.HEADS.WITH_BNNECK")
    if any(k.startswith("backbone.layer4.0.downsample") for k in keys):
        hints.append("MODEL.BACKBONE.LAST_STRIDE")
    return list(dict.fromkeys(hints))


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                 allow_partial: bool = False, advice: str = "") -> dict:
    """Load ``state`` into ``model`` strictly, except for the classifier (unused at inference).

    Returns a small report: which keys were skipped. Any other missing/unexpected key or shape
    mismatch raises one error that lists them and names the config option that probably differs,
    or ``advice`` when the caller knows better what to do.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and k != CLASSIFIER_KEY]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and k != CLASSIFIER_KEY and state[k].shape != own[k].shape]
    if (missing or unexpected or mismatched) and not allow_partial:
        parts = []
        if missing:
            parts.append(f"missing: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected: {_short(unexpected)}")
        if mismatched:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
            parts.append(f"shape mismatch (checkpoint vs config): {_short(shapes, 3)}")
        hints = _hints(missing, unexpected, mismatched)
        hint = f"; the config probably differs in {', '.join(hints)}" if hints else ""
        from .modeling.osnet import osnet_hint  # reid-export: name the OSNet config the key shapes fit
        probable = osnet_hint(state)
        hint = f"; {probable}" if probable else hint
        if advice:
            raise ReidExportError(f"{source}: checkpoint does not match the config ({'; '.join(parts)}); {advice}")
        raise ReidExportError(
            f"{source}: checkpoint does not match the config ({'; '.join(parts)}){hint}; "
            "pass the config it was trained with (or `allow_partial` to load what matches)"
        )
    to_load = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    classifier_skipped = CLASSIFIER_KEY not in to_load
    model.load_state_dict(to_load, strict=False)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched,
            "classifier_skipped": classifier_skipped}


def save_checkpoint(path: str | Path, model: torch.nn.Module, cfg: CfgNode, data_config: DataConfig,
                    **extra) -> Path:
    """A checkpoint with our embedded config, written atomically.

    ``cfg`` holds fast-reid's keys only; ``reid_export_cfg`` ours, among them the stem the model was
    built with (``STEM_POOL_PADDING``) and the resize of ``data_config`` (``INTERPOLATION``), so that
    the file loads with the stem and resize its weights were trained with whatever the defaults become.
    """
    padding = getattr(getattr(model, "backbone", None), "stem_pool_padding", None)
    if padding is not None and cfg.MODEL.BACKBONE.get("STEM_POOL_PADDING") != padding:
        cfg = cfg.clone()
        cfg.MODEL.BACKBONE.STEM_POOL_PADDING = int(padding)
    if not cfg.INPUT.get("INTERPOLATION"):  # the resize the data config says, recorded in the config too
        cfg = cfg.clone()
        cfg.INPUT.INTERPOLATION = data_config.interpolation
    obj = {
        "model": model.state_dict(),
        "cfg": fastreid_dump(cfg),
        "reid_export_cfg": split_own(cfg)[1],
        "data_config": data_config.to_dict(),
        "reid_export_version": __version__,
    }
    obj.update(extra)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def is_reid_train_checkpoint(obj: dict) -> bool:
    """Written by :func:`save_checkpoint` (reid-train, the demo), not by fast-reid."""
    return "reid_export_version" in obj and isinstance(obj.get("cfg"), str)


def embedded_config(obj: dict, opts=(), source: str = "checkpoint") -> CfgNode:
    """The config a checkpoint carries: ``cfg`` (YAML text), then our keys in ``reid_export_cfg``, then ``opts``."""
    own = obj.get("reid_export_cfg")
    return load_config_text(obj["cfg"], opts, source=f"{source} (embedded config)",
                            own=own if isinstance(own, dict) else None)


def resolve_stem(cfg: CfgNode, obj: dict, source: str = "checkpoint") -> int:
    """Set ``cfg.MODEL.BACKBONE.STEM_POOL_PADDING`` to the stem the checkpoint's weights were trained with.

    An explicit value (config file or ``--opts``) is kept. Otherwise a fast-reid file gets fast-reid's
    stem (no padding); a reid-train checkpoint gets the one its embedded config records, and one
    written before 0.2.0, whose config has no such key, was trained with the padded pool (padding=1)
    and is loaded as it was trained, with a note: its features do not change.
    """
    bb = cfg.MODEL.BACKBONE
    if bb.get("STEM_POOL_PADDING") is not None or bb.NAME != "build_resnet_backbone":
        return bb.get("STEM_POOL_PADDING") or 0
    padding = 0
    if is_reid_train_checkpoint(obj):
        stored = embedded_config(obj, source=source).MODEL.BACKBONE
        padding = stored.get("STEM_POOL_PADDING")
        if padding is None and (isinstance(obj.get("reid_export_cfg"), dict) or "STEM_POOL_PADDING:" in obj["cfg"]):
            padding = 0  # written by 0.2.0 or later with the key unset: fast-reid's stem
        elif padding is None:
            padding = 1
            version = obj.get("reid_export_version", "?")
            warnings.warn(
                f"{source}: written by reid-train {version}, trained with a padded stem max-pool (padding=1, "
                "not fast-reid's); loaded as trained, features unchanged. fast-reid's code would compute "
                "other features from it: retrain with reid-export >= 0.2.0 for a fast-reid-identical model",
                ReidExportNote, stacklevel=2)
    bb.STEM_POOL_PADDING = int(padding)
    return bb.STEM_POOL_PADDING


def resolve_interpolation(cfg: CfgNode, obj: dict, source: str = "checkpoint") -> str:
    """Set ``cfg.INPUT.INTERPOLATION`` to the resize the checkpoint's weights go with, when the config leaves it unset.

    An explicit value (config file, its sidecar, ``--opts``) is kept. Otherwise a reid-train checkpoint
    gets the one it records (every one written so far records it), a fast-reid file (weights without
    our config) Pillow bicubic, the resize fast-reid trained and evaluates it with, and a new run (no
    checkpoint) reid-train's OpenCV cubic.
    """
    from .data_config import FASTREID_INTERPOLATION, TRAIN_INTERPOLATION

    if cfg.INPUT.get("INTERPOLATION"):
        return cfg.INPUT.INTERPOLATION
    if is_reid_train_checkpoint(obj):
        stored = embedded_config(obj, source=source).INPUT.get("INTERPOLATION")
        data_config = obj.get("data_config")
        recorded = data_config.get("interpolation") if isinstance(data_config, dict) else None
        value = stored or recorded or TRAIN_INTERPOLATION
    elif obj:
        value = FASTREID_INTERPOLATION
    else:
        value = TRAIN_INTERPOLATION
    cfg.INPUT.INTERPOLATION = value
    return value


def _checkpoint_config(obj: dict, path: Path, config, opts=(), state: dict | None = None) -> CfgNode:
    """The config a checkpoint is built with: ``config`` when given, else the one it carries, then ``opts``."""
    from .modeling.osnet import osnet_hint

    if config is not None:
        return load_config(config, opts)
    if isinstance(obj.get("cfg"), str):
        return embedded_config(obj, opts, str(path))
    probable = osnet_hint(state if state is not None else extract_state_dict(obj, str(path)))
    # a torchreid OSNet file: name the configs/torchreid/*.yml its shapes fit
    raise ReidExportError(f"{path}: this checkpoint holds no config; " + (
        probable if probable else "pass `config` CFG.yml (the fast-reid config it was trained with)"))


def load_model_from_checkpoint(path: str | Path, config: str | Path | None = None, opts=(),
                               allow_partial: bool = False):
    """(model in eval mode, cfg, data config) from a checkpoint plus its config.

    The config comes from ``config`` when given, else from the checkpoint itself (ours embed it).
    """
    from .modeling import build_model

    path = Path(path)
    obj = read_checkpoint(path)
    state = extract_state_dict(obj, str(path))
    carries = isinstance(obj.get("cfg"), str)
    cfg = _checkpoint_config(obj, path, config, opts, state)
    resolve_stem(cfg, obj, str(path))
    resolve_interpolation(cfg, obj, str(path))
    model = build_model(cfg)
    # A checkpoint that carries its own config and does not fit the one given: the given one is the mistake.
    advice = (f"this checkpoint carries the config it was trained with: drop `config` {config}"
              if config is not None and carries else "")
    load_weights(model, state, str(path), allow_partial=allow_partial, advice=advice)
    model.eval()
    name = Path(config).stem if config is not None else path.stem
    data_config = data_config_from_cfg(cfg, feat_dim=model.feat_dim, model_name=name)
    if config is None and not list(opts) and isinstance(obj.get("data_config"), dict):
        stored = DataConfig.from_dict(obj["data_config"], f"{path} (embedded data config)")
        if stored.input_size != data_config.input_size:
            raise ReidExportError(f"{path}: embedded data config size {stored.input_size} disagrees with its "
                                  f"config INPUT.SIZE_TEST {data_config.input_size}; re-save the checkpoint")
        data_config = stored
    return model, cfg, data_config


def trained_preprocessing(path: str | Path, config: str | Path | None = None) -> tuple[DataConfig, tuple, tuple]:
    """How the checkpoint's model was trained to see pixels, before any ``--opts``: (its data config,
    the model's own pixel mean, pixel std). The export self-check feeds the model this way to get
    the features an exported model with its data config must reproduce."""
    path = Path(path)
    obj = read_checkpoint(path)
    cfg = _checkpoint_config(obj, path, config)
    resolve_interpolation(cfg, obj, str(path))
    data_config = data_config_from_cfg(cfg)
    if config is None and isinstance(obj.get("data_config"), dict):
        data_config = DataConfig.from_dict(obj["data_config"], f"{path} (embedded data config)")
    return data_config, tuple(cfg.MODEL.PIXEL_MEAN), tuple(cfg.MODEL.PIXEL_STD)
