"""What a synthetic person and a synthetic camera are: attribute sampling.

Identity lives in discrete, *shared* attributes (a small colour palette, four top patterns,
three kinds of bottom, hair, hat, bag, backpack, sleeves, shoes) plus continuous body
proportions and gait.  Colours are drawn from a skewed palette (black, white, grey and navy
tops are common), so many people wear the same top and differ in trousers, pattern or
accessories; no two identities of one dataset share more than all-but-two of the discrete
attributes (see :func:`sample_identities`).

Cameras differ in scene (background), gain, gamma, white balance, saturation, blur, noise,
person scale, lighting gradient, occlusion rate and the distribution of views they see.

Colours are RGB tuples here (readable in ``synth.json``); the renderer converts to BGR.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# ------------------------------------------------------------------ palettes (RGB)

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (32, 32, 36),
    "white": (226, 226, 220),
    "grey": (128, 128, 130),
    "navy": (34, 42, 92),
    "blue": (52, 96, 178),
    "denim": (72, 98, 134),
    "red": (172, 32, 38),
    "green": (44, 112, 62),
    "beige": (196, 176, 136),
    "brown": (104, 68, 42),
    "yellow": (220, 188, 52),
    "pink": (222, 146, 168),
}

# Skewed on purpose: most people wear dark or neutral clothes.
TOP_COLOURS = {"black": .19, "white": .17, "grey": .13, "navy": .1, "blue": .08, "red": .08,
               "green": .06, "beige": .05, "yellow": .04, "pink": .05, "brown": .05}
BOTTOM_COLOURS = {"black": .3, "denim": .22, "navy": .1, "grey": .14, "beige": .12, "brown": .07,
                  "white": .05}
TOP_PATTERNS = {"plain": .45, "stripes": .2, "checks": .15, "logo": .2}
LOGO_SHAPES = ("circle", "square", "triangle", "bar")
BOTTOM_TYPES = {"trousers": .7, "shorts": .17, "skirt": .13}
SLEEVES = {"long": .6, "short": .4}
SHOE_COLOURS = {"black": .45, "white": .3, "brown": .15, "grey": .1}
SKIN_TONES = [(241, 200, 170), (224, 172, 135), (190, 138, 100), (141, 94, 62), (96, 62, 42)]
HAIR_COLOURS = {"black": ((24, 20, 20), .4), "dark brown": ((62, 40, 28), .25),
                "brown": ((112, 74, 44), .12), "blonde": ((206, 170, 104), .1),
                "grey": ((170, 168, 164), .08), "auburn": ((128, 52, 30), .05)}
HAIR_LENGTHS = {"short": .5, "medium": .25, "long": .2, "bald": .05}
HATS = {"none": .8, "cap": .12, "beanie": .08}
BAG_COLOURS = {"black": .35, "brown": .2, "navy": .1, "grey": .1, "red": .08, "beige": .09,
               "green": .08}

# The discrete attributes that make an identity (compared by sample_identities).
DISCRETE_KEYS = ("top_colour", "top_pattern", "pattern_colour", "sleeves", "bottom_colour",
                 "bottom_type", "shoes", "hair_colour", "hair_length", "hat", "backpack", "bag")

VIEWS = ("front", "back", "left", "right")
SCENES = ("street", "corridor", "plaza", "park")
OCCLUDERS = ("pole", "car", "person", "block")


@dataclass(frozen=True)
class Identity:
    """One person.  Colour names refer to the palettes above; ``*_rgb`` are the jittered shades
    actually drawn.  Lengths are fractions of the person's height."""

    top_colour: str
    top_rgb: tuple
    top_pattern: str          # plain | stripes | checks | logo
    pattern_colour: str       # second colour of stripes/checks/logo ("none" when plain)
    pattern_rgb: tuple
    pattern_scale: float      # stripe period, as a fraction of the height
    logo_shape: str           # circle | square | triangle | bar ("none" unless logo)
    sleeves: str              # long | short
    bottom_colour: str
    bottom_rgb: tuple
    bottom_type: str          # trousers | shorts | skirt
    shoes: str
    shoes_rgb: tuple
    skin_rgb: tuple
    hair_colour: str
    hair_rgb: tuple
    hair_length: str          # short | medium | long | bald
    hat: str                  # none | cap | beanie
    hat_rgb: tuple
    backpack: str             # "none" or a colour name
    backpack_rgb: tuple
    bag: str                  # "none" or a colour name (shoulder bag)
    bag_rgb: tuple
    bag_side: int             # +1 the person's left, -1 the right
    height: float             # relative stature, 0.88..1.0
    head: float               # head height
    shoulders: float          # shoulder width
    hips: float               # hip width
    legs: float               # leg length (hip to sole)
    girth: float              # limb thickness factor
    stride: float             # leg swing amplitude (radians)
    arm_swing: float          # arm swing amplitude (radians)

    def discrete(self) -> tuple:
        return tuple(getattr(self, k) for k in DISCRETE_KEYS)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Camera:
    """One camera: its scene and image formation."""

    index: int                # 0-based
    scene: str
    wall_rgb: tuple
    floor_rgb: tuple
    horizon: float            # floor/wall boundary, fraction of the image height
    texture: float            # strength of the background noise
    clutter: int              # mean number of clutter shapes
    gain: float
    gamma: float
    white_balance: tuple      # RGB multipliers
    saturation: float         # 1 = unchanged, 0 = grey
    blur: float               # Gaussian sigma in output pixels
    motion_blur: int          # horizontal motion-blur length in output pixels (0 = none)
    noise: float              # sensor noise sigma (0..255 scale)
    light: tuple              # (horizontal, vertical) illumination slope
    scale: float              # mean person height / image height
    occlusion: float          # probability of an occluder
    view_weights: tuple       # probabilities of VIEWS

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# ------------------------------------------------------------------ sampling helpers

