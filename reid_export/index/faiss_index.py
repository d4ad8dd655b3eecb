"""A sharded faiss index of gallery features, with the file names and the data config beside it.

Layout of an index folder::

    index.json          manifest: kind, parameters, dim, count, shards, data config, model, recall
    shard-00000.faiss   one faiss index per shard (ids local to the shard)
    shard-00000.json    the file names of that shard's rows, in id order
    trained.faiss       IVF/PQ kinds: the trained, empty index every new shard starts from

Features are L2-normalised before they are added and the index compares inner products, so
``distance = 1 - cosine`` (the ``eval`` default).  The manifest is written last and atomically:
it is the commit point, so a killed build or add leaves the previous index usable.

Kinds: ``flat`` (exact inner product, default), ``ivf`` (IVF-Flat, ``nlist`` lists, ``nprobe``
searched), ``ivfpq`` (IVF with product quantisation, ``pq_m`` bytes per vector), ``hnsw``
(HNSW-Flat, ``hnsw_m`` links, ``ef_search``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..embeddings import l2_normalize
from ..errors import ReidExportError, UsageError, require_module
from ..fileio import atomic_open, atomic_write_json, check_input_file

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
FORMAT = "reid-export-index/1"
MANIFEST = "index.json"
INSTALL = "pip install 'reid-export[index]' (faiss-cpu; faiss-gpu on CUDA machines)"


def require_faiss():
    """The faiss module, or one clear error with the install command."""
    return require_module("faiss", "faiss", INSTALL)


@dataclass
class IndexParams:
    kind: str = "flat"
    nlist: int = 0          # IVF lists; 0: about 4 * sqrt(N) at build
    nprobe: int = 32
    pq_m: int = 64          # ivfpq: sub-quantizers (bytes per vector at 8 bits)
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    shard_size: int = 2_000_000

    def check(self) -> "IndexParams":
        if self.kind not in KINDS:
            raise UsageError(f"unknown index kind {self.kind!r}; use one of {', '.join(KINDS)}")
        for name in ("nprobe", "pq_m", "hnsw_m", "ef_construction", "ef_search", "shard_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return self


def normalize(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(l2_normalize(np.asarray(x, dtype=np.float32), axis=1))


def _check_features(x: np.ndarray, what: str) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ReidExportError(f"{what}: features must be a non-empty 2-D [N, D] array; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ReidExportError(f"{what}: features hold NaN/Inf values; re-extract them")


def load_feature_set(npy: str | Path, mmap: bool = True) -> tuple[np.ndarray, dict]:
    """An ``extract`` output: the [N, D] matrix (memory-mapped) and its ``.json`` (files, data config)."""
    npy = check_input_file(npy, "feature file (.npy)")
    sidecar = npy.with_suffix(".json")
    if not sidecar.exists():
        raise ReidExportError(f"{sidecar}: file list missing beside {npy.name}; write features with "
                              "'reid-export extract', which writes both")
    try:
        feats = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ReidExportError(f"{npy}: not a readable .npy feature matrix ({exc}); re-extract it") from None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        files = meta["files"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ReidExportError(f"{sidecar}: not an extract file list ({type(exc).__name__}: {exc}); "
                              "re-extract the features") from None
    if feats.ndim != 2 or feats.shape[0] != len(files):
        raise ReidExportError(f"{npy}: {feats.shape[0] if feats.ndim else 0} rows but {sidecar.name} lists "
                              f"{len(files)} files; the two files do not belong together, re-extract them")
    return feats, meta


def exact_topk(queries: np.ndarray, data: np.ndarray, k: int, chunk: int = 65536):
    """Exact top-k by inner product (float32, numpy), in data chunks: (similarities, ids) [Q, k]."""
    k = min(k, data.shape[0])
    best_s = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((queries.shape[0], 0), dtype=np.int64)
    for start in range(0, data.shape[0], chunk):
        sims = queries @ np.asarray(data[start:start + chunk], dtype=np.float32).T
        s = np.concatenate([best_s, sims], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)], axis=1)
        top = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k ids that the approximate top-k also returns."""
    a, e = approx_ids[:, :k], exact_ids[:, :k]
    hits = [np.intersect1d(a[i], e[i]).size for i in range(a.shape[0])]
    return float(np.mean(hits) / e.shape[1])


