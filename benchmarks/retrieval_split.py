"""A second, larger retrieval test from a Market-layout training folder, without the crops ``quantize`` used.

The INT8 figures on CUHK03 rest on 200 queries: one query is 0.5 Rank-1 points, and graphs that
are equally close to FP32 scatter by about +-1.5 mAP there (benchmarks/RESULTS-archive.md, issue 15). This script
makes a second test set from ``ROOT/bounding_box_train`` for models that were *not* trained on
it (torchreid's MSMT17 / Market-1501 OSNets on CUHK03, say): it leaves out exactly the
calibration and held-out images ``reid-export quantize --calib-dir ROOT/bounding_box_train``
draws with the same ``--calib-size``/``--val-size``/``--seed`` (the quantizer's own selection
function), and of the rest, for each identity seen by at least two cameras, puts the first
image of each camera that has two or more (of the camera with the most, when none has) in
``query/`` and the others in ``bounding_box_test/`` (symbolic links): every query keeps a gallery
match from another camera.
The Market-1501 protocol of ``reid-export eval`` then ignores same-camera matches.

    python benchmarks/retrieval_split.py ../shared/data/cuhk03-labeled/Market-1501-v15.09.15 -o work/cuhk03-trainsplit
    reid-export eval fp32.onnx int8.onnx --dataset-root work/cuhk03-trainsplit
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="Market-1501-layout root holding bounding_box_train/")
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder to write (query/, bounding_box_test/)")
    parser.add_argument("--calib-size", type=int, default=None, help="as given to quantize (default: its default)")
    parser.add_argument("--val-size", type=int, default=None, help="as given to quantize (default: its default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from reid_export.data.market import parse_name
    from reid_export.export.quantize import DEFAULT_CALIB_SIZE, DEFAULT_VAL_SIZE, select_images
    from reid_export.preprocess import expand_image_paths

    train = args.root / "bounding_box_train"
    calib, val = select_images([train], args.calib_size or DEFAULT_CALIB_SIZE, [], args.val_size or DEFAULT_VAL_SIZE,
                               args.seed, lambda line: None)
    used = {p.resolve() for p in calib + val}
    by_id: dict[int, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path in expand_image_paths([train]):
        parsed = parse_name(path.name)
        if path.resolve() in used or parsed is None or parsed[0] <= 0:  # junk (-1) and distractors (0) left out
            continue
        by_id[parsed[0]][parsed[1]].append(path)
    query_dir, gallery_dir = args.out / "query", args.out / "bounding_box_test"
    for folder in (query_dir, gallery_dir):
        folder.mkdir(parents=True, exist_ok=True)
        if any(not old.is_symlink() for old in folder.iterdir()):
            print(f"{folder}: holds files that are not this script's links; give an empty or new -o folder",
                  file=sys.stderr)
            return 2
        for old in folder.iterdir():
            old.unlink()  # a previous split's links
    queries = gallery = 0
    for pid, cams in sorted(by_id.items()):
        if len(cams) < 2:
            continue
        picked = {c: sorted(ps)[0] for c, ps in cams.items() if len(ps) >= 2}
        if not picked:
            c = max(sorted(cams), key=lambda c: len(cams[c]))
            picked = {c: sorted(cams[c])[0]}
        # every other camera keeps at least one image in the gallery: each query has a cross-camera match
        rest = {c: [p for p in ps if p != picked.get(c)] for c, ps in cams.items()}
        for q in picked.values():
            os.symlink(q.resolve(), query_dir / q.name)
            queries += 1
        for path in sorted(p for ps in rest.values() for p in ps):
            os.symlink(path.resolve(), gallery_dir / path.name)
            gallery += 1
    print(f"{args.out}: {queries} queries, {gallery} gallery images, from {train} without the {len(used)} images "
          f"quantize calibrates and gates on (seed {args.seed})")
    return 0 if queries else 1


if __name__ == "__main__":
    sys.exit(main())
