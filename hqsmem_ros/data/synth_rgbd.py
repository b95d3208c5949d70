"""A synthetic RGB-D scene with exact 3D truth: textured objects 1-4 m away, moving in depth.

Built from hqsmem_ros.data.synth's textures, sprites and renderer. The camera is a pinhole
(`intrinsics(width, height)`: fx = fy = 0.82 * width, principal point at the image centre) in a
static view of a textured wall 4.6-5.4 m away. Each object is a rigid shape of fixed metric size
whose reference distance Z(t) swings between two values within 1-4 m while it moves across the
image; its image size follows 1 / Z. Its surface is a dome bulging towards the camera (depth
Z - h (1 - rho^2) at relative radius rho, h = 30 % of its radius), so the depth under a mask
varies like a real object's. Objects are drawn far to near, so nearer ones occlude.

Depth as a sensor gives it (`depth_mm` 16UC1 millimetres, `depth_m` 32FC1 metres): the exact
depth plus Gaussian noise of sigma 1.5 mm * (z / 1 m)^2, rounded to millimetres; 2 % of the
pixels are holes (0 in 16UC1, NaN in 32FC1), and pixels on depth edges are "flying pixels" (the
mean depth of their 3x3 neighbourhood, between the object and what is behind it).

Position truth (`Truth3D`): what the method can see. From the exact depth (no noise, no holes,
no flying pixels) and the exact label, every visible pixel of the object back-projected to 3D;
`centre` is the per-axis median of those points (the centre of the visible surface, the same
estimator the method uses, so an error measures depth and mask handling, not the definition),
`box_min`/`box_max` their axis-aligned box. `distance` is Z(t), the object's reference distance.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import cv2
import numpy as np

from hqsmem_ros.core.depth3d import Intrinsics
from hqsmem_ros.data.synth import _background, _make_parts, _render_object, _SceneObject

WALL_DEPTH_M = (4.6, 5.4)  # top, bottom of the background wall
HOLE_FRACTION = 0.02
NOISE_AT_1M = 0.0015  # metres, grows with z^2
# (nearest, farthest) reference distance of the objects, in order; more objects reuse them.
DEPTH_RANGES = ((1.0, 2.0), (1.8, 3.0), (2.8, 4.0), (1.4, 3.4))


def intrinsics(width: int, height: int) -> Intrinsics:
    f = 0.82 * width
    return Intrinsics(f, f, (width - 1) / 2.0, (height - 1) / 2.0, width, height)


@dataclass
class Truth3D:
    centre: Tuple[float, float, float]
    box_min: Tuple[float, float, float]
    box_max: Tuple[float, float, float]
    visible_pixels: int
    distance: float  # the object's reference distance Z(t), metres


@dataclass
class RGBDFrame:
    rgb: np.ndarray  # HxWx3 uint8
    label: np.ndarray  # HxW uint8, pixel = object id (visible part)
    depth_mm: np.ndarray  # HxW uint16, millimetres, 0 = no depth
    depth_m: np.ndarray  # HxW float32, metres, NaN = no depth
    depth_exact: np.ndarray  # HxW float32 metres, no sensor effects
    truth: Dict[int, Truth3D]  # per object visible in this frame


@dataclass
class _DepthObject:
    scene: _SceneObject
    radius_m: float
    dome_m: float
    z_near: float
    z_far: float
    z_period: float
    z_phase: float
    radius_px_max: float  # image radius at z_near

    def distance(self, t: int) -> float:
        s = 0.5 - 0.5 * math.cos(2 * math.pi * t / self.z_period + self.z_phase)
        return self.z_near + (self.z_far - self.z_near) * s


def _build(rng: np.random.Generator, width: int, height: int, frames: int, n_objects: int,
           intr: Intrinsics) -> List[_DepthObject]:
    objects = []
    period = float(min(max(frames, 40), 200))
    hues = rng.uniform(0, 1) + np.arange(n_objects) / max(n_objects, 1) + 0.15
    for k in range(n_objects):
        z_near, z_far = DEPTH_RANGES[k % len(DEPTH_RANGES)]
        radius_m = float(rng.uniform(0.16, 0.22)) * (1.0 + 0.35 * (z_near - 1.0))
        r_px = radius_m * intr.fx / z_near
        parts, size = _make_parts(rng, r_px, float(hues[k] % 1.0), False)
        ax, ay = rng.uniform(0.18, 0.28) * width, rng.uniform(0.12, 0.2) * height
        cx, cy = width * (0.25 + 0.25 * (k % 3)), height * (0.3 + 0.2 * (k % 3))
        px, py, fx, fy = period * rng.uniform(0.8, 1.3), period * rng.uniform(0.8, 1.3), *rng.uniform(0, 2 * math.pi, 2)
        spin, a0 = rng.uniform(-1.5, 1.5), rng.uniform(0, 360)
        obj = _DepthObject(None, radius_m, 0.3 * radius_m, z_near, z_far, period * rng.uniform(0.7, 1.0),
                           rng.uniform(0, 2 * math.pi), r_px)

        def pose(t, obj=obj, cx=cx, cy=cy, ax=ax, ay=ay, px=px, py=py, fx=fx, fy=fy, spin=spin, a0=a0):
            return (cx + ax * math.sin(2 * math.pi * t / px + fx), cy + ay * math.sin(2 * math.pi * t / py + fy),
                    obj.z_near / obj.distance(t), a0 + spin * t, 0.0)

        obj.scene = _SceneObject(k + 1, parts, size, pose)
        objects.append(obj)
    return objects


def iter_rgbd(seed: int = 0, size: Tuple[int, int] = (640, 480), frames: int = 90,
              n_objects: int = 3) -> Iterator[RGBDFrame]:
    """Frames of the scene one at a time (deterministic per arguments)."""
    width, height = int(size[0]), int(size[1])
    if width < 64 or height < 64:
        raise ValueError(f"size {size} too small: at least 64x64")
    if not 1 <= n_objects <= 12:
        raise ValueError(f"n_objects must be 1..12, got {n_objects}")
    rng = np.random.default_rng([int(seed), zlib.crc32(b"rgbd"), width, height, frames, n_objects])
    intr = intrinsics(width, height)
    objects = _build(rng, width, height, frames, n_objects, intr)
    background = _background(rng, height, width, float(rng.uniform(0, 1)))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    wall = (WALL_DEPTH_M[0] + (WALL_DEPTH_M[1] - WALL_DEPTH_M[0]) * yy / (height - 1)).astype(np.float32)
    ray_x, ray_y = (xx - intr.cx) / intr.fx, (yy - intr.cy) / intr.fy
    noise_rng = np.random.default_rng([int(seed), 7, width, height])
    for t in range(frames):
        canvas = background.copy()
        label = np.zeros((height, width), np.uint8)
        depth = wall.copy()
        for obj in sorted(objects, key=lambda o: -o.distance(t)):  # far to near
            rendered = _render_object(obj.scene, t, width, height)
            if rendered is None:
                continue
            (y0, y1, x0, x1), colour, alpha = rendered
            roi = canvas[y0:y1, x0:x1]
            roi *= 1.0 - alpha[..., None]
            roi += colour
            inside = alpha >= 0.5
            label[y0:y1, x0:x1][inside] = obj.scene.obj_id
            u, v, scale, _, _ = obj.scene.pose(t)
            r_px = obj.radius_px_max * scale
            rho2 = ((xx[y0:y1, x0:x1] - u) ** 2 + (yy[y0:y1, x0:x1] - v) ** 2) / (r_px * r_px)
            z = obj.distance(t) - obj.dome_m * np.clip(1.0 - rho2, 0.0, 1.0)
            depth[y0:y1, x0:x1][inside] = z[inside]
        truth = {}
        for obj in objects:
            sel = label == obj.scene.obj_id
            n = int(np.count_nonzero(sel))
            if n == 0:
                continue
            z = depth[sel]
            pts = np.stack([ray_x[sel] * z, ray_y[sel] * z, z], axis=1)
            truth[obj.scene.obj_id] = Truth3D(tuple(float(c) for c in np.median(pts, axis=0)),
                                              tuple(float(c) for c in pts.min(axis=0)),
                                              tuple(float(c) for c in pts.max(axis=0)), n, obj.distance(t))
        measured = depth + noise_rng.standard_normal(depth.shape, dtype=np.float32) * (NOISE_AT_1M * depth * depth)
        # Flying pixels: on depth edges, the mean of the 3x3 neighbourhood (a mix of both sides).
        edges = cv2.morphologyEx(label, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        measured[edges] = cv2.blur(depth, (3, 3))[edges]
        holes = noise_rng.random(depth.shape, dtype=np.float32) < HOLE_FRACTION
        depth_mm = np.round(measured * 1000.0).astype(np.uint16)
        depth_mm[holes] = 0
        depth_m = depth_mm.astype(np.float32) * np.float32(0.001)
        depth_m[holes] = np.nan
        canvas += noise_rng.normal(0.0, 2.5, canvas.shape).astype(np.float32)
        yield RGBDFrame(np.clip(canvas, 0, 255).astype(np.uint8), label, depth_mm, depth_m, depth, truth)


def make_rgbd(seed: int = 0, size: Tuple[int, int] = (640, 480), frames: int = 90,
              n_objects: int = 3) -> List[RGBDFrame]:
    return list(iter_rgbd(seed, size, frames, n_objects))