class GalleryIndex:
    """An index folder (see the module docstring)."""

    def __init__(self, folder: str | Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self._shards = None
        self._files = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, folder: str | Path) -> "GalleryIndex":
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.exists():
            raise ReidExportError(f"{folder}: not an index folder ({MANIFEST} missing); build one with "
                                  "'reid-export index'")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise ReidExportError(f"{path}: unreadable index manifest ({exc}); rebuild the index") from None
        if manifest.get("format") != FORMAT:
            raise ReidExportError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; rebuild the index")
        return cls(folder, manifest)

    @property
    def params(self) -> IndexParams:
        return IndexParams(**self.manifest["params"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def _read_shard(self, entry: dict):
        faiss = require_faiss()
        path = self.folder / entry["file"]
        if not path.exists():
            raise ReidExportError(f"{path}: index shard missing; rebuild the index")
        index = faiss.read_index(str(path))
        if index.ntotal != entry["count"]:
            raise ReidExportError(f"{path}: holds {index.ntotal} vectors, the manifest says {entry['count']}; "
                                  "rebuild the index")
        return index

    def shards(self) -> list:
        if self._shards is None:
            self._shards = [self._read_shard(e) for e in self.manifest["shards"]]
            self.set_search_params(self.params.nprobe, self.params.ef_search)
        return self._shards

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        faiss = require_faiss()
        for index in self._shards or []:
            if nprobe is not None and self.params.kind in ("ivf", "ivfpq"):
                faiss.extract_index_ivf(index).nprobe = int(nprobe)
            if ef_search is not None and self.params.kind == "hnsw":
                index.hnsw.efSearch = int(ef_search)

    def files(self) -> list[str]:
        if self._files is None:
            out = []
            for e in self.manifest["shards"]:
                out.extend(json.loads((self.folder / e["files"]).read_text(encoding="utf-8")))
            self._files = out
        return self._files

    # ------------------------------------------------------------------ searching
    def search(self, queries: np.ndarray, k: int = 10, gpu: bool = True):
        """(cosine distances, global ids) [Q, k], nearest first; ids -1 / distance inf where fewer exist."""
        queries = normalize(queries)
        if queries.shape[1] != self.dim:
            raise ReidExportError(f"query features have dimension {queries.shape[1]}, the index {self.dim}: "
                                  "search with the model that built it")
        all_d, all_i = [], []
        offset = 0
        for entry, index in zip(self.manifest["shards"], self.shards()):
            index = _to_gpu(index) if gpu else index
            sims, ids = index.search(queries, min(k, entry["count"]))
            dist = np.where(ids >= 0, 1.0 - sims, np.inf).astype(np.float32)
            all_d.append(dist)
            all_i.append(np.where(ids >= 0, ids + offset, -1))
            offset += entry["count"]
        dist, ids = np.concatenate(all_d, axis=1), np.concatenate(all_i, axis=1)
        order = np.lexsort((ids, dist), axis=1) if dist.shape[1] else np.zeros_like(ids)
        dist, ids = np.take_along_axis(dist, order, 1)[:, :k], np.take_along_axis(ids, order, 1)[:, :k]
        if dist.shape[1] < k:
            pad = k - dist.shape[1]
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return dist, ids

    def reconstruct_sample(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (flat and HNSW store them exactly; IVF-Flat too)."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        starts = np.cumsum([0] + [e["count"] for e in self.manifest["shards"]])
        for n, gid in enumerate(ids):
            s = int(np.searchsorted(starts, gid, side="right") - 1)
            index = self.shards()[s]
            if self.params.kind in ("ivf", "ivfpq"):
                require_faiss().extract_index_ivf(index).make_direct_map()
            out[n] = index.reconstruct(int(gid - starts[s]))
        return out


def _to_gpu(index):
    faiss = require_faiss()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index
    if not hasattr(_to_gpu, "res"):
        _to_gpu.res = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_to_gpu.res, 0, index)
    except RuntimeError:  # HNSW has no GPU version: search it on the CPU
        return index


def _new_index(params: IndexParams, dim: int, train: np.ndarray | None):
    faiss = require_faiss()
    ip = faiss.METRIC_INNER_PRODUCT
    if params.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, ip)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if params.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, ip)
    else:
        if dim % params.pq_m:
            raise UsageError(f"`params.pq_m` {params.pq_m} must divide the feature dimension {dim}")
        index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, 8, ip)
    index.train(train)
    index.nprobe = params.nprobe
    return index


