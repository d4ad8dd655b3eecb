"""Collapsed embeddings, as every command that runs a model checks them: ``extract``, ``parity``,
``eval`` and the hand-offs (``deepstream``, ``boxmot``).

The detector is :func:`reid_export.embeddings.collapse_stats` (collapsed: even the least similar
pair of different images scores cosine >= 0.99). This module only bounds its cost on large
image sets and runs it on an encoder, so every caller gets the same verdict and the same line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..embeddings import CollapseStats, collapse_stats

# Pairwise cosines of this many rows at most (half a million pairs, milliseconds). Beyond it an
# evenly spaced sample is checked: galleries are sorted by identity, so the sample spans them all.
MAX_COLLAPSE_IMAGES = 1000


def collapse_of(features: np.ndarray, max_images: int = MAX_COLLAPSE_IMAGES) -> CollapseStats | None:
    """:func:`collapse_stats` of ``features`` (one row per different image), on at most
    ``max_images`` evenly spaced rows; None below 3 images."""
    features = np.asarray(features)
    if len(features) > max_images:
        features = features[np.linspace(0, len(features) - 1, max_images).round().astype(int)]
    return collapse_stats(features)


def check_collapse(model, images: Sequence, *, batch_size: int = 16, progress: bool = False,
                   config=None, device: str = "cpu") -> CollapseStats | None:
    """Encode ``images`` (paths or decoded arrays of *different* crops, >= 3) with ``model`` (an
    open :class:`~reid_export.runtime.encoder.Encoder`, or a model path opened with its own data
    config) and return their :class:`CollapseStats` (``.collapsed``, ``.warning(name)``).

    For the hand-offs: call it on a few real crops before writing a tracker's config; a collapsed
    model runs, and a tracker fed by it cannot tell anyone apart."""
    from ..runtime import open_encoder

    if isinstance(model, (str, Path)):
        with open_encoder(model, config=config, device=device) as enc:
            feats = enc.encode_files(list(images), batch_size=batch_size, progress=progress, desc="collapse check")
    else:
        feats = model.encode_files(list(images), batch_size=batch_size, progress=progress, desc="collapse check")
    return collapse_of(feats)
