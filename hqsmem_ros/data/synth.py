"""Synthetic video scenes with exact ground truth, for tests and benchmarks without a dataset.

Textured objects (ellipses, star polygons, blobs filled with noise, stripes, checker or
gradient textures) move over a procedural background that pans slowly. Objects translate,
scale, rotate, occlude each other (the label map holds the visible part, later objects on
top), leave the view and come back (the id is then missing from the label), or split into two
pieces that drift apart (both keep the id). The "identity" family tests who is who: look-alike
objects (one hue, one texture kind) cross each other's path, the smaller passing behind the
larger, and one of them stays fully hidden behind an unlabelled pillar for 30+ frames before it
comes out on the other side. Frames carry a slow illumination change and sensor
noise, so a flow + colour tracker has texture to follow but no exact pixel copies.

Everything is drawn from a numpy Generator seeded from (seed, scenario, size, object count,
length): the same arguments give the same frames, and frames are produced one at a time by
`iter_frames`, so sequences of any length fit in constant memory.
"""
from __future__ import annotations

import colorsys
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from hqsmem_ros.eval.davis_io import DataError, write_frame, write_label

SCENARIOS = ("translate_scale", "rotate_occlude", "leave_reenter", "split", "many_objects", "identity", "mixed")

# The suite written by `write_suite`: (scenario, frames, objects). About 280 frames in all.
SUITE = (
    ("translate_scale", 60, 3),
    ("rotate_occlude", 60, 3),
    ("leave_reenter", 70, 2),
    ("split", 50, 2),
    ("many_objects", 40, 9),
    ("identity", 100, 3),
)

_BACKGROUND_PAD = 48  # background margin the view pans over, pixels
_MAX_PERIOD = 200  # frames; motions repeat at most this slowly, so long sequences stay lively

# Pose of an object at frame t: centre x, y (pixels), scale (<= 1, relative to the sprite),
# rotation (degrees), separation of split pieces (sprite pixels).
Pose = Tuple[float, float, float, float, float]


# ---------------------------------------------------------------------------------------------
# Procedural textures