def build_index(folder: str | Path, chunks, files: list[str], params: IndexParams, *, data_config: dict | None,
                model: str | None = None, add: bool = False, recall_sample: int = 1000, progress: bool = False,
                train_size: int = 100_000) -> dict:
    """Build (or with ``add``, extend) the index in ``folder`` from ``chunks``: an [N, D] array or a list of
    them, rows matching ``files``.  Returns the manifest (with build time and, for the approximate
    kinds, ``recall@10`` against exact on ``recall_sample`` of the rows).

    The steps: check the rows, open the manifest (new, or the index's for ``add``), train the IVF
    template (:func:`_trained_template`), add the rows shard by shard (:func:`_add_rows`), measure the
    recall and write the manifest last (the commit point)."""
    require_faiss()
    folder = Path(folder)
    arrays = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    dim = _check_chunks(arrays, files)
    start = time.perf_counter()
    if add:
        manifest, params = _open_for_add(folder, dim, data_config)
    else:
        params.check()
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / MANIFEST).exists():
            raise ReidExportError(f"{folder}: already holds an index; pass `add` to extend it or choose another folder")
        manifest = {"format": FORMAT, "params": None, "dim": dim, "count": 0, "metric": "cosine (inner product "
                    "of L2-normalised features)", "shards": [], "data_config": data_config, "model": model}
    template = _trained_template(folder, params, arrays, dim, add, train_size)
    manifest["params"] = asdict(params)
    _add_rows(folder, manifest, params, template, dim, arrays, files, progress)
    manifest["count"] = int(sum(e["count"] for e in manifest["shards"]))
    manifest["build_s"] = round(time.perf_counter() - start, 3)
    if params.kind != "flat" and recall_sample > 0:
        manifest["recall"] = measure_recall(GalleryIndex(folder, manifest), arrays, recall_sample)
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def _check_chunks(arrays, files: list[str]) -> int:
    """The feature dimension of the 2-D ``arrays``, whose rows must match ``files``."""
    total = sum(a.shape[0] for a in arrays)
    if total != len(files):
        raise ReidExportError(f"{total} feature rows but {len(files)} file names")
    for a in arrays:
        if a.ndim != 2:
            raise ReidExportError(f"features must be 2-D [N, D]; got shape {a.shape}")
    dim = int(arrays[0].shape[1])
    if any(a.shape[1] != dim for a in arrays):
        raise ReidExportError("feature sets of different dimensions cannot share an index")
    return dim


def _open_for_add(folder: Path, dim: int, data_config: dict | None) -> tuple[dict, IndexParams]:
    """The manifest and parameters of the index in ``folder``, which ``dim``-d features of ``data_config`` extend."""
    old = GalleryIndex.open(folder)
    manifest = old.manifest
    if old.dim != dim:
        raise ReidExportError(f"{folder}: the index holds {old.dim}-d features, these are {dim}-d; "
                              "add features of the same model")
    if data_config is not None and manifest.get("data_config") not in (None, data_config):
        raise ReidExportError(f"{folder}: these features were made with another data config than the index's "
                              "(see index.json); add features of the same model")
    return manifest, old.params


