"""Synthetic person re-identification data in the Market-1501 layout (``reid-export synth``).

Procedural pedestrians (numpy + OpenCV only) whose identity is carried by clothing colours and
patterns, body proportions, hair and accessories, seen by cameras that differ in scene,
illumination, colour cast, blur, scale, crop and occlusion.  Deterministic for a given seed,
generator version and numpy/OpenCV versions.
"""

from .attributes import DISCRETE_KEYS, Camera, Identity, sample_cameras, sample_identities, sample_identity
from .dataset import GENERATOR_VERSION, META_FILE, Plan, SynthConfig, make_plan, render_job, write_dataset
from .render import Pose, draw_person, render_image

__all__ = [
    "DISCRETE_KEYS",
    "GENERATOR_VERSION",
    "META_FILE",
    "Camera",
    "Identity",
    "Plan",
    "Pose",
    "SynthConfig",
    "draw_person",
    "make_plan",
    "render_image",
    "render_job",
    "sample_cameras",
    "sample_identities",
    "sample_identity",
    "write_dataset",
]
