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
    """The ROC of the first model (the reference; log-scale FPR) above the change of every other model's
    true-positive rate against it, in points: deployment variants usually lie on top of the reference,
    and only the difference shows what they lose. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    others = names[1:]
    fig, axes = plt.subplots(2 if others else 1, 1, figsize=(6.4, 6.4 if others else 4.5), dpi=110, sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 2]} if others else None)
    top = axes[0][0]
    grid = np.logspace(-5, 0, 400)
    ref_fpr, ref_tpr = curves[names[0]]
    ref = _tpr_at(ref_fpr, ref_tpr, grid)
    top.plot(grid, ref * 100.0, color="black", linewidth=1.8, label=f"{names[0]} (reference)")
    top.set_ylim(0, 100)
    top.set_ylabel("true positive rate (%)")
    top.set_title(title, fontsize=10)
    top.grid(True, which="both", alpha=0.3)
    top.legend(loc="lower right", fontsize=7)
    if others:
        bottom = axes[1][0]
        for name in others:
            fpr, tpr = curves[name]
            bottom.plot(grid, (_tpr_at(fpr, tpr, grid) - ref) * 100.0, label=name, linewidth=1.4)
        bottom.axhline(0.0, color="black", linewidth=0.8)
        bottom.set_ylabel("TPR - reference (points)")
        bottom.grid(True, which="both", alpha=0.3)
        bottom.legend(loc="best", fontsize=7)
    low = axes[-1][0]
    low.set_xscale("log")
    low.set_xlim(1e-5, 1.0)
    low.set_xlabel("false positive rate (query-gallery pairs of different people)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The true-positive rate at each false-positive rate of ``grid`` (step interpolation: the best
    threshold whose FPR does not exceed the grid value)."""
    fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
    order = np.argsort(fpr, kind="stable")
    fpr, tpr = fpr[order], np.maximum.accumulate(tpr[order])
    idx = np.searchsorted(fpr, grid, side="right") - 1
    return np.where(idx >= 0, tpr[np.clip(idx, 0, None)], 0.0)


def _tile(image_path: str, border: tuple[int, int, int], captions: Sequence[str], size=(128, 64),
          pad: int = 4) -> np.ndarray:
    h, w = size
    img = cv2.resize(read_image(image_path), (w, h), interpolation=cv2.INTER_AREA)
    tile = np.full((h + 2 * pad + 14 * len(captions) + 2, w + 2 * pad, 3), 255, np.uint8)
    tile[: h + 2 * pad, :] = border
    tile[pad:pad + h, pad:pad + w] = img
    for i, caption in enumerate(captions):
        cv2.putText(tile, caption, (2, h + 2 * pad + 12 + 14 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return tile


LEGEND = ("left: the query (grey), its number, identity and AP;  then its top-{k} gallery crops by distance, "
          "green = same person, red = another;  under each: the distance")


def rank_list_image(rows: Sequence[dict], topk: int = 10, legend: str | None = LEGEND) -> np.ndarray:
    """Rows of (query, top-k gallery): each row a dict with ``query`` path, ``query_label`` (one line, or
    a list of lines), ``gallery`` paths, ``matches`` booleans and ``distances`` floats. Returns an RGB
    image, with a line above that says what the borders and numbers mean (``legend``, ``{k}``: top-k)."""
    lines = []
    for row in rows:
        label = row.get("query_label", "query")
        tiles = [_tile(row["query"], GREY, [label] if isinstance(label, str) else list(label))]
        gallery = [_tile(path, GREEN if match else RED, [f"{dist:.3f}"])
                   for path, match, dist in list(zip(row["gallery"], row["matches"], row["distances"]))[:topk]]
        height = max(t.shape[0] for t in tiles + gallery)
        tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255)
                 for t in tiles + [np.full((height, 8, 3), 255, np.uint8)] + gallery]
        lines.append(np.concatenate(tiles, axis=1))
    width = max(l.shape[1] for l in lines)
    lines = [np.pad(l, ((0, 4), (0, width - l.shape[1]), (0, 0)), constant_values=255) for l in lines]
    if legend:
        text = legend.format(k=topk)
        scale = min(0.4, 0.4 * width / max(cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0] + 8, 1))
        strip = np.full((18, width, 3), 255, np.uint8)
        cv2.putText(strip, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        lines.insert(0, strip)
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
        label = [f"q{qi} id{query.pids[qi]}"] + ([f"AP {ap[qi] * 100:.0f}%"] if ap is not None and np.isfinite(ap[qi])
                                                 else [])
        rows.append({
            "query": query.paths[qi],
            "query_label": label,
            "gallery": [gallery.paths[g] for g in order],
            "matches": [bool(gallery.pids[g] == query.pids[qi]) for g in order],
            "distances": [float(distmat[qi, g]) for g in order],
        })
    return rows