def _fractal_noise(rng: np.random.Generator, height: int, width: int, cells: Sequence[int]) -> np.ndarray:
    """Smooth value noise in [0, 1]: random grids upsampled with cubic interpolation, summed."""
    total = np.zeros((height, width), np.float32)
    weight_sum = 0.0
    for octave, cell in enumerate(cells):
        grid = rng.random((height // cell + 3, width // cell + 3), dtype=np.float32)
        up = cv2.resize(grid, (grid.shape[1] * cell, grid.shape[0] * cell), interpolation=cv2.INTER_CUBIC)
        weight = 0.55 ** octave
        total += weight * up[:height, :width]
        weight_sum += weight
    total /= weight_sum
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255.0


def _mix(a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return a[None, None, :] * (1.0 - weight[..., None]) + b[None, None, :] * weight[..., None]


def _object_texture(rng: np.random.Generator, size: int, hue: float, kind: Optional[int] = None) -> np.ndarray:
    """A saturated two-colour texture with fine grain (so optical flow has something to follow).

    `kind` (0..3) forces the texture type and narrows the colour draws (look-alike objects share
    one kind); None draws it."""
    if kind is None:
        c1 = _hsv(hue, rng.uniform(0.55, 0.9), rng.uniform(0.55, 0.95))
        c2 = _hsv(hue + rng.uniform(-0.08, 0.08), rng.uniform(0.5, 0.95), rng.uniform(0.25, 0.6))
    else:
        c1 = _hsv(hue, rng.uniform(0.7, 0.8), rng.uniform(0.7, 0.8))
        c2 = _hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.7, 0.8), rng.uniform(0.35, 0.45))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    drawn = rng.integers(4)
    kind = drawn if kind is None else kind
    if kind == 0:  # blotchy noise
        weight = _fractal_noise(rng, size, size, (max(size // 4, 2), max(size // 8, 2), 3))
    elif kind == 1:  # soft stripes
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 14)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
        weight = 0.5 + 0.5 * np.sin(phase)
    elif kind == 2:  # checker
        cell = int(rng.integers(6, 13))
        weight = (((xx // cell) + (yy // cell)) % 2).astype(np.float32) * 0.85 + 0.075
    else:  # gradient with spots
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xx * math.cos(angle) + yy * math.sin(angle)) / size
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        spots = _fractal_noise(rng, size, size, (5, 3)) > 0.7
        weight = np.clip(ramp + 0.5 * spots, 0, 1)
    texture = _mix(c1, c2, weight.astype(np.float32))
    grain = (_fractal_noise(rng, size, size, (3, 2)) - 0.5) * 40.0
    return np.clip(texture + grain[..., None], 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int, hue: float) -> np.ndarray:
    """Muted, textured background: fractal noise between two dull colours plus soft panels."""
    c1 = _hsv(hue, rng.uniform(0.08, 0.3), rng.uniform(0.35, 0.55))
    c2 = _hsv(hue + rng.uniform(-0.05, 0.05), rng.uniform(0.05, 0.25), rng.uniform(0.6, 0.8))
    image = _mix(c1, c2, _fractal_noise(rng, height, width, (96, 48, 24, 12, 6)))
    panels = np.zeros((height, width), np.float32)
    for _ in range(8):  # large shaded rectangles: edges and structure like a real scene
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 10, width // 3)), int(rng.integers(height // 10, height // 3))
        cv2.rectangle(panels, (x0, y0), (x0 + w, y0 + h), float(rng.uniform(-25, 25)), -1)
    panels = cv2.GaussianBlur(panels, (0, 0), 2.0)
    grain = (_fractal_noise(rng, height, width, (4, 2)) - 0.5) * 24.0
    return np.clip(image + (panels + grain)[..., None], 0, 255).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Shapes and objects


def _shape_polygon(rng: np.random.Generator, radius: float) -> np.ndarray:
    """Closed outline (K x 2, centred at 0) of an ellipse, a star-convex polygon or a blob."""
    kind = rng.integers(3)
    if kind == 0:
        theta = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        a, b = radius, radius * rng.uniform(0.55, 0.9)
        tilt = rng.uniform(0, math.pi)
        x, y = a * np.cos(theta), b * np.sin(theta)
        pts = np.stack([x * math.cos(tilt) - y * math.sin(tilt), x * math.sin(tilt) + y * math.cos(tilt)], 1)
    elif kind == 1:
        n = int(rng.integers(5, 10))
        theta = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = radius * rng.uniform(0.6, 1.0, n)
        pts = np.stack([r * np.cos(theta), r * np.sin(theta)], 1)
    else:
        theta = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        r = np.ones_like(theta)
        for k in range(2, 5):
            r += rng.uniform(0.05, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
        pts = np.stack([r * np.cos(theta), r * np.sin(theta)], 1) * (radius / r.max())
    return pts.astype(np.float32)


@dataclass
class _Part:
    colour: np.ndarray  # S x S x 3 float32, premultiplied by alpha
    alpha: np.ndarray  # S x S float32 in [0, 1]
    direction: np.ndarray  # unit vector (sprite frame) the piece moves along when split


@dataclass
class _SceneObject:
    obj_id: int
    parts: List[_Part]
    sprite_size: int
    pose: Callable[[int], Pose]
    z: float = 0.0


def _make_parts(rng: np.random.Generator, radius: float, hue: float, split: bool,
                texture_kind: Optional[int] = None) -> Tuple[List[_Part], int]:
    """Sprites of one object at its largest size; a split object is cut into two halves."""
    size = 2 * int(math.ceil(radius)) + 5
    centre = (size - 1) / 2.0
    outline = _shape_polygon(rng, radius) + centre
    mask = np.zeros((size, size), np.uint8)
    # Subpixel outline (shift 4) with antialiasing gives soft, realistic edges.
    cv2.fillPoly(mask, [np.round(outline * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    alpha = mask.astype(np.float32) / 255.0
    colour = _object_texture(rng, size, hue, texture_kind) * alpha[..., None]
    if not split:
        return [_Part(colour, alpha, np.zeros(2, np.float32))], size
    angle = rng.uniform(0, math.pi)
    normal = np.array([math.cos(angle), math.sin(angle)], np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    side = ((xx - centre) * normal[0] + (yy - centre) * normal[1]) >= 0
    parts = []
    for keep, direction in ((side, normal), (~side, -normal)):
        # The halves partition the pixels, so before the split they add up to the whole object.
        parts.append(_Part(colour * keep[..., None], alpha * keep, direction))
    return parts, size


def _split_schedule(t: int, start: float, ramp: float, period: float) -> float:
    """Separation of split pieces in [0, 1]: apart from `start` over `ramp` frames, held two
    periods, then rejoining; repeats every four periods (long sequences split again and again)."""
    phase = t % (4 * period)
    rise = (phase - start) / ramp
    fall = (start + 2 * period + ramp - phase) / ramp
    return min(max(min(rise, fall), 0.0), 1.0)


def _oscillate(t: int, period: float, phase: float) -> float:
    return math.sin(2 * math.pi * t / period + phase)


def _mover(rng, width, height, reach, period, cx=None, cy=None, ax=None, ay=None, scale=(0.8, 0.12), spin=0.0):
    """Pose function of a smooth, bounded motion (sum of sinusoids) that stays in view."""
    cx = width / 2 if cx is None else cx
    cy = height / 2 if cy is None else cy
    ax = max(min(cx - reach, width - reach - cx), 0) if ax is None else ax
    ay = max(min(cy - reach, height - reach - cy), 0) if ay is None else ay
    px, py, ps = period * rng.uniform(0.8, 1.3), period * rng.uniform(0.7, 1.2), period * rng.uniform(0.5, 1.0)
    fx, fy, fs = rng.uniform(0, 2 * math.pi, 3)
    angle0 = rng.uniform(0, 360)
    base, swing = scale

    def pose(t: int) -> Pose:
        return (cx + ax * _oscillate(t, px, fx), cy + ay * _oscillate(t, py, fy),
                base + swing * _oscillate(t, ps, fs), angle0 + spin * t, 0.0)

    return pose


# ---------------------------------------------------------------------------------------------
# Scenarios


def _scenario_seed(seed: int, scenario: str, size: Tuple[int, int], frames: int, n_objects: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(scenario.encode()), size[0], size[1], frames, n_objects])


# Over 80 lines on purpose: one branch per scenario in one place, because the order of the random
# draws defines every synthetic sequence (and the figures measured on them).
def _build_scene(rng: np.random.Generator, scenario: str, width: int, height: int, frames: int, n_objects: int) -> List[_SceneObject]:
    short = min(width, height)
    period = float(min(max(frames, 40), _MAX_PERIOD))
    bg_hue = rng.uniform(0, 1)
    # Object hues kept at least ~70 degrees from the background hue.
    hues = (bg_hue + rng.uniform(0.2, 0.8, n_objects)) % 1.0
    objects: List[_SceneObject] = []

    def add(radius: float, pose, split: bool = False, z: Optional[float] = None,
            texture_kind: Optional[int] = None) -> None:
        idx = len(objects)
        parts, sprite_size = _make_parts(rng, radius, hues[idx], split, texture_kind)
        objects.append(_SceneObject(idx + 1, parts, sprite_size, pose, float(idx if z is None else z)))

    big, small = 0.13 * short, 0.05 * short

    if scenario == "translate_scale":
        for _ in range(n_objects):
            # Scale swings between about 0.4 and 1.0 of the sprite: a 2.5x size change.
            add(big, _mover(rng, width, height, big * 0.85, period, scale=(0.7, 0.3), spin=rng.uniform(-0.5, 0.5)))
    elif scenario == "rotate_occlude":
        amp = width * 0.3
        fixed = [
            # Two objects sweep through each other horizontally, rotating in opposite senses.
            lambda t, a0=rng.uniform(0, 360): (width / 2 - amp * math.cos(2 * math.pi * t / period), height * 0.47,
                                                0.85, a0 + 4.0 * t, 0.0),
            lambda t, a0=rng.uniform(0, 360): (width / 2 + amp * math.cos(2 * math.pi * t / period), height * 0.53,
                                                0.85, a0 - 3.0 * t, 0.0),
            # A third one crosses vertically, between the two in depth.
            lambda t, a0=rng.uniform(0, 360): (width * 0.5 + 0.1 * width * math.sin(2 * math.pi * t / period),
                                                height / 2 - height * 0.3 * math.cos(2 * math.pi * t / (period / 2)),
                                                0.75, a0 + 6.0 * t, 0.0),
        ]
        z_order = [0.0, 2.0, 1.0]
        for k in range(n_objects):
            if k < len(fixed):
                add(big * 0.9, fixed[k], z=z_order[k])
            else:
                add(small * 1.5, _mover(rng, width, height, small * 1.5, period, spin=rng.uniform(-5, 5)))
    elif scenario == "leave_reenter":
        reach = big
        amp = 1.1 * (width / 2 + reach)  # out of view about a quarter of the time, twice

        def leaver(t: int, a0=rng.uniform(0, 360)) -> Pose:
            return (width / 2 + amp * math.sin(2 * math.pi * t / period), height * 0.35, 0.9, a0 + 1.5 * t, 0.0)

        add(reach, leaver)
        for _ in range(n_objects - 1):
            add(big * 0.8, _mover(rng, width, height, big * 0.8, period, cy=height * 0.7, ay=height * 0.12,
                                  spin=rng.uniform(-2, 2)), z=-1.0)
    elif scenario == "split":
        ramp = max(period * 0.25, 4.0)
        t_split = 0.35 * period
        gap = 0.45 * big  # each piece moves this far (sprite pixels) along the cut normal
        base = _mover(rng, width, height, big * 1.5, period, scale=(0.85, 0.05), spin=0.8)

        def splitter(t: int) -> Pose:
            x, y, s, a, _ = base(t)
            x = width * 0.5 + (x - width * 0.5) * 0.4  # stay central so both pieces remain in view
            return (x, y, s, a, gap * _split_schedule(t, t_split, ramp, period))

        add(big, splitter, split=True)
        for _ in range(n_objects - 1):
            add(big * 0.6, _mover(rng, width, height, big * 0.6, period, spin=rng.uniform(-3, 3)))
    elif scenario == "many_objects":
        cols = int(math.ceil(math.sqrt(n_objects * width / height)))
        rows = int(math.ceil(n_objects / cols))
        cell_w, cell_h = width / cols, height / rows
        for k in range(n_objects):
            r, c = divmod(k, cols)
            cx = (c + 0.5) * cell_w + rng.uniform(-0.1, 0.1) * cell_w
            cy = (r + 0.5) * cell_h + rng.uniform(-0.1, 0.1) * cell_h
            # Moves about half a cell: neighbours meet and overlap now and then.
            add(small * 1.4, _mover(rng, width, height, small, period, cx=cx, cy=cy, ax=cell_w * 0.45,
                                    ay=cell_h * 0.4, scale=(0.85, 0.1), spin=rng.uniform(-4, 4)))
    elif scenario == "identity":
        _identity_scene(rng, add, objects, hues, width, height, period, big, small)
    elif scenario == "mixed":
        # One of each behaviour, then generic movers: for long soak runs.
        amp = 1.6 * (width / 2 + big)
        add(big, _mover(rng, width, height, big * 0.85, period, scale=(0.7, 0.3), spin=1.0))
        if n_objects > 1:
            add(big * 0.8, lambda t: (width / 2 + amp * math.sin(2 * math.pi * t / period), height * 0.3, 0.9, 2.0 * t, 0.0), z=5.0)
        if n_objects > 2:
            base = _mover(rng, width, height, big * 1.6, period, scale=(0.8, 0.05), spin=-1.0)
            ramp = max(period * 0.25, 4.0)
            add(big, lambda t: base(t)[:4] + (0.45 * big * _split_schedule(t, period, ramp, period),), split=True)
        for _ in range(n_objects - len(objects)):
            add(small * 1.5, _mover(rng, width, height, small * 1.5, period, spin=rng.uniform(-5, 5)))
    else:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    return sorted(objects, key=lambda o: o.z)  # drawing order: later on top


# The identity scene: the pillar covers x in PILLAR_X (fractions of the width), full height; the
# hidden object rests behind its middle over HIDE (fractions of the motion period).
PILLAR_X = (0.58, 0.80)
HIDE = (0.22, 0.62)
CROSS_Y, CROSS_SCALE = (0.70, 0.70), 0.6  # rows of objects 1 and 2; scale of 2 (it passes behind 1)


def _identity_scene(rng, add, objects, hues, width, height, period, big, small) -> None:
    """Look-alikes: one hue (within +-0.015) and one texture kind for all objects. Objects 1 and 2
    swap sides twice per period along one row; 2 is smaller (CROSS_SCALE) and passes behind 1,
    hidden (nearly) completely for a few frames at each crossing. Object 3 walks behind the
    pillar, is fully hidden there for HIDE of the period (40 of 100 frames in the suite, 50 with
    the frames it takes to pass the edges), then walks out on the far side. Further objects are
    small movers."""
    hue = hues[0]
    hues[:] = (hue + rng.uniform(-0.015, 0.015, len(hues))) % 1.0
    kind = int(rng.integers(4))
    radius = big * 0.8
    left, right = 0.08 * width + radius, PILLAR_X[0] * width - radius * 0.6
    centre, amp = (left + right) / 2, (right - left) / 2
    crossers = [
        lambda t, a0=rng.uniform(0, 360): (centre - amp * math.cos(2 * math.pi * t / period), height * CROSS_Y[0],
                                            0.85, a0 + 1.5 * t, 0.0),
        lambda t, a0=rng.uniform(0, 360): (centre + amp * math.cos(2 * math.pi * t / period), height * CROSS_Y[1],
                                            0.85 * CROSS_SCALE, a0 - 1.5 * t, 0.0),
    ]
    pillar_cx = sum(PILLAR_X) / 2 * width
    hidden_radius = min(radius, 0.4 * (PILLAR_X[1] - PILLAR_X[0]) * width / 0.85)
    x_start, x_end = 0.42 * width, min(0.93 * width, width - 0.5 * hidden_radius)

    def walker(t: int, a0=rng.uniform(0, 360)) -> Pose:
        phase = (t % period) / period
        t_in, t_out = HIDE
        if phase < t_in:  # in view, walking right towards the pillar's middle
            x = x_start + (pillar_cx - x_start) * phase / t_in
        elif phase < t_out:  # resting behind the pillar
            x = pillar_cx
        else:  # out on the far side, then back to the start for the next period
            x = pillar_cx + (x_end - pillar_cx) * min((phase - t_out) / (0.9 - t_out), 1.0)
        return (x, height * 0.28, 0.85, a0 + 1.0 * t, 0.0)

    for k in range(len(hues)):
        if k < 2:
            add(radius, crossers[k], z=float(2 - k), texture_kind=kind)  # object 1 on top
        elif k == 2:
            add(hidden_radius, walker, z=0.0, texture_kind=kind)
        else:
            add(small * 1.5, _mover(rng, width, height, small * 1.5, period, cy=height * 0.5, ay=height * 0.1,
                                    spin=rng.uniform(-3, 3)), z=-1.0, texture_kind=kind)
    # The pillar: an unlabelled foreground element (id 0) drawn over every object.
    w, h = int(round((PILLAR_X[1] - PILLAR_X[0]) * width)), height + 4
    size = max(w, h) + 3
    alpha = np.zeros((size, size), np.float32)
    x0, y0 = (size - w) // 2, (size - h) // 2
    alpha[y0 : y0 + h, x0 : x0 + w] = 1.0
    # Opposite the objects' hue (so it is no look-alike itself), darkened.
    colour = _object_texture(rng, size, hue + 0.5, 2) * 0.6 * alpha[..., None]
    centre_px = (size - 1) / 2.0  # sprite pixel j lands on image x = pose x - centre_px + j
    cx, cy = PILLAR_X[0] * width + centre_px - x0, -2.0 + centre_px - y0
    objects.append(_SceneObject(0, [_Part(colour, alpha, np.zeros(2, np.float32))], size,
                                lambda t: (cx, cy, 1.0, 0.0, 0.0), 1e9))


# ---------------------------------------------------------------------------------------------
# Rendering


def _render_object(obj: _SceneObject, t: int, width: int, height: int):
    """Premultiplied colour and alpha of one object over its bounding box, or None if out of view."""
    x, y, scale, angle, separation = obj.pose(t)
    centre = (obj.sprite_size - 1) / 2.0
    rad = math.radians(angle)
    rot = np.array([[math.cos(rad), -math.sin(rad)], [math.sin(rad), math.cos(rad)]]) * scale
    placements = []
    boxes = []
    half = obj.sprite_size / 2.0 * scale * math.sqrt(2)
    for part in obj.parts:
        pos = np.array([x, y]) + rot @ (part.direction * separation)
        placements.append((part, pos))
        boxes.append((pos[0] - half, pos[1] - half, pos[0] + half, pos[1] + half))
    x0 = max(int(math.floor(min(b[0] for b in boxes))), 0)
    y0 = max(int(math.floor(min(b[1] for b in boxes))), 0)
    x1 = min(int(math.ceil(max(b[2] for b in boxes))) + 1, width)
    y1 = min(int(math.ceil(max(b[3] for b in boxes))) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    colour = np.zeros((y1 - y0, x1 - x0, 3), np.float32)
    alpha = np.zeros((y1 - y0, x1 - x0), np.float32)
    for part, pos in placements:
        shift = pos - rot @ np.array([centre, centre]) - np.array([x0, y0])
        matrix = np.hstack([rot, shift[:, None]]).astype(np.float64)
        colour += cv2.warpAffine(part.colour, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)
        alpha += cv2.warpAffine(part.alpha, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)
    return (y0, y1, x0, x1), colour, np.minimum(alpha, 1.0)


def iter_frames(
    seed: int,
    size: Tuple[int, int] = (640, 480),
    frames: int = 60,
    n_objects: int = 3,
    scenario: str = "mixed",
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield (frame RGB uint8 HxWx3, label uint8 HxW) one frame at a time, in constant memory."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    width, height = int(size[0]), int(size[1])
    if width < 64 or height < 64:
        raise ValueError(f"size {size} too small: at least 64x64")
    if not 1 <= n_objects <= 255:
        raise ValueError(f"n_objects must be 1..255 (uint8 labels), got {n_objects}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    rng = _scenario_seed(seed, scenario, (width, height), frames, n_objects)
    objects = _build_scene(rng, scenario, width, height, frames, n_objects)
    pad = _BACKGROUND_PAD
    background = _background(rng, height + 2 * pad, width + 2 * pad, float(rng.uniform(0, 1)))
    pan_phase = rng.uniform(0, 2 * math.pi, 2)
    # A few stored noise fields, cycled: sensor noise without drawing a fresh field each frame.
    noise = [rng.normal(0.0, 2.5, (height, width, 3)).astype(np.float32) for _ in range(5)]
    for t in range(frames):
        # The view pans slowly (under 1 px/frame) over the larger background.
        ox = pad + int(round(0.9 * pad * math.sin(2 * math.pi * t / 400 + pan_phase[0])))
        oy = pad + int(round(0.5 * pad * math.sin(2 * math.pi * t / 530 + pan_phase[1])))
        canvas = background[oy : oy + height, ox : ox + width].copy()
        label = np.zeros((height, width), np.uint8)
        for obj in objects:
            rendered = _render_object(obj, t, width, height)
            if rendered is None:
                continue
            (y0, y1, x0, x1), colour, alpha = rendered
            roi = canvas[y0:y1, x0:x1]
            roi *= 1.0 - alpha[..., None]
            roi += colour
            label[y0:y1, x0:x1][alpha >= 0.5] = obj.obj_id
        gain = 1.0 + 0.05 * math.sin(2 * math.pi * t / 150)
        canvas *= gain
        canvas += noise[(t * 3) % len(noise)]
        yield np.clip(canvas, 0, 255).astype(np.uint8), label


def _scenario_of(name: str, scenario: Optional[str]) -> str:
    if scenario is not None:
        return scenario
    return name if name in SCENARIOS else "mixed"


def make_sequence(
    name: str,
    seed: int,
    size: Tuple[int, int] = (640, 480),
    frames: int = 60,
    n_objects: int = 3,
    scenario: Optional[str] = None,
) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """All frames and labels of one sequence, in memory (use `iter_frames` for long ones).

    `scenario` defaults to `name` when that is a scenario name, else "mixed".
    """
    frames_out, labels_out = [], []
    for frame, label in iter_frames(seed, size, frames, n_objects, _scenario_of(name, scenario)):
        frames_out.append(frame)
        labels_out.append(label)
    return frames_out, labels_out


_GENERATED_NAME = re.compile(r"^\d{5}\.(jpg|png)$")


def _prepare_folder(folder: Path) -> None:
    """Create `folder`, removing frames of an earlier run; refuse to touch anything else in it."""
    folder.mkdir(parents=True, exist_ok=True)
    foreign = [p for p in folder.iterdir() if not p.name.startswith(".") and not _GENERATED_NAME.match(p.name)]
    if foreign:
        raise DataError(f"output folder {folder} holds files this generator did not write, e.g. {foreign[0]}")
    for path in folder.iterdir():
        if _GENERATED_NAME.match(path.name):
            path.unlink()


def write_sequence(
    out_dir: Union[str, Path],
    name: str,
    seed: int,
    size: Tuple[int, int] = (640, 480),
    frames: int = 60,
    n_objects: int = 3,
    scenario: Optional[str] = None,
    jpeg_quality: int = 90,
) -> str:
    """Stream one sequence to OUT_DIR/JPEGImages/<name>/NNNNN.jpg and Annotations/<name>/NNNNN.png."""
    out = Path(out_dir)
    frames_dir, labels_dir = out / "JPEGImages" / name, out / "Annotations" / name
    _prepare_folder(frames_dir)
    _prepare_folder(labels_dir)
    for t, (frame, label) in enumerate(iter_frames(seed, size, frames, n_objects, _scenario_of(name, scenario))):
        write_frame(frames_dir / f"{t:05d}.jpg", frame, jpeg_quality)
        write_label(labels_dir / f"{t:05d}.png", label)
    return name


def write_suite(out_dir: Union[str, Path], seed: int, size: Tuple[int, int] = (640, 480)) -> List[str]:
    """Write the test suite (translation+scale, rotation+occlusion, leave and re-enter,
    splitting object, many small objects) in the DAVIS layout; returns the sequence names."""
    return [write_sequence(out_dir, scenario, seed, size, frames, n_objects, scenario)
            for scenario, frames, n_objects in SUITE]