def _trained_template(folder: Path, params: IndexParams, arrays, dim: int, add: bool, train_size: int):
    """IVF kinds: the trained, empty index every shard starts from (``trained.faiss``: read for ``add``, else
    trained on up to ``train_size`` rows and written; ``params.nlist`` 0 is resolved here). Others: None."""
    if params.kind not in ("ivf", "ivfpq"):
        return None
    faiss = require_faiss()
    trained_path = folder / "trained.faiss"
    if add:
        return faiss.read_index(str(trained_path))
    total = sum(a.shape[0] for a in arrays)
    rng = np.random.default_rng(0)
    flat_rows = np.concatenate([np.arange(a.shape[0]) + sum(b.shape[0] for b in arrays[:j])
                                for j, a in enumerate(arrays)])
    pick = np.sort(rng.choice(total, min(total, train_size), replace=False))
    sample = normalize(_rows(arrays, flat_rows[pick]))
    if params.nlist == 0:
        params.nlist = int(max(1, min(total // 39, 4 * np.sqrt(total))))
    if sample.shape[0] < params.nlist:
        raise UsageError(f"`params.nlist` {params.nlist} needs at least that many vectors to train; "
                         f"have {sample.shape[0]}")
    template = _new_index(params, dim, sample)
    _write_index(trained_path, template)
    return template


def _add_rows(folder: Path, manifest: dict, params: IndexParams, template, dim: int, arrays, files: list[str],
              progress: bool) -> None:
    """Add the normalised rows to the last shard while it has room, then to new ones of ``params.shard_size``;
    each full shard and the last are written with their file names, and listed in ``manifest["shards"]``."""
    from tqdm import tqdm

    faiss = require_faiss()
    shards = manifest["shards"]
    total = sum(a.shape[0] for a in arrays)
    bar = tqdm(total=total, desc=f"index ({params.kind})", unit="vec", unit_scale=True, disable=not progress,
               leave=False)
    file_pos = 0

    def open_last():
        if shards and shards[-1]["count"] < params.shard_size:
            entry = shards.pop()
            return entry, GalleryIndex(folder, manifest)._read_shard(entry), \
                json.loads((folder / entry["files"]).read_text(encoding="utf-8"))
        n = len(shards)
        entry = {"file": f"shard-{n:05d}.faiss", "files": f"shard-{n:05d}.json", "count": 0}
        index = faiss.clone_index(template) if template is not None else _new_index(params, dim, None)
        return entry, index, []

    entry, index, names = open_last()
    for a in arrays:
        for s in range(0, a.shape[0], 65536):
            block = normalize(np.asarray(a[s:s + 65536]))
            _check_features(block, "index input")
            while block.shape[0]:
                room = params.shard_size - index.ntotal
                if room == 0:
                    entry["count"] = index.ntotal
                    _write_shard(folder, entry, index, names)
                    shards.append(entry)
                    entry, index, names = open_last()
                    room = params.shard_size
                part, block = block[:room], block[room:]
                index.add(part)
                names.extend(files[file_pos:file_pos + part.shape[0]])
                file_pos += part.shape[0]
                bar.update(part.shape[0])
    bar.close()
    entry["count"] = index.ntotal
    _write_shard(folder, entry, index, names)
    shards.append(entry)


def _rows(arrays, rows: np.ndarray) -> np.ndarray:
    """Rows (global numbers, ascending) of a list of arrays."""
    out, starts = [], np.cumsum([0] + [a.shape[0] for a in arrays])
    for j, a in enumerate(arrays):
        sel = rows[(rows >= starts[j]) & (rows < starts[j + 1])] - starts[j]
        if sel.size:
            out.append(np.asarray(a[sel], dtype=np.float32))
    return np.concatenate(out)


def _write_index(path: Path, index) -> None:
    """faiss.write_index through an atomic file (no in-memory copy of the index)."""
    faiss = require_faiss()
    with atomic_open(path, "wb") as handle:
        faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))


def _write_shard(folder: Path, entry: dict, index, names: list[str]) -> None:
    _write_index(folder / entry["file"], index)
    atomic_write_json(folder / entry["files"], names)


def measure_recall(gindex: GalleryIndex, arrays, sample: int, k: int = 10, seed: int = 0) -> dict:
    """recall@k of the index against exact search (numpy, float32), with ``sample`` of its rows as queries,
    and the index's query throughput on them (one batch, this machine's threads).  Measured when the
    index is built in one call (an ``add`` keeps the figure of the build)."""
    total = sum(a.shape[0] for a in arrays)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(total, min(sample, total), replace=False))
    queries = normalize(_rows(arrays, rows))
    t0 = time.perf_counter()
    dist, ids = gindex.search(queries, k, gpu=False)
    search_s = time.perf_counter() - t0
    offset = gindex.count - total  # rows added before this call come first
    if offset:
        return gindex.manifest.get("recall", {})
    exact_s, exact_i = exact_topk(queries, _Normalized(arrays), k)
    return {"k": k, "queries": int(rows.size), f"recall@{k}": recall_at_k(ids, exact_i, k),
            "query_per_s": rows.size / search_s if search_s > 0 else None}


class _Normalized:
    """Rows of a list of arrays, L2-normalised on access (for exact search in chunks)."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [a.shape[0] for a in arrays])
        self.shape = (int(self.starts[-1]), arrays[0].shape[1])

    def __getitem__(self, sl: slice) -> np.ndarray:
        rows = np.arange(*sl.indices(self.shape[0]))
        return normalize(_rows(self.arrays, rows))
