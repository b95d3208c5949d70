"""Weight-free box-prompted refiner: three colour-model segmentations of the box.

SAM-HQ's role on a CPU without weights. Inside the box, a foreground colour model competes with a
background model; the log-likelihood ratio is smoothed and re-estimated once from its own
segmentation (a light GrabCut-style iteration), then cut at three thresholds:

    proposal 0: tight  (ratio > +0.5)  -- fewer background pixels, may lose thin parts
    proposal 1: middle (ratio >  0)
    proposal 2: loose  (ratio > -0.5)  -- whole object, may take background of similar colour

Each proposal keeps its connected components that reach the box's central region and has its
holes filled. Score = mean ratio inside minus outside (the contrast the proposal achieves).

Seeds. With a box alone (a user's box prompt) the object's colours are seeded from the box's
central ellipse and the background's from the ring around the box. SAM knows what objects look
like; this refiner does not, and on natural images a box-only colour model often takes the
background of similar colour or loses thin parts. So when the pipeline refines a
tracked object it also passes the coarse mask (`accepts_mask_hint`): the mask's eroded core seeds
the object colours and the band outside it the background. The paper prompts SAM-HQ with the box
only (supp. Table 2); neural refiners keep doing exactly that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

from ..core.interfaces import Refiner
from ..core.settings import setting
from .appearance import N_COLOR_BINS, color_index, expand_box

_EPS = 1e-3


@dataclass
class ColorSettings:
    thresholds: Tuple[float, float, float] = setting(
        (0.5, 0.0, -0.5), "Colour log-likelihood ratio cuts of the three proposals: [tight, middle, loose]")
    ring: float = setting(0.3, "Background colours come from the ring around the box, this fraction of "
                          "its size wide", minimum=0.0)
    iterations: int = setting(1, "Re-estimations of the object colours from the refiner's own "
                              "segmentation", minimum=0)
    smooth: int = setting(5, "Gaussian smoothing of the ratio (kernel pixels, made odd)", minimum=0)
    seed_radius: float = setting(0.6, "With a box alone: the central ellipse (this fraction of the box) "
                                 "seeds the object colours", minimum=0.0)
    use_mask_hint: bool = setting(True, "Seed the colours from the tracker's coarse mask when the "
                                  "pipeline passes it (false: from the box alone)")


class ColorBoxRefiner(Refiner):
    name = "color"
    accepts_mask_hint = True  # see propose(): the coarse mask may seed the colour models
    Settings = ColorSettings

    def __init__(self, **params):
        s = self.apply_settings(params)  # every setting an attribute; derived ones below
        self.smooth = s.smooth | 1
        self._index = None

    def set_image(self, image: np.ndarray) -> None:
        self._index = color_index(image)

    def propose(self, boxes: np.ndarray, masks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        if self._index is None:
            raise RuntimeError("set_image() must be called before propose()")
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        h, w = self._index.shape
        out = np.zeros((len(boxes), 3, h, w), bool)
        scores = np.zeros((len(boxes), 3), np.float32)
        for k, box in enumerate(boxes):
            hint = masks[k] if masks is not None and self.use_mask_hint else None
            out[k], scores[k] = self._propose_one(box, h, w, hint)
        return out, scores

    def _propose_one(self, box, h, w, hint=None):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        out = np.zeros((3, h, w), bool)
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise ValueError(f"box {tuple(box)} has no area inside the {w}x{h} image")
        rx0, ry0, rx1, ry1 = expand_box((x0, y0, x1, y1), self.ring, 3, w, h)
        idx = self._index[ry0:ry1, rx0:rx1]
        bh, bw = ry1 - ry0, rx1 - rx0
        inside = np.zeros((bh, bw), bool)
        inside[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] = True
        yy, xx = np.mgrid[0:bh, 0:bw]
        cx, cy = (x0 + x1) / 2 - rx0, (y0 + y1) / 2 - ry0
        ax, ay = max(1.0, (x1 - x0) / 2), max(1.0, (y1 - y0) / 2)
        ell = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
        center = ell <= 0.35
        seed_fg = (ell <= self.seed_radius) & inside
        ring = ~inside
        if hint is not None:
            # The coarse mask as a prompt: its eroded core seeds the object's colours and the
            # band just outside it (within the crop) the background's.
            hm = hint[ry0:ry1, rx0:rx1].astype(np.uint8)
            r = max(1, int(round(0.08 * min(x1 - x0, y1 - y0))))
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            core = cv2.erode(hm, kernel) > 0
            if core.sum() >= 8:
                seed_fg = core
            ring = cv2.dilate(hm, kernel) == 0
        bg_hist = self._hist(idx[ring])
        if not (~inside).any():  # box covers the whole image: use its border as background
            border = np.zeros_like(inside)
            border[[0, -1], :] = True
            border[:, [0, -1]] = True
            bg_hist = self._hist(idx[border])
        fg_hist = self._hist(idx[seed_fg])
        for _ in range(self.iterations + 1):
            lr = np.log((fg_hist + _EPS) / (bg_hist + _EPS)).astype(np.float32)[idx]
            lr = cv2.GaussianBlur(lr, (self.smooth, self.smooth), 0)
            lr[~inside] = -10.0
            seg = lr > 0
            if seg.sum() >= 4:
                fg_hist = self._hist(idx[seg])
        scores = np.zeros(3, np.float32)
        for c, thr in enumerate(self.thresholds):
            m = self._clean(lr > thr, center)
            out[c, ry0:ry1, rx0:rx1] = m
            if m.any() and (inside & ~m).any():
                scores[c] = float(lr[m].mean() - lr[inside & ~m].mean())
            elif m.any():
                scores[c] = float(lr[m].mean())
        return out, scores

    @staticmethod
    def _hist(values: np.ndarray) -> np.ndarray:
        if values.size == 0:
            return np.full(N_COLOR_BINS, 1.0 / N_COLOR_BINS, np.float32)
        return (np.bincount(values, minlength=N_COLOR_BINS) / values.size).astype(np.float32)

    @staticmethod
    def _clean(m: np.ndarray, center: np.ndarray) -> np.ndarray:
        m8 = m.astype(np.uint8)
        n, comp = cv2.connectedComponents(m8, connectivity=8)
        if n > 2:
            keep = np.zeros(n, bool)
            keep[np.unique(comp[center & m])] = True
            keep[0] = False
            if not keep.any():  # nothing reaches the centre: keep the largest piece
                keep[1 + np.argmax(np.bincount(comp.ravel())[1:])] = True
            m8 = keep[comp].astype(np.uint8)
        # Fill holes: background not connected to the crop border is inside the object.
        inv = (1 - m8).astype(np.uint8)
        pad = np.pad(inv, 1, constant_values=1)
        n2, comp2 = cv2.connectedComponents(pad, connectivity=4)
        outside = comp2 == comp2[0, 0]
        return (~outside[1:-1, 1:-1]) | (m8 > 0)
