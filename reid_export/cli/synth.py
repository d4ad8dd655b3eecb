"""``reid-export synth``: a synthetic Market-1501-layout dataset."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .common import flag_aliases
from .main import cli


@flag_aliases(images_per_id_per_camera="per_camera")
@cli.command()
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--identities", default=100, show_default=True, type=int,
              help="People in the dataset; half train, half test (query + gallery).")
@click.option("--cameras", default=4, show_default=True, type=int, help="Cameras (2..9).")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same bytes.")
@click.option("--images-per-id-per-camera", "per_camera", default=3, show_default=True, type=int,
              help="Images of a person in each camera that sees them (each person is seen by 2..C cameras).")
@click.option("--size", nargs=2, type=int, default=(128, 64), show_default=True, metavar="H W",
              help="Image height and width.")
@click.option("--distractors", default=30, show_default=True, type=int,
              help="Gallery images with pid 0000 (other people, empty detections).")
@click.option("--junk", default=10, show_default=True, type=int,
              help="Gallery images with pid -1 (fragments, tiny blurred people; ignored by evaluation).")
@click.option("--force", is_flag=True, help="Replace the dataset (Market-1501-v15.09.15/, synth.json) in a non-empty DIR.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def synth(directory, identities, cameras, seed, per_camera, size, distractors, junk, force, progress):
    """Generate a synthetic person re-identification dataset in the Market-1501 layout.

    Writes DIR/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test} and
    DIR/synth.json (parameters, counts, cameras, identity attributes). Train and test
    identities are disjoint; every test identity has one query per camera and the rest in the
    gallery, so every query has a gallery match from another camera.

    \b
    Example:
      reid-export synth data/synth --identities 100 --cameras 4 --seed 0
      reid-export eval model.onnx --dataset-root data/synth
    """
    from ..synth import SynthConfig, write_dataset

    config = SynthConfig(identities=identities, cameras=cameras, seed=seed,
                         images_per_id_per_camera=per_camera, size=tuple(size),
                         distractors=distractors, junk=junk).validate()
    start = time.perf_counter()
    meta = write_dataset(directory, config, force=force, progress=progress)
    c = meta["counts"]
    click.echo(f"wrote {directory}: {c['train']['images']} train ({c['train']['identities']} ids), "
               f"{c['query']['images']} query, {c['gallery']['images']} gallery ({c['query']['identities']} ids, "
               f"{c['gallery']['distractors']} distractors, {c['gallery']['junk']} junk) "
               f"in {time.perf_counter() - start:.1f} s", err=True)