def _choice(rng: np.random.Generator, table: dict) -> str:
    keys = list(table)
    p = np.array([table[k] if not isinstance(table[k], tuple) else table[k][1] for k in keys])
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _shade(rng: np.random.Generator, rgb, spread: float = 0.12, tint: float = 8.0) -> tuple:
    """The palette colour as one person's garment: a little lighter/darker, slightly tinted."""
    c = np.asarray(rgb, np.float64) * rng.uniform(1 - spread, 1 + spread) + rng.normal(0, tint, 3)
    return tuple(int(v) for v in np.clip(np.round(c), 0, 255))


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _contrasting(rng: np.random.Generator, base: str, min_luma: float = 55.0) -> str:
    """A palette colour that stands out against ``base`` (stripes, checks, logos)."""
    options = [k for k in PALETTE if k != base and abs(_luma(PALETTE[k]) - _luma(PALETTE[base])) >= min_luma]
    return options[int(rng.integers(len(options)))]


def sample_identity(rng: np.random.Generator) -> Identity:
    """One random person."""
    top = _choice(rng, TOP_COLOURS)
    pattern = _choice(rng, TOP_PATTERNS)
    pattern_colour = "none" if pattern == "plain" else _contrasting(rng, top)
    bottom = _choice(rng, BOTTOM_COLOURS)
    bottom_type = _choice(rng, BOTTOM_TYPES)
    shoes = _choice(rng, SHOE_COLOURS)
    hair = _choice(rng, HAIR_COLOURS)
    hair_length = _choice(rng, HAIR_LENGTHS)
    hat = _choice(rng, HATS)
    hat_colour = "none" if hat == "none" else _choice(rng, TOP_COLOURS)
    backpack = "none" if rng.random() < 0.72 else _choice(rng, BAG_COLOURS)
    bag = "none" if rng.random() < 0.8 else _choice(rng, BAG_COLOURS)
    if hair_length == "long" and rng.random() < 0.4 and bottom_type == "trousers":
        bottom_type = "skirt"  # a mild correlation, as in real data
    none = (0, 0, 0)
    return Identity(
        top_colour=top,
        top_rgb=_shade(rng, PALETTE[top]),
        top_pattern=pattern,
        pattern_colour=pattern_colour,
        pattern_rgb=none if pattern == "plain" else _shade(rng, PALETTE[pattern_colour], 0.08),
        pattern_scale=float(np.round(rng.uniform(0.035, 0.07), 4)),
        logo_shape=str(LOGO_SHAPES[int(rng.integers(len(LOGO_SHAPES)))]) if pattern == "logo" else "none",
        sleeves=_choice(rng, SLEEVES),
        bottom_colour=bottom,
        bottom_rgb=_shade(rng, PALETTE[bottom]),
        bottom_type=bottom_type,
        shoes=shoes,
        shoes_rgb=_shade(rng, PALETTE[shoes], 0.08),
        skin_rgb=_shade(rng, SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], 0.06, 4.0),
        hair_colour=hair,
        hair_rgb=_shade(rng, HAIR_COLOURS[hair][0], 0.1, 4.0),
        hair_length=hair_length,
        hat=hat,
        hat_rgb=none if hat == "none" else _shade(rng, PALETTE[hat_colour]),
        backpack=backpack,
        backpack_rgb=none if backpack == "none" else _shade(rng, PALETTE[backpack]),
        bag=bag,
        bag_rgb=none if bag == "none" else _shade(rng, PALETTE[bag]),
        bag_side=int(rng.choice([-1, 1])),
        height=float(np.round(rng.uniform(0.88, 1.0), 4)),
        head=float(np.round(rng.uniform(0.12, 0.14), 4)),
        shoulders=float(np.round(rng.uniform(0.22, 0.3), 4)),
        hips=float(np.round(rng.uniform(0.17, 0.23), 4)),
        legs=float(np.round(rng.uniform(0.45, 0.52), 4)),
        girth=float(np.round(rng.uniform(0.85, 1.2), 4)),
        stride=float(np.round(rng.uniform(0.25, 0.45), 4)),
        arm_swing=float(np.round(rng.uniform(0.15, 0.45), 4)),
    )


