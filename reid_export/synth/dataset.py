"""Planning and writing a synthetic dataset in the Market-1501 layout.

The plan (which person, camera, split, file name) is drawn from its own random stream; each
image then has a stream keyed by what it shows (its kind, person, camera and index), so an
image's bytes do not depend on the order of rendering.  The whole dataset is written into a
hidden temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from .. import __version__
from ..data.market import MARKET_DIR, SPLITS
from ..errors import ReidExportError, UsageError
from .attributes import sample_cameras, sample_identities, sample_identity
from .render import SUPERSAMPLE, render_image

GENERATOR_VERSION = 1
META_FILE = "synth.json"
MAX_CAMERAS = 9          # one digit in ``cC``
MAX_IDENTITIES = 9999    # four digits in ``PPPP``

# Random streams: [seed, stream, ...]
_PLAN, _PEOPLE, _CAMERAS, _IMAGE, _EXTRA = 1, 2, 3, 4, 5
_KIND_CODE = {"person": 0, "distractor": 1, "junk": 2}


@dataclass(frozen=True)
class SynthConfig:
    identities: int = 100
    cameras: int = 4
    seed: int = 0
    images_per_id_per_camera: int = 3
    size: tuple = (128, 64)
    distractors: int = 30
    junk: int = 10
    jpeg_quality: int = 90

    def validate(self) -> "SynthConfig":
        if not 2 <= self.identities <= MAX_IDENTITIES:
            raise UsageError(f"`identities` must be 2..{MAX_IDENTITIES} (half train, half test); "
                             f"got {self.identities}")
        if not 2 <= self.cameras <= MAX_CAMERAS:
            raise UsageError(f"`cameras` must be 2..{MAX_CAMERAS} (every query needs a match from "
                             f"another camera); got {self.cameras}")
        if self.seed < 0:
            raise UsageError(f"`seed` must be >= 0; got {self.seed}")
        if self.images_per_id_per_camera < 1:
            raise UsageError(f"`images_per_id_per_camera` must be >= 1; got {self.images_per_id_per_camera}")
        h, w = self.size
        if not (32 <= h <= 1024 and 16 <= w <= 512):
            raise UsageError(f"`size` H W must be within 32..1024 x 16..512; got {h} {w}")
        if self.distractors < 0 or self.junk < 0:
            raise UsageError("`distractors` and `junk` must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"JPEG quality must be 1..100; got {self.jpeg_quality}")
        return self


@dataclass(frozen=True)
class ImageJob:
    folder: str         # bounding_box_train | query | bounding_box_test
    name: str           # Market-style file name
    kind: str           # person | distractor | junk
    pid: int            # Market pid (1.., 0 distractor, -1 junk)
    camera: int         # 0-based
    key: tuple          # random-stream key of the image
    look: str = "person"   # what render_image draws: person | background | fragment | tiny


@dataclass
class Plan:
    config: SynthConfig
    people: list        # Identity per pid-1
    cameras: list
    train_pids: list
    test_pids: list
    cams_of: dict       # pid -> sorted 0-based cameras
    jobs: list = field(default_factory=list)


def _rng(config: SynthConfig, *key) -> np.random.Generator:
    return np.random.default_rng([config.seed, *key])


def make_plan(config: SynthConfig) -> Plan:
    """Who appears where, under which name: everything but the pixels."""
    config.validate()
    n, C, K = config.identities, config.cameras, config.images_per_id_per_camera
    rng = _rng(config, _PLAN)
    people = sample_identities(_rng(config, _PEOPLE), n)
    cameras = sample_cameras(_rng(config, _CAMERAS), C)
    pids = np.arange(1, n + 1)
    train = sorted(int(p) for p in rng.choice(pids, n // 2, replace=False))
    test = sorted(set(int(p) for p in pids) - set(train))
    cams_of = {}
    for pid in pids:
        k = int(rng.integers(2, C + 1))
        cams_of[int(pid)] = sorted(int(c) for c in rng.choice(C, k, replace=False))

    # Events per camera: a track of K images per (person, camera), single distractor/junk boxes.
    events: list[list] = [[] for _ in range(C)]
    test_set = set(test)
    for pid in pids:
        pid = int(pid)
        cams = cams_of[pid]
        query_idx = {}
        if pid in test_set:
            if K > 1:
                query_idx = {c: int(rng.integers(K)) for c in cams}
            else:  # one image per camera: one camera keeps its image for the gallery
                keep = cams[int(rng.integers(len(cams)))]
                query_idx = {c: 0 for c in cams if c != keep}
        for c in cams:
            events[c].append(("track", pid, c, query_idx.get(c)))
    for i in range(config.distractors):
        c = int(rng.integers(C))
        look = "background" if rng.random() < 0.4 else "person"
        events[c].append(("distractor", i, c, look))
    for i in range(config.junk):
        c = int(rng.integers(C))
        look = "fragment" if rng.random() < 0.5 else "tiny"
        events[c].append(("junk", i, c, look))

    plan = Plan(config, people, cameras, train, test, cams_of)
    for c in range(C):
        order = rng.permutation(len(events[c]))
        frame = int(rng.integers(1, 400))
        for j in order:
            ev = events[c][int(j)]
            if ev[0] == "track":
                _, pid, _, q = ev
                folder_default = SPLITS["train"] if pid not in test_set else SPLITS["gallery"]
                for k in range(K):
                    folder = SPLITS["query"] if (q is not None and k == q) else folder_default
                    name = f"{pid:04d}_c{c + 1}s1_{frame:06d}_{int(rng.integers(1, 4)):02d}.jpg"
                    plan.jobs.append(ImageJob(folder, name, "person", pid, c, (_KIND_CODE["person"], pid, c, k)))
                    frame += int(rng.integers(3, 13))
            else:
                kind, i, _, look = ev
                pid = 0 if kind == "distractor" else -1
                name = f"{'0000' if pid == 0 else '-1'}_c{c + 1}s1_{frame:06d}_{int(rng.integers(1, 7)):02d}.jpg"
                plan.jobs.append(ImageJob(SPLITS["gallery"], name, kind, pid, c, (_KIND_CODE[kind], i, c, 0), look))
            frame += int(rng.integers(10, 60))
    if any(job_frame > 999_999 for job_frame in (int(j.name.split("_")[2]) for j in plan.jobs)):
        raise UsageError("too many images for six-digit frame numbers; use fewer identities or cameras")
    return plan


def render_job(plan: Plan, job: ImageJob) -> np.ndarray:
    """The pixels of one planned image (BGR uint8)."""
    cfg = plan.config
    rng = _rng(cfg, _IMAGE, *job.key)
    cam = plan.cameras[job.camera]
    if job.kind == "person":
        person = plan.people[job.pid - 1]
    else:  # someone outside the dataset
        person = sample_identity(_rng(cfg, _EXTRA, *job.key))
    img, _ = render_image(rng, cam, tuple(cfg.size), person, job.look)
    return img


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 BGR image
        raise ReidExportError("OpenCV could not encode a JPEG image")
    return buf.tobytes()


def summary(plan: Plan) -> dict:
    """Parameters, counts, cameras and identities: the content of ``synth.json``."""
    cfg = plan.config
    split_of = {pid: "train" for pid in plan.train_pids} | {pid: "test" for pid in plan.test_pids}
    counts: dict = {}
    for split, folder in (("train", SPLITS["train"]), ("query", SPLITS["query"]), ("gallery", SPLITS["gallery"])):
        jobs = [j for j in plan.jobs if j.folder == folder]
        counts[split] = {"images": len(jobs),
                         "identities": len({j.pid for j in jobs if j.pid > 0})}
    gallery = [j for j in plan.jobs if j.folder == SPLITS["gallery"]]
    counts["gallery"]["distractors"] = sum(j.pid == 0 for j in gallery)
    counts["gallery"]["junk"] = sum(j.pid == -1 for j in gallery)
    counts["total_images"] = len(plan.jobs)
    params = asdict(cfg)
    params["size"] = list(cfg.size)
    return {
        "generator": "reid-export synth",
        "generator_version": GENERATOR_VERSION,
        "tool": f"reid-export {__version__}",
        "versions": {"numpy": np.__version__, "opencv": cv2.__version__},
        "parameters": params | {"supersample": SUPERSAMPLE},
        "layout": f"{MARKET_DIR}/{{{SPLITS['train']},{SPLITS['query']},{SPLITS['gallery']}}}",
        "counts": counts,
        "cameras": [c.to_dict() | {"name": f"c{c.index + 1}"} for c in plan.cameras],
        "identities": [
            {"pid": pid, "split": split_of[pid], "cameras": [c + 1 for c in plan.cams_of[pid]]}
            | plan.people[pid - 1].to_dict()
            for pid in range(1, cfg.identities + 1)
        ],
    }


# ------------------------------------------------------------------ writing

def _fail_os(path: Path, exc: OSError):
    if exc.errno == errno.ENOSPC:
        return ReidExportError(f"{path}: no space left on the device; free space or choose another DIR")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ReidExportError(f"{path}: permission denied; choose another DIR")
    return ReidExportError(f"{path}: could not be written ({exc.strerror or exc})")


def check_target(out: Path, force: bool) -> None:
    """Fail early, with the fix, when ``out`` cannot receive a dataset."""
    if out.exists() and not out.is_dir():
        raise ReidExportError(f"{out}: exists and is not a folder; choose another DIR")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ReidExportError(f"{out}: folder is not empty; choose another DIR or pass `force` to replace "
                              f"{MARKET_DIR}/ and {META_FILE} in it")


def write_dataset(out_dir, config: SynthConfig, force: bool = False, progress: bool = True) -> dict:
    """Generate the dataset into ``out_dir`` and return the ``synth.json`` content.

    ``out_dir`` must not exist or be empty; with ``force`` an existing ``Market-1501-v15.09.15/``
    and ``synth.json`` in it are replaced (other files are left alone).  Nothing appears under
    ``out_dir`` until every image is written.
    """
    out = Path(out_dir).expanduser()
    check_target(out, force)
    plan = make_plan(config)
    meta = summary(plan)
    fresh = not out.exists()
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.synth-", dir=parent if fresh else out))
    except OSError as exc:
        raise _fail_os(out, exc) from None
    try:
        root = tmp / MARKET_DIR
        for folder in (SPLITS["train"], SPLITS["query"], SPLITS["gallery"]):
            (root / folder).mkdir(parents=True)
        bar = tqdm(total=len(plan.jobs), desc="synth", unit="img", disable=not progress, leave=False)
        for job in plan.jobs:
            data = encode_jpeg(render_job(plan, job), config.jpeg_quality)
            with open(root / job.folder / job.name, "wb") as fh:
                fh.write(data)
            bar.update(1)
        bar.close()
        with open(tmp / META_FILE, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(meta, indent=2) + "\n")
        if fresh:
            os.chmod(tmp, 0o777 & ~_umask())
            os.rename(tmp, out)
        else:
            old = out / MARKET_DIR
            if old.exists():
                os.rename(old, tmp / ".old")
            os.rename(root, out / MARKET_DIR)
            os.replace(tmp / META_FILE, out / META_FILE)
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if fresh and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ReidExportError(f"{out}: appeared while generating; choose another DIR or pass `force`") from None
        raise _fail_os(out, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

