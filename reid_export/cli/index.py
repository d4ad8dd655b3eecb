"""``reid-export index`` and ``search``: a faiss index of a gallery, and top-k search in it."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ..errors import ReidExportError
from ..fileio import atomic_write_json, check_output_path
from ..report import format_table
from ..runtime import expand_image_paths, open_encoder
from .common import flag_aliases, get_opts, positive_int, skip_bad_images_option, to_flags
from .main import cli
from .ray_options import ray_engine_options, ray_options


def _encode(model, images, *, config, device, batch_size, flip_test, progress, skip_bad_images, engine="local",
            workdir: Path | None = None, **ray_kwargs):
    """(features, file names, data config dict) of image files/folders with MODEL."""
    paths = expand_image_paths(images)
    if engine == "ray":
        from ..runtime.ray_extract import remove_shards, run_extract_on_ray

        out = workdir / "features.npy"
        options = ray_options(**ray_kwargs, config=config, opts=get_opts(), device=device, allow_partial=False,
                              batch_size=batch_size, flip_test=flip_test, progress=progress,
                              on_error="skip" if skip_bad_images else "raise")
        feats, kept, _, info = run_extract_on_ray(model, paths, out, options)
        remove_shards(out)
        return feats, [str(p) for p in kept], info["data_config"]
    with open_encoder(model, config=config, opts=get_opts(), device=device) as enc:
        res = enc.encode_paths(paths, batch_size, flip_test, progress, desc="index (encode)",
                               on_error="skip" if skip_bad_images else "raise")
        data_config = enc.data_config.to_dict()
    if res.skipped:
        click.echo(to_flags(res.summary()), err=True)
    return res.features, [str(paths[i]) for i in res.kept], data_config


def _encoder_options(command):
    """The options both commands use to run the model on images: --config, --flip-test, --batch-size,
    --device, --progress."""
    for option in reversed([
            click.option("--config", type=click.Path(path_type=Path)),
            click.option("--flip-test", is_flag=True),
            click.option("--batch-size", default=32, show_default=True, type=int, callback=positive_int),
            click.option("--device", default="cpu", show_default=True),
            click.option("--progress/--no-progress", default=True)]):
        command = option(command)
    return command


@flag_aliases(num_workers="workers", cpus_per_worker="threads_per_worker", on_error="skip_bad_images")
@cli.command(name="index")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path),
              help="Encode INPUTS (images or folders) with this model; without it INPUTS are extract outputs (.npy).")
@click.option("--kind", type=click.Choice(["flat", "ivf", "ivfpq", "hnsw"]), default="flat", show_default=True,
              help="flat: exact inner product; ivf/ivfpq/hnsw: approximate (recall against exact is measured).")
@click.option("--nlist", default=0, show_default=True, type=int, help="IVF lists (0: about 4 sqrt(N)).")
@click.option("--nprobe", default=32, show_default=True, type=int, callback=positive_int)
@click.option("--pq-m", default=64, show_default=True, type=int, callback=positive_int)
@click.option("--hnsw-m", default=32, show_default=True, type=int, callback=positive_int)
@click.option("--ef-search", default=128, show_default=True, type=int, callback=positive_int)
@click.option("--index-shard-size", "index_shard_size", default=2_000_000, show_default=True, type=int,
              callback=positive_int, help="Vectors per index shard file.")
@click.option("--add", is_flag=True, help="Add to the index in FOLDER instead of building a new one.")
@click.option("--recall-sample", default=1000, show_default=True, type=int,
              help="Rows used as queries to measure recall@10 against exact search (approximate kinds).")
@_encoder_options
@ray_engine_options
@skip_bad_images_option
def index_cmd(folder, inputs, model, kind, nlist, nprobe, pq_m, hnsw_m, ef_search, index_shard_size, add,
              recall_sample, config, flip_test, batch_size, device, progress, engine, ray_address, workers,
              threads_per_worker, gpus_per_worker, shard_size, skip_bad_images):
    """Build (or --add to) a faiss index in FOLDER from INPUTS.

    INPUTS are ``extract`` outputs (.npy with their .json) or, with --model, images and folders.
    The index stores the features (L2-normalised; distance = 1 - cosine), their file names and
    the model's data config, in shards of --index-shard-size vectors.

    \b
    Examples:
      reid-export index gallery.idx feats.npy --kind ivf --nprobe 32
      reid-export index gallery.idx crops/ --model model.onnx --engine ray --workers 4
      reid-export index gallery.idx more_crops/ --model model.onnx --add
    """
    from ..index import IndexParams, build_index, load_feature_set, require_faiss

    require_faiss()
    if model is not None:
        folder.mkdir(parents=True, exist_ok=True)
        feats, files, data_config = _encode(model, inputs, config=config, device=device, batch_size=batch_size,
                                            flip_test=flip_test, progress=progress, skip_bad_images=skip_bad_images,
                                            engine=engine, workdir=folder, ray_address=ray_address, workers=workers,
                                            threads_per_worker=threads_per_worker, gpus_per_worker=gpus_per_worker,
                                            shard_size=shard_size)
        arrays, model_name = [feats], str(model)
    else:
        if engine == "ray":
            raise ReidExportError("--engine ray encodes images: give --model (features need no encoding)",
                                  exit_code=2)
        arrays, files, data_config, model_name = [], [], None, None
        for npy in inputs:
            if npy.suffix != ".npy":
                raise ReidExportError(f"{npy}: without --model, INPUTS are extract outputs (.npy); pass --model "
                                      "MODEL to index images", exit_code=2)
            feats, meta = load_feature_set(npy)
            if data_config is not None and meta.get("data_config") != data_config:
                raise ReidExportError(f"{npy}: made with another data config than {inputs[0]}; index features "
                                      "of one model")
            data_config, model_name = meta.get("data_config"), meta.get("model")
            arrays.append(feats)
            files.extend(meta["files"])
    params = IndexParams(kind=kind, nlist=nlist, nprobe=nprobe, pq_m=pq_m, hnsw_m=hnsw_m, ef_search=ef_search,
                         shard_size=index_shard_size)
    manifest = build_index(folder, arrays, files, params, data_config=data_config, model=model_name, add=add,
                           recall_sample=recall_sample, progress=progress)
    rec = manifest.get("recall") or {}
    rows = [[manifest["params"]["kind"], manifest["count"], manifest["dim"], len(manifest["shards"]),
             manifest["build_s"], rec.get("recall@10"), rec.get("query_per_s")]]
    click.echo(f"{'added to' if add else 'built'} {folder}")
    click.echo(format_table(["kind", "vectors", "dim", "shards", "build s", "recall@10 vs exact", "queries/s"], rows,
                            floatfmt=".4g"))


@cli.command()
@click.argument("index_folder", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), help="Model that encodes IMAGES (the index's model).")
@click.option("--query-features", type=click.Path(path_type=Path), help="Queries as an extract output instead.")
@click.option("-k", "--top-k", "k", default=10, show_default=True, type=int, callback=positive_int)
@click.option("--nprobe", type=int, help="IVF lists to search (default: the index's).")
@click.option("--ef-search", type=int, help="HNSW search breadth (default: the index's).")
@click.option("--report", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--ranklist", type=click.Path(path_type=Path), help="Write the rank-list picture (PNG).")
@_encoder_options
@skip_bad_images_option
def search(index_folder, images, model, query_features, k, nprobe, ef_search, report, ranklist, config, flip_test,
           batch_size, device, progress, skip_bad_images):
    """Top-k gallery items of each query image in the index at INDEX_FOLDER.

    \b
    Example:
      reid-export search gallery.idx query.jpg --model model.onnx -k 10 --ranklist hits.png --report hits.json
    """
    from ..data.market import parse_name
    from ..index import GalleryIndex, load_feature_set, require_faiss

    require_faiss()
    for path in (report, ranklist):
        if path is not None:
            check_output_path(path)
    gindex = GalleryIndex.open(index_folder)
    if (model is None) == (query_features is None):
        raise ReidExportError("give IMAGES with --model, or --query-features Q.npy", exit_code=2)
    if model is not None:
        if not images:
            raise ReidExportError("no query images given", exit_code=2)
        feats, files, data_config = _encode(model, images, config=config, device=device, batch_size=batch_size,
                                            flip_test=flip_test, progress=progress, skip_bad_images=skip_bad_images)
    else:
        feats, meta = load_feature_set(query_features)
        feats, files, data_config = np.asarray(feats), meta["files"], meta.get("data_config")
    stored = gindex.manifest.get("data_config")
    if stored is not None and data_config is not None and stored != data_config:
        diff = sorted(k_ for k_ in set(stored) | set(data_config) if stored.get(k_) != data_config.get(k_))
        raise ReidExportError(f"the queries were encoded with another data config than the index's "
                              f"(differs in {', '.join(diff)}): search with the model that built {index_folder}")
    gindex.shards()
    gindex.set_search_params(nprobe, ef_search)
    dist, ids = gindex.search(feats, k)
    names = gindex.files()
    results = []
    for qi, qfile in enumerate(files):
        hits = [{"rank": r + 1, "id": int(i), "file": names[i], "distance": float(d)}
                for r, (d, i) in enumerate(zip(dist[qi], ids[qi])) if i >= 0]
        results.append({"query": qfile, "hits": hits})
    for res in results:
        click.echo(f"query {res['query']}")
        click.echo(format_table(["rank", "distance", "id", "file"],
                                [[h["rank"], h["distance"], h["id"], h["file"]] for h in res["hits"]],
                                floatfmt=".4f"))
    if report:
        atomic_write_json(report, {"index": str(index_folder), "k": k, "kind": gindex.params.kind,
                                   "queries": results})
    if ranklist:
        from ..verify.plots import rank_list_image, write_png

        def pid(name):
            parsed = parse_name(Path(name).name)
            return parsed[0] if parsed else None

        def label(name):  # two lines of a tile's width
            return [name[:12], name[12:24]] if len(name) > 12 else [name]

        rows = [{"query": r["query"], "query_label": label(Path(r["query"]).name),
                 "gallery": [h["file"] for h in r["hits"]],
                 "matches": [pid(h["file"]) is not None and pid(h["file"]) == pid(r["query"]) for h in r["hits"]],
                 "distances": [h["distance"] for h in r["hits"]]} for r in results[:20]]
        write_png(ranklist, rank_list_image(rows, topk=k, legend=(
            "left: the query (its file name); then its top-{k} hits by distance, green = the same identity by "
            "Market-1501 file name, red = another;  under each: the distance")))