def sample_identities(rng: np.random.Generator, n: int, min_differences: int = 2,
                      max_tries: int = 200) -> list[Identity]:
    """``n`` people whose discrete attributes differ pairwise in at least ``min_differences``
    places (rejection sampling), so that the identity is recoverable from the clothes."""
    people: list[Identity] = []
    sigs = np.zeros((0, len(DISCRETE_KEYS)), dtype=object)
    for _ in range(n):
        for _try in range(max_tries):
            cand = sample_identity(rng)
            sig = np.array(cand.discrete(), dtype=object)
            if len(people) == 0 or ((sigs != sig).sum(axis=1) >= min_differences).all():
                break
        people.append(cand)
        sigs = np.vstack([sigs, sig[None]])
    return people


# Distinct looks for the first cameras, so that cameras visibly differ even with few of them;
# later cameras draw their own.
_WB_CASTS = [(1.0, 1.0, 1.0), (1.22, 1.0, 0.72), (0.78, 0.98, 1.28), (0.9, 1.14, 0.82),
             (1.16, 0.86, 1.12), (1.08, 1.06, 0.8)]
_SCENE_COLOURS = {
    "street": ((150, 140, 128), (92, 92, 96)),
    "corridor": ((196, 192, 178), (150, 132, 110)),
    "plaza": ((120, 130, 150), (170, 158, 140)),
    "park": ((120, 150, 110), (90, 120, 60)),
}
# Which views each camera mostly sees (people walk past a camera in one main direction).
_VIEW_BIASES = [(0.55, 0.15, 0.15, 0.15), (0.15, 0.55, 0.15, 0.15), (0.2, 0.2, 0.45, 0.15),
                (0.2, 0.2, 0.15, 0.45)]


def sample_cameras(rng: np.random.Generator, n: int) -> list[Camera]:
    """``n`` cameras that differ visibly from each other."""
    cams = []
    wb_order = rng.permutation(len(_WB_CASTS))
    for i in range(n):
        scene = SCENES[i % len(SCENES)] if i < len(SCENES) else SCENES[int(rng.integers(len(SCENES)))]
        wall, floor = _SCENE_COLOURS[scene]
        if i < len(_WB_CASTS):
            wb = np.array(_WB_CASTS[wb_order[i]]) * rng.uniform(0.95, 1.05, 3)
        else:
            wb = rng.uniform(0.75, 1.25, 3)
        wb = wb / (0.299 * wb[0] + 0.587 * wb[1] + 0.114 * wb[2])  # the cast, not the brightness
        gain = rng.uniform(0.65, 1.35) if i else rng.uniform(0.9, 1.1)
        gamma = rng.uniform(0.7, 1.45)
        if gain > 1.0 and gamma > 1.15:  # both brighten: keep some of the highlights unclipped
            gain = 1.0 + (gain - 1.0) * 0.4
        bias = _VIEW_BIASES[i % len(_VIEW_BIASES)] if i < 2 * len(_VIEW_BIASES) else tuple(rng.dirichlet([2, 2, 2, 2]))
        cams.append(Camera(
            index=i,
            scene=scene,
            wall_rgb=_shade(rng, wall, 0.2, 14.0),
            floor_rgb=_shade(rng, floor, 0.2, 14.0),
            horizon=float(np.round(rng.uniform(0.45, 0.75), 4)),
            texture=float(np.round(rng.uniform(6, 22), 3)),
            clutter=int(rng.integers(2, 9)),
            gain=float(np.round(gain, 4)),
            gamma=float(np.round(gamma, 4)),
            white_balance=tuple(float(np.round(v, 4)) for v in wb),
            saturation=float(np.round(rng.uniform(0.55, 1.2), 4)),
            blur=float(np.round(rng.uniform(0.0, 1.1), 4)),
            motion_blur=int(rng.choice([0, 0, 3, 5])),
            noise=float(np.round(rng.uniform(2.0, 9.0), 3)),
            light=(float(np.round(rng.uniform(-0.5, 0.5), 4)), float(np.round(rng.uniform(-0.4, 0.4), 4))),
            scale=float(np.round(rng.uniform(0.78, 0.95), 4)),
            occlusion=float(np.round(rng.uniform(0.12, 0.35), 4)),
            view_weights=tuple(float(np.round(v, 4)) for v in np.asarray(bias) / np.sum(bias)),
        ))
    return cams
