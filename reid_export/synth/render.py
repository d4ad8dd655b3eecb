"""Drawing synthetic pedestrians, scenes, occluders and camera effects with OpenCV.

Everything is drawn at ``SUPERSAMPLE`` times the output size with sub-pixel coordinates and
anti-aliased polygons, then reduced with ``INTER_AREA``; the camera model (blur, lighting
gradient, gain, white balance, gamma, saturation, sensor noise) is applied at the output size.

A person is drawn in body coordinates: ``y`` from 0 (top of the head) to 1 (soles), ``x``
across, both in units of the person's height, with ``+x`` the person's *left* side.  A
``_Pen`` maps them to pixels (scale, position, lean as a shear about the feet, and a mirror
for back and left-facing views), so one description serves every view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .attributes import OCCLUDERS, VIEWS, Camera, Identity, sample_identity

SUPERSAMPLE = 2
_SHIFT = 3
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA


def bgr(rgb, k: float = 1.0) -> tuple:
    """An RGB tuple as a BGR drawing colour, optionally darkened by ``k``."""
    return (min(255.0, rgb[2] * k), min(255.0, rgb[1] * k), min(255.0, rgb[0] * k))


@dataclass(frozen=True)
class Pose:
    view: str           # front | back | left | right
    phase: float        # walking cycle, radians
    lean: float         # forward/sideways lean (shear), fraction of height per height
    arm: float          # arm swing multiplier for this image


class _Pen:
    """Body coordinates -> pixels, and the drawing primitives in body coordinates."""

    def __init__(self, img: np.ndarray, ox: float, oy: float, s: float, mirror: bool, lean: float):
        self.img, self.ox, self.oy, self.s = img, ox, oy, s
        self.d = -1.0 if mirror else 1.0
        self.lean = lean
        self.dy = 0.0

    def xy(self, x: float, y: float) -> tuple[float, float]:
        y = y + self.dy
        x = x + self.lean * (1.0 - y)
        return self.ox + self.d * x * self.s, self.oy + y * self.s

    def _fix(self, x: float, y: float) -> tuple[int, int]:
        X, Y = self.xy(x, y)
        return int(round(X * _ONE)), int(round(Y * _ONE))

    def poly(self, pts, color) -> None:
        arr = np.array([self._fix(x, y) for x, y in pts], np.int32)
        cv2.fillPoly(self.img, [arr], color, _AA, _SHIFT)

    def ellipse(self, cx, cy, ax, ay, color, angle=0.0, a0=0.0, a1=360.0) -> None:
        if self.d < 0:  # mirror the arc
            a0, a1, angle = 180.0 - a1, 180.0 - a0, -angle
        axes = (max(1, int(round(ax * self.s * _ONE))), max(1, int(round(ay * self.s * _ONE))))
        cv2.ellipse(self.img, self._fix(cx, cy), axes, angle, a0, a1, color, -1, _AA, _SHIFT)

    def circle(self, cx, cy, r, color) -> None:
        cv2.circle(self.img, self._fix(cx, cy), max(1, int(round(r * self.s * _ONE))), color, -1, _AA, _SHIFT)

    def line(self, x0, y0, x1, y1, width, color) -> None:
        t = max(1, int(round(width * self.s)))
        p0 = tuple(int(round(v)) for v in self.xy(x0, y0))
        p1 = tuple(int(round(v)) for v in self.xy(x1, y1))
        cv2.line(self.img, p0, p1, color, t, _AA)

    def limb(self, x0, y0, x1, y1, w0, w1, color, caps=True) -> None:
        """A tapered segment with round ends (arms, legs, straps)."""
        X0, Y0 = self.xy(x0, y0)
        X1, Y1 = self.xy(x1, y1)
        dx, dy = X1 - X0, Y1 - Y0
        n = math.hypot(dx, dy) or 1e-6
        nx, ny = -dy / n, dx / n
        r0, r1 = w0 * self.s / 2, w1 * self.s / 2
        pts = np.array([[X0 + nx * r0, Y0 + ny * r0], [X1 + nx * r1, Y1 + ny * r1],
                        [X1 - nx * r1, Y1 - ny * r1], [X0 - nx * r0, Y0 - ny * r0]])
        cv2.fillPoly(self.img, [np.round(pts * _ONE).astype(np.int32)], color, _AA, _SHIFT)
        if caps:
            for X, Y, r in ((X0, Y0, r0), (X1, Y1, r1)):
                cv2.circle(self.img, (int(round(X * _ONE)), int(round(Y * _ONE))),
                           max(1, int(round(r * _ONE))), color, -1, _AA, _SHIFT)

    def patterned(self, pts, person: Identity, y0: float) -> None:
        """Fill the torso polygon ``pts`` with the top colour and its pattern."""
        self.poly(pts, bgr(person.top_rgb))
        if person.top_pattern not in ("stripes", "checks"):
            return
        h, w = self.img.shape[:2]
        arr = np.array([self._fix(x, y) for x, y in pts], np.int32)
        x0, y0p, bw, bh = cv2.boundingRect(arr // _ONE)
        x0, y0p = max(0, x0 - 1), max(0, y0p - 1)
        x1, y1p = min(w, x0 + bw + 3), min(h, y0p + bh + 3)
        if x1 <= x0 or y1p <= y0p:
            return
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [arr], 255, cv2.LINE_8, _SHIFT)
        layer = self.img.copy()
        pen = _Pen(layer, self.ox, self.oy, self.s, self.d < 0, self.lean)
        pen.dy = self.dy
        col = bgr(person.pattern_rgb)
        period = person.pattern_scale
        ys = [p[1] for p in pts]
        xs = [p[0] for p in pts]
        top, bottom, left, right = min(ys), max(ys), min(xs) - 0.05, max(xs) + 0.05
        y = y0 + period * 0.5
        while y < bottom + period:
            pen.line(left, y, right, y, period * (0.45 if person.top_pattern == "stripes" else 0.28), col)
            y += period
        if person.top_pattern == "checks":
            x = -period * 0.5
            while x > left - period:
                x -= period
            while x < right + period:
                pen.line(x, top - 0.02, x, bottom + 0.02, period * 0.28, col)
                x += period
        roi = (slice(y0p, y1p), slice(x0, x1))
        m = mask[roi] > 0
        self.img[roi][m] = layer[roi][m]


# ------------------------------------------------------------------ the person

def _head(pen: _Pen, p: Identity, view: str) -> None:
    hh = p.head
    skin, hair = bgr(p.skin_rgb), bgr(p.hair_rgb)
    eye = bgr(p.skin_rgb, 0.35)
    bald = p.hair_length == "bald"
    pen.limb(0.0, hh * 0.7, 0.0, hh + 0.03, hh * 0.42, hh * 0.46, bgr(p.skin_rgb, 0.9))  # neck
    if view in ("front", "back"):
        if view == "back" or bald:
            pen.ellipse(0.0, hh * 0.5, hh * 0.4, hh * 0.5, skin if bald else hair)
            if view == "front":
                pen.circle(-hh * 0.14, hh * 0.5, hh * 0.045, eye)
                pen.circle(hh * 0.14, hh * 0.5, hh * 0.045, eye)
            elif not bald:
                pen.ellipse(0.0, hh * 0.62, hh * 0.34, hh * 0.3, bgr(p.hair_rgb, 0.9))
        else:
            pen.ellipse(0.0, hh * 0.47, hh * 0.42, hh * 0.5, hair)
            pen.ellipse(0.0, hh * 0.6, hh * 0.33, hh * 0.4, skin)
            pen.circle(-hh * 0.14, hh * 0.55, hh * 0.045, eye)
            pen.circle(hh * 0.14, hh * 0.55, hh * 0.045, eye)
            pen.ellipse(0.0, hh * 0.8, hh * 0.09, hh * 0.03, bgr(p.skin_rgb, 0.6))
    else:  # profile, facing +x
        pen.ellipse(0.01, hh * 0.5, hh * 0.42, hh * 0.5, skin)
        pen.ellipse(hh * 0.42, hh * 0.6, hh * 0.08, hh * 0.09, skin)  # nose
        if not bald:
            pen.ellipse(-hh * 0.06, hh * 0.45, hh * 0.42, hh * 0.47, hair, 0, 110, 360)
            pen.ellipse(-hh * 0.06, hh * 0.45, hh * 0.42, hh * 0.47, hair, 0, 0, 20)
        pen.circle(hh * 0.26, hh * 0.5, hh * 0.045, eye)
    # hats
    if p.hat != "none":
        hat = bgr(p.hat_rgb)
        if p.hat == "cap":
            pen.ellipse(0.0, hh * 0.42, hh * 0.45, hh * 0.4, hat, 0, 180, 360)
            if view == "front":
                pen.ellipse(0.0, hh * 0.42, hh * 0.5, hh * 0.07, bgr(p.hat_rgb, 0.8))
            elif view in ("left", "right"):
                pen.poly([(0.0, hh * 0.36), (hh * 0.78, hh * 0.42), (hh * 0.7, hh * 0.47), (0.0, hh * 0.46)],
                         bgr(p.hat_rgb, 0.8))
        else:  # beanie
            pen.ellipse(0.0, hh * 0.45, hh * 0.44, hh * 0.45, hat, 0, 180, 360)
            pen.poly([(-hh * 0.45, hh * 0.38), (hh * 0.45, hh * 0.38), (hh * 0.45, hh * 0.5),
                      (-hh * 0.45, hh * 0.5)], bgr(p.hat_rgb, 0.82))


def _hair_long(pen: _Pen, p: Identity, view: str, ys: float) -> None:
    if p.hair_length not in ("medium", "long") or p.hat == "beanie" and p.hair_length == "medium":
        return
    hh = p.head
    hair = bgr(p.hair_rgb)
    end = ys + (0.1 if p.hair_length == "long" else 0.0)
    if view == "back":
        pen.poly([(-hh * 0.4, hh * 0.5), (hh * 0.4, hh * 0.5), (hh * 0.48, end), (0.0, end + 0.015),
                  (-hh * 0.48, end)], hair)
    elif view == "front":
        for side in (-1, 1):
            pen.limb(side * hh * 0.36, hh * 0.45, side * hh * 0.44, end - 0.02, hh * 0.22, hh * 0.18, hair)
    else:
        pen.limb(-hh * 0.22, hh * 0.5, -hh * 0.3, end - 0.01, hh * 0.5, hh * 0.34, hair)


def _logo(pen: _Pen, p: Identity, ys: float) -> None:
    col = bgr(p.pattern_rgb)
    cx, cy, r = 0.0, ys + 0.075, 0.035
    if p.logo_shape == "circle":
        pen.circle(cx, cy, r, col)
    elif p.logo_shape == "square":
        pen.poly([(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)], col)
    elif p.logo_shape == "triangle":
        pen.poly([(cx, cy - r * 1.1), (cx + r * 1.1, cy + r * 0.8), (cx - r * 1.1, cy + r * 0.8)], col)
    else:  # bar
        pen.poly([(cx - r * 1.5, cy - r * 0.4), (cx + r * 1.5, cy - r * 0.4), (cx + r * 1.5, cy + r * 0.4),
                  (cx - r * 1.5, cy + r * 0.4)], col)


def _leg_colours(p: Identity, shade: float):
    """(thigh, shin) colours: trousers cover both, shorts the thigh, a skirt neither."""
    skin, bottom = bgr(p.skin_rgb, shade), bgr(p.bottom_rgb, shade)
    if p.bottom_type == "trousers":
        return bottom, bottom
    if p.bottom_type == "shorts":
        return bottom, skin
    return skin, skin  # skirt: legs bare below it


def _frontal(pen: _Pen, p: Identity, pose: Pose) -> None:
    back = pose.view == "back"
    hh = p.head
    ys = hh + 0.035
    hip = 1.0 - p.legs
    sw, hw, g = p.shoulders, p.hips, p.girth
    ww = min(sw, hw) * 0.95
    waist = ys + (hip - ys) * 0.6
    top = bgr(p.top_rgb)
    skin = bgr(p.skin_rgb)

    # legs
    thigh_c, shin_c = _leg_colours(p, 1.0)
    for i, side in enumerate((-1, 1)):
        a = pose.phase + math.pi * i
        swing = math.sin(a)
        lift = max(0.0, math.cos(a)) * 0.025
        hx = side * hw * 0.26
        fy = 0.975 + 0.012 * swing * (1 if not back else -1) - lift
        fx = side * (hw * 0.22 + 0.004)
        ky = (hip + fy) / 2 - 0.01
        kx = (hx + fx) / 2 + side * 0.004
        pen.limb(kx, ky, fx, fy - 0.02, 0.068 * g, 0.05 * g, shin_c)
        pen.limb(hx, hip + 0.02, kx, ky, 0.095 * g, 0.07 * g, thigh_c)
        if p.bottom_type == "shorts":
            pen.limb(hx, hip + 0.02, kx, ky - 0.03, 0.1 * g, 0.082 * g, bgr(p.bottom_rgb))
        pen.ellipse(fx + side * 0.004, fy - 0.008, 0.035 * g, 0.02, bgr(p.shoes_rgb))
    if p.bottom_type != "skirt":
        pen.poly([(-hw / 2, hip - 0.03), (hw / 2, hip - 0.03), (hw * 0.48, hip + 0.06), (0.0, hip + 0.08),
                  (-hw * 0.48, hip + 0.06)], bgr(p.bottom_rgb))

    # torso
    torso = [(-0.04, ys - 0.018), (-sw / 2 + 0.02, ys - 0.008), (-sw / 2, ys + 0.03), (-ww / 2, waist),
             (-hw / 2 - 0.006, hip + 0.02), (hw / 2 + 0.006, hip + 0.02), (ww / 2, waist), (sw / 2, ys + 0.03),
             (sw / 2 - 0.02, ys - 0.008), (0.04, ys - 0.018)]
    pen.patterned(torso, p, ys - 0.01)
    if p.bottom_type == "skirt":
        pen.poly([(-hw / 2 - 0.004, hip - 0.02), (hw / 2 + 0.004, hip - 0.02), (hw * 0.75, hip + 0.2),
                  (-hw * 0.75, hip + 0.2)], bgr(p.bottom_rgb))
    if not back:
        pen.ellipse(0.0, ys - 0.012, 0.034, 0.022, skin)  # neckline
        if p.top_pattern == "logo":
            _logo(pen, p, ys)
    # accessories on the body
    if p.backpack != "none":
        bp = bgr(p.backpack_rgb)
        if back:
            bw = sw * 0.36
            pen.poly([(-bw, ys + 0.01), (bw, ys + 0.01), (bw * 1.05, ys + 0.23), (-bw * 1.05, ys + 0.23)], bp)
            pen.ellipse(0.0, ys + 0.015, bw, 0.03, bp)
            pen.poly([(-bw * 0.7, ys + 0.14), (bw * 0.7, ys + 0.14), (bw * 0.7, ys + 0.215),
                      (-bw * 0.7, ys + 0.215)], bgr(p.backpack_rgb, 0.75))
        else:
            for side in (-1, 1):
                pen.limb(side * sw * 0.27, ys - 0.006, side * sw * 0.3, ys + 0.16, 0.026, 0.022, bp)
    if p.bag != "none":
        bag = bgr(p.bag_rgb)
        s = p.bag_side
        pen.limb(-s * sw * 0.3, ys - 0.004, s * hw * 0.45, hip - 0.03, 0.018, 0.018, bgr(p.bag_rgb, 0.8))
        bx = s * (hw / 2 + 0.04)
        pen.poly([(bx - 0.05, hip - 0.05), (bx + 0.05, hip - 0.05), (bx + 0.055, hip + 0.06),
                  (bx - 0.055, hip + 0.06)], bag)
    _hair_long(pen, p, pose.view, ys)
    # arms
    for i, side in enumerate((-1, 1)):
        a = pose.phase + math.pi * (1 - i)  # opposite to the leg on the same side
        sw_amt = abs(p.arm_swing * pose.arm * math.sin(a))
        shx, shy = side * (sw / 2 - 0.028), ys + 0.022
        ex, ey = side * (sw / 2 + 0.004 + 0.01 * sw_amt), shy + 0.16 * (1 - 0.12 * sw_amt)
        hx, hy = side * (sw / 2 + 0.004 + 0.03 * sw_amt), ey + 0.15 * (1 - 0.2 * sw_amt)
        pen.limb(ex, ey, hx, hy, 0.05 * g, 0.04 * g, skin)
        pen.limb(shx, shy, ex, ey, 0.066 * g, 0.054 * g, skin)
        if p.sleeves == "long":
            pen.limb(shx, shy, ex, ey, 0.068 * g, 0.058 * g, top)
            pen.limb(ex, ey, hx + (ex - hx) * 0.15, hy + (ey - hy) * 0.15, 0.058 * g, 0.046 * g, top)
        else:
            pen.limb(shx, shy, shx + (ex - shx) * 0.55, shy + (ey - shy) * 0.55, 0.074 * g, 0.068 * g, top)
        pen.circle(hx, hy + 0.008, 0.024 * g, bgr(p.skin_rgb, 0.92))
    _head(pen, p, pose.view)


def _profile(pen: _Pen, p: Identity, pose: Pose) -> None:
    """Side view, facing +x (the pen mirrors it for a person walking left)."""
    hh = p.head
    ys = hh + 0.035
    hip = 1.0 - p.legs
    g = p.girth
    D = p.shoulders * 0.58 * (0.85 + 0.15 * g)
    waist = ys + (hip - ys) * 0.6
    near = -1 if pose.view == "right" else 1  # the person's side that faces the camera
    lt, ls = p.legs * 0.5, p.legs * 0.5 - 0.03

    legs = []
    for i in range(2):
        a = pose.phase + math.pi * i
        th = p.stride * math.sin(a)
        bend = 1.3 * p.stride * max(0.0, math.cos(a))
        kx, ky = lt * math.sin(th), hip + lt * math.cos(th)
        ph = th - bend
        ax, ay = kx + ls * math.sin(ph), ky + ls * math.cos(ph)
        legs.append((kx, ky, ax, ay))
    pen.dy = 0.975 - max(l[3] for l in legs)

    def leg(k, shade):
        kx, ky, ax, ay = legs[k]
        thigh_c, shin_c = _leg_colours(p, shade)
        pen.ellipse(ax + 0.025, ay + 0.006, 0.045, 0.02, bgr(p.shoes_rgb, shade))
        pen.limb(kx, ky, ax, ay, 0.068 * g, 0.05 * g, shin_c)
        pen.limb(0.0, hip + 0.02, kx, ky, 0.1 * g, 0.07 * g, thigh_c)
        if p.bottom_type == "shorts":
            pen.limb(0.0, hip + 0.02, kx * 0.8, hip + (ky - hip) * 0.8, 0.105 * g, 0.085 * g,
                     bgr(p.bottom_rgb, shade))

    def arm(k, shade):
        a = pose.phase + math.pi * k
        al = -p.arm_swing * pose.arm * math.sin(a)
        shx, shy = 0.0, ys + 0.03
        ex, ey = shx + 0.16 * math.sin(al), shy + 0.16 * math.cos(al)
        be = al + 0.25 + 0.3 * max(0.0, al)
        hx, hy = ex + 0.15 * math.sin(be), ey + 0.15 * math.cos(be)
        skin, top = bgr(p.skin_rgb, shade), bgr(p.top_rgb, shade)
        pen.limb(ex, ey, hx, hy, 0.05 * g, 0.04 * g, skin)
        pen.limb(shx, shy, ex, ey, 0.066 * g, 0.054 * g, skin)
        if p.sleeves == "long":
            pen.limb(shx, shy, ex, ey, 0.07 * g, 0.058 * g, top)
            pen.limb(ex, ey, hx + (ex - hx) * 0.15, hy + (ey - hy) * 0.15, 0.058 * g, 0.046 * g, top)
        else:
            pen.limb(shx, shy, shx + (ex - shx) * 0.55, shy + (ey - shy) * 0.55, 0.076 * g, 0.07 * g, top)
        pen.circle(hx, hy + 0.006, 0.024 * g, bgr(p.skin_rgb, shade * 0.92))

    def bag(shade, visible):
        if p.bag == "none":
            return
        if visible:
            pen.limb(D * 0.3, ys - 0.004, -0.01, hip - 0.04, 0.018, 0.018, bgr(p.bag_rgb, 0.8 * shade))
            pen.poly([(-0.06, hip - 0.06), (0.04, hip - 0.06), (0.045, hip + 0.06), (-0.065, hip + 0.06)],
                     bgr(p.bag_rgb, shade))
        else:
            pen.poly([(-0.08, hip - 0.055), (-0.0, hip - 0.055), (0.0, hip + 0.05), (-0.085, hip + 0.05)],
                     bgr(p.bag_rgb, 0.75))

    arm(1, 0.75)
    leg(1, 0.78)
    if p.backpack != "none":
        bp = bgr(p.backpack_rgb)
        pen.poly([(-D / 2 - 0.085, ys + 0.03), (-D / 2 + 0.01, ys + 0.0), (-D / 2 + 0.01, ys + 0.24),
                  (-D / 2 - 0.09, ys + 0.23)], bp)
        pen.ellipse(-D / 2 - 0.04, ys + 0.025, 0.05, 0.03, bp)
    if p.bag != "none" and p.bag_side != near:
        bag(0.75, False)  # a bag on the far side peeks out behind
    if p.bottom_type != "skirt":
        pen.ellipse(0.0, hip + 0.02, D * 0.5, 0.06, bgr(p.bottom_rgb))
    torso = [(-D * 0.3, ys - 0.02), (-D / 2, ys + 0.04), (-D / 2 + 0.01, waist), (-D / 2, hip + 0.02),
             (D / 2 - 0.005, hip + 0.02), (D / 2 * 0.92, waist), (D / 2 + 0.006, ys + 0.08), (D * 0.3, ys - 0.015)]
    pen.patterned(torso, p, ys - 0.01)
    if p.backpack != "none":
        pen.limb(D * 0.2, ys - 0.005, D * 0.3, ys + 0.15, 0.022, 0.02, bgr(p.backpack_rgb, 0.85))
    leg(0, 1.0)
    if p.bottom_type == "skirt":
        pen.poly([(-D / 2 - 0.005, hip - 0.02), (D / 2 + 0.005, hip - 0.02), (D / 2 + 0.06, hip + 0.2),
                  (-D / 2 - 0.05, hip + 0.2)], bgr(p.bottom_rgb))
    if p.bag != "none" and p.bag_side == near:
        bag(1.0, True)
    _hair_long(pen, p, pose.view, ys)
    arm(0, 1.0)
    _head(pen, p, pose.view)


def draw_person(img: np.ndarray, p: Identity, pose: Pose, cx: float, top: float, height: float) -> None:
    """Draw ``p`` in ``pose`` into ``img`` (BGR uint8, drawn in place): centred at column
    ``cx``, head at row ``top``, ``height`` pixels tall (any of it may fall outside)."""
    mirror = pose.view in ("back", "left")
    pen = _Pen(img, cx, top, height, mirror, pose.lean)
    if pose.view in ("front", "back"):
        _frontal(pen, p, pose)
    else:
        _profile(pen, p, pose)


# ------------------------------------------------------------------ scenes

def _noise_field(rng: np.random.Generator, h: int, w: int, cell: int, amp: float) -> np.ndarray:
    """Smooth noise, mostly in brightness with a little colour."""
    small = rng.standard_normal((h // cell + 2, w // cell + 2, 3)).astype(np.float32)
    small = small[:, :, :1] + 0.3 * small
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * amp


def _muted(rng: np.random.Generator, base=None) -> tuple:
    if base is None:
        c = rng.uniform(40, 210, 3)
        c = 0.5 * c + 0.5 * c.mean()
    else:
        c = np.asarray(base, float) * rng.uniform(0.6, 1.3) + rng.normal(0, 20, 3)
    return tuple(float(v) for v in np.clip(c, 0, 255))


def render_background(rng: np.random.Generator, cam: Camera, h: int, w: int) -> np.ndarray:
    """A textured scene for ``cam``: wall/floor with a horizon, scene structures, clutter."""
    hz = int(h * np.clip(cam.horizon + rng.normal(0, 0.04), 0.3, 0.85))
    wall = np.array(bgr(cam.wall_rgb), np.float32) * rng.uniform(0.85, 1.15)
    floor = np.array(bgr(cam.floor_rgb), np.float32) * rng.uniform(0.85, 1.15)
    img = np.empty((h, w, 3), np.float32)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img[:hz] = wall * (1.08 - 0.16 * t[:hz] * h / max(hz, 1))
    th = float(t[hz, 0, 0])
    img[hz:] = floor * (0.9 + 0.2 * (t[hz:] - th) / max(1e-3, 1.0 - th))
    img += _noise_field(rng, h, w, 24, cam.texture * 1.3)
    img += _noise_field(rng, h, w, 4, cam.texture * 0.5)
    img = np.clip(img, 0, 255).astype(np.uint8)

    if cam.scene == "street":
        for _ in range(int(rng.integers(1, 4))):  # windows / shop fronts
            x = int(rng.integers(-w // 4, w)); y = int(rng.integers(0, max(1, hz - h // 6)))
            ww, wh = int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 10, h // 4))
            cv2.rectangle(img, (x, y), (x + ww, min(hz, y + wh)), _muted(rng, (70, 80, 90)), -1, _AA)
            cv2.rectangle(img, (x, y), (x + ww, min(hz, y + wh)), _muted(rng, (200, 200, 200)), 2, _AA)
        cv2.line(img, (0, hz), (w, hz), _muted(rng, (60, 60, 60)), int(rng.integers(2, 6)), _AA)  # kerb
        y = hz + int(rng.integers(h // 10, h // 4))
        cv2.line(img, (0, y), (w, y + int(rng.integers(-8, 9))), _muted(rng, (210, 210, 200)), 3, _AA)
    elif cam.scene == "corridor":
        vx = int(w * rng.uniform(0.2, 0.8))
        for k in range(-3, 5):
            cv2.line(img, (vx, hz), (vx + k * w // 2, h), _muted(rng, floor * 0.7), 1, _AA)
        y = hz
        step = max(2, h // 40)
        while y < h:
            cv2.line(img, (0, y), (w, y), _muted(rng, floor * 0.7), 1, _AA)
            step = int(step * 1.5) + 1
            y += step
        for _ in range(int(rng.integers(1, 3))):  # doors / panels
            x = int(rng.integers(0, w)); dw = int(rng.integers(w // 8, w // 3))
            cv2.rectangle(img, (x, int(hz * rng.uniform(0.1, 0.4))), (x + dw, hz), _muted(rng, wall * 0.7), -1, _AA)
        cv2.rectangle(img, (int(w * rng.uniform(0, 0.6)), 0), (int(w * rng.uniform(0.6, 1.0)), h // 40 + 2),
                      (250, 250, 250), -1)  # ceiling light
    elif cam.scene == "plaza":
        for k in range(int(rng.integers(2, 6))):  # facade mullions
            x = int(rng.integers(0, w))
            cv2.line(img, (x, 0), (x, hz), _muted(rng, wall * 0.6), int(rng.integers(2, 5)), _AA)
        pitch = int(rng.integers(h // 20, h // 10)) + 2
        y = hz
        while y < h:
            cv2.line(img, (0, y), (w, y), _muted(rng, floor * 0.75), 1, _AA)
            y += pitch
        x0 = int(rng.integers(0, pitch * 2))
        for x in range(x0, w, pitch * 2):
            cv2.line(img, (x, hz), (x + int((x - w / 2) * 0.5), h), _muted(rng, floor * 0.75), 1, _AA)
    else:  # park
        for _ in range(int(rng.integers(1, 4))):  # trees
            x = int(rng.integers(0, w)); tw = int(rng.integers(4, w // 10 + 5))
            cv2.rectangle(img, (x, int(hz * rng.uniform(0.2, 0.6))), (x + tw, hz + 4), _muted(rng, (40, 60, 90)), -1, _AA)
            cv2.ellipse(img, (x + tw // 2, int(hz * rng.uniform(0.05, 0.35))),
                        (int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 12, h // 5))), 0, 0, 360,
                        _muted(rng, (50, 110, 60)), -1, _AA)
    # clutter: signs, bins, bikes, posters, far-away people
    for _ in range(int(rng.poisson(cam.clutter))):
        kind = rng.integers(4)
        col = _muted(rng)
        x, y = int(rng.integers(-w // 4, w)), int(rng.integers(0, h))
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(4, w // 3)), y + int(rng.integers(4, h // 5))), col, -1, _AA)
        elif kind == 1:
            cv2.circle(img, (x, y), int(rng.integers(3, w // 6)), col, -1, _AA)
        elif kind == 2:
            cv2.line(img, (x, y), (x + int(rng.integers(-w // 2, w // 2)), y + int(rng.integers(-h // 4, h // 4))),
                     col, int(rng.integers(1, 5)), _AA)
        else:
            fh = int(h * rng.uniform(0.15, 0.35))
            yy = int(hz + rng.uniform(-0.05, 0.1) * h)
            cv2.ellipse(img, (x, yy - fh // 2), (max(2, fh // 7), fh // 2), 0, 0, 360, col, -1, _AA)
            cv2.circle(img, (x, yy - fh - fh // 10), max(2, fh // 10), _muted(rng, (60, 80, 120)), -1, _AA)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 1.6))  # out of focus
    return img


# ------------------------------------------------------------------ occluders

def draw_occluder(img: np.ndarray, rng: np.random.Generator, kind: str, person_cx: float) -> None:
    """Something between the camera and the person: a pole, a car, another person, a block."""
    h, w = img.shape[:2]
    if kind == "pole":
        x = person_cx + rng.uniform(-0.3, 0.3) * w
        pw = rng.uniform(0.05, 0.12) * w
        col = np.array(_muted(rng, (120, 120, 125)))
        pts = np.array([[x - pw / 2, -1], [x + pw / 2, -1], [x + pw / 2, h + 1], [x - pw / 2, h + 1]])
        cv2.fillPoly(img, [np.round(pts * _ONE).astype(np.int32)], tuple(col), _AA, _SHIFT)
        hl = np.array([[x - pw / 6, -1], [x, -1], [x, h + 1], [x - pw / 6, h + 1]])
        cv2.fillPoly(img, [np.round(hl * _ONE).astype(np.int32)], tuple(np.minimum(255, col * 1.35)), _AA, _SHIFT)
    elif kind == "car":
        top = int(h * rng.uniform(0.55, 0.78))
        x0 = int(rng.uniform(-0.5, 0.2) * w)
        x1 = int(rng.uniform(0.8, 1.5) * w)
        col = _muted(rng)
        cv2.rectangle(img, (x0, top + h // 12), (x1, h + 10), col, -1, _AA)
        cv2.ellipse(img, ((x0 + x1) // 2, top + h // 12), ((x1 - x0) // 2, h // 12), 0, 180, 360, col, -1, _AA)
        cv2.rectangle(img, (x0 + w // 10, top + h // 30), (x1 - w // 10, top + h // 11), (40, 35, 30), -1, _AA)
        cv2.line(img, (x0, top + h // 6), (x1, top + h // 6), tuple(c * 0.7 for c in col), 2, _AA)
        for wx in (x0 + w // 5, x1 - w // 5):
            cv2.circle(img, (wx, h), h // 12, (25, 25, 25), -1, _AA)
    elif kind == "person":
        other = sample_identity(rng)
        view = VIEWS[int(rng.integers(4))]
        pose = Pose(view, rng.uniform(0, 2 * math.pi), rng.normal(0, 0.02), rng.uniform(0.6, 1.2))
        side = rng.choice([-1, 1])
        cx = person_cx + side * w * rng.uniform(0.4, 0.65)
        height = h * rng.uniform(1.05, 1.35)
        draw_person(img, other, pose, cx, h * rng.uniform(0.0, 0.35) - height * 0.1, height)
    else:  # block: a sign, a bin, a box
        bw, bh = rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.4) * h
        x = person_cx + rng.uniform(-0.6, 0.2) * w
        y = h * rng.uniform(0.5, 1.0) - bh * rng.uniform(0.2, 1.0)
        col = _muted(rng)
        cv2.rectangle(img, (int(x), int(y)), (int(x + bw), int(y + bh)), col, -1, _AA)
        cv2.rectangle(img, (int(x), int(y)), (int(x + bw), int(y + bh)), tuple(c * 0.6 for c in col), 2, _AA)


# ------------------------------------------------------------------ the camera

_GRIDS: dict = {}


def _grid(h: int, w: int):
    if (h, w) not in _GRIDS:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        _GRIDS[(h, w)] = (xx / max(1, w - 1) - 0.5, yy / max(1, h - 1) - 0.5)
    return _GRIDS[(h, w)]


def apply_camera(img: np.ndarray, cam: Camera, rng: np.random.Generator, extra_blur: float = 0.0) -> np.ndarray:
    """Image formation of ``cam`` on an output-size BGR uint8 image."""
    h, w = img.shape[:2]
    x = img.astype(np.float32) * (1.0 / 255.0)
    sigma = cam.blur * rng.uniform(0.8, 1.2) + extra_blur
    if sigma > 0.25:
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    if cam.motion_blur:
        k = np.full((1, cam.motion_blur), 1.0 / cam.motion_blur, np.float32)
        x = cv2.filter2D(x, -1, k, borderType=cv2.BORDER_REFLECT)
    gx, gy = _grid(h, w)
    light = 1.0 + cam.light[0] * gx + cam.light[1] * gy
    gain = cam.gain * rng.uniform(0.9, 1.1)
    wb = np.array(cam.white_balance[::-1], np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    x *= (light * gain)[:, :, None]
    x *= wb
    np.clip(x, 0.0, 1.0, out=x)
    x **= 1.0 / cam.gamma
    grey = x.mean(axis=2, keepdims=True)
    x = grey + cam.saturation * (x - grey)
    x *= 255.0
    x += rng.normal(0.0, cam.noise, x.shape).astype(np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ whole images

def sample_pose(rng: np.random.Generator, cam: Camera) -> Pose:
    p = np.asarray(cam.view_weights, float)
    view = VIEWS[int(rng.choice(4, p=p / p.sum()))]
    return Pose(view, float(rng.uniform(0, 2 * math.pi)), float(rng.normal(0, 0.02)), float(rng.uniform(0.6, 1.25)))


def render_image(rng: np.random.Generator, cam: Camera, size: tuple[int, int], person: Identity | None,
                 kind: str = "person") -> tuple[np.ndarray, dict]:
    """One output image (BGR uint8, ``size`` = (H, W)) and what was drawn.

    ``kind``: ``person`` (a normal detection), ``background`` (a false alarm: scene only),
    ``fragment`` (a badly cropped part of a person), ``tiny`` (a far-away, blurred person).
    """
    H, W = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    img = render_background(rng, cam, H, W)
    info: dict = {"kind": kind}
    extra_blur = 0.0
    if kind != "background":
        pose = sample_pose(rng, cam)
        scale = cam.scale * person.height * rng.uniform(0.93, 1.07)
        foot = H * (0.985 + rng.normal(0, 0.02))
        cx = W * (0.5 + rng.uniform(-0.12, 0.12))
        if kind == "person" and rng.random() < 0.12:  # a badly centred detection box
            if rng.random() < 0.5:
                foot += H * rng.uniform(0.08, 0.2)
            else:
                cx += W * rng.choice([-1, 1]) * rng.uniform(0.18, 0.3)
        if kind == "fragment":
            scale *= rng.uniform(1.8, 3.0)
            foot = H * rng.uniform(1.0, 2.2)
            cx = W * rng.uniform(0.2, 0.8)
        elif kind == "tiny":
            scale *= rng.uniform(0.3, 0.5)
            foot = H * rng.uniform(0.5, 0.95)
            extra_blur = rng.uniform(0.8, 2.0)
        height = H * scale
        draw_person(img, person, pose, cx, foot - height, height)
        info["view"] = pose.view
        if kind == "person" and rng.random() < cam.occlusion:
            occ = OCCLUDERS[int(rng.integers(len(OCCLUDERS)))]
            draw_occluder(img, rng, occ, cx)
            info["occluder"] = occ
    small = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return apply_camera(small, cam, rng, extra_blur), info
