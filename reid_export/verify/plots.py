"""Pictures for people: ROC curves and rank lists (query + top-k with true/false borders)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..fileio import atomic_write_bytes
from ..preprocess import read_image

GREEN = (40, 170, 40)   # RGB
RED = (210, 40, 40)
GREY = (150, 150, 150)


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC") -> Path:
    """One ROC curve per model (log-scale FPR), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for name, (fpr, tpr) in curves.items():
        mask = fpr > 0
        ax.plot(fpr[mask], tpr[mask] * 100.0, label=name, linewidth=1.6)
    ax.set_xscale("log")
    ax.set_xlim(1e-5, 1.0)
    ax.set_ylim(0, 100)
    ax.set_xlabel("false positive rate (query-gallery pairs)")
    ax.set_ylabel("true positive rate (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _tile(image_path: str, border: tuple[int, int, int], caption: str, size=(128, 64), pad: int = 4) -> np.ndarray:
    h, w = size
    img = cv2.resize(read_image(image_path), (w, h), interpolation=cv2.INTER_AREA)
    tile = np.full((h + 2 * pad + 16, w + 2 * pad, 3), 255, np.uint8)
    tile[: h + 2 * pad, :] = border
    tile[pad:pad + h, pad:pad + w] = img
    cv2.putText(tile, caption, (2, h + 2 * pad + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def rank_list_image(rows: Sequence[dict], topk: int = 10) -> np.ndarray:
    """Rows of (query, top-k gallery): each row a dict with ``query`` path, ``query_label``,
    ``gallery`` paths, ``matches`` booleans and ``distances`` floats. Returns an RGB image."""
    lines = []
    for row in rows:
        tiles = [_tile(row["query"], GREY, row.get("query_label", "query"))]
        tiles.append(np.full_like(tiles[0][:, :8], 255))
        for path, match, dist in list(zip(row["gallery"], row["matches"], row["distances"]))[:topk]:
            tiles.append(_tile(path, GREEN if match else RED, f"{dist:.3f}"))
        line = np.concatenate(tiles, axis=1)
        lines.append(line)
    width = max(l.shape[1] for l in lines)
    lines = [np.pad(l, ((0, 4), (0, width - l.shape[1]), (0, 0)), constant_values=255) for l in lines]
    return np.concatenate(lines, axis=0)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return atomic_write_bytes(path, data.tobytes())


def rank_list_rows(distmat: np.ndarray, query, gallery, indices: Sequence[int], topk: int = 10,
                   ap: np.ndarray | None = None) -> list[dict]:
    """Rank-list rows for the given query indices (same-camera same-id gallery items removed)."""
    rows = []
    for qi in indices:
        keep = ~((gallery.pids == query.pids[qi]) & (gallery.camids == query.camids[qi]))
        order = np.argsort(distmat[qi], kind="stable")
        order = order[keep[order]][:topk]
        label = f"q{qi} id{query.pids[qi]}" + (f" AP{ap[qi] * 100:.0f}" if ap is not None and np.isfinite(ap[qi]) else "")
        rows.append({
            "query": query.paths[qi],
            "query_label": label,
            "gallery": [gallery.paths[g] for g in order],
            "matches": [bool(gallery.pids[g] == query.pids[qi]) for g in order],
            "distances": [float(distmat[qi, g]) for g in order],
        })
    return rows
