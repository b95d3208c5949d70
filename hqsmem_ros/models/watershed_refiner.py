"""Weight-free refiner that snaps masks to image edges: marker-controlled watershed.

Where the colour refiner re-segments the box by colour statistics, this one keeps the object's
shape and moves its boundary onto the strongest image edges nearby, which is what a refiner
should do to a tracker's coarse mask. Markers: the object's sure interior and sure exterior; the
watershed floods the band between them along the image gradient. Three proposals from three band
widths (narrow, middle, wide: a larger band lets the boundary move further).

Watershed lines (the one-pixel seams between the two regions) go to the background by default
(`lines_to_background`), so a refined mask sits at most a pixel inside the edge. Fed back as the
tracker's prior, that tight convention counters the flow tracker's tendency to grow into
similar-coloured background: on the DAVIS sequences it is what makes refinement pay (J&F 0.609 ->
0.633, full vs base), while on the synthetic suite, where the tracker's masks are already tight,
it costs (0.937 -> 0.893); with the lines given to the object the two results swap sign
(docs/benchmarks.md).

Two options, off by default (measured in docs/benchmarks.md, "the verification gate" section):
`seams_by_color` gives each seam pixel to the side whose neighbouring colours it is nearer (where
the two sides' colours differ more than their texture, `seam_contrast`), and `color_weight`
floods a relief blended with the object-vs-surroundings colour likelihood, so texture edges
inside the object do not hold the seam. Together they make the proposals more accurate than the
tracker's masks on both data sets, but without the tight bias the flow tracker's look-alike
objects lose their identity on re-emergence (the README demo), so the default keeps the old rule.

Prompts: with the coarse mask (`accepts_mask_hint`) the bands are an erosion/dilation of it. With
a box alone the interior marker is a central ellipse of the box and the exterior the outside of
the box, at three ellipse sizes. With clicks (`propose_points`), discs at the clicks are the
markers. Score: mean gradient magnitude along the proposal's boundary (how well it sits on
edges).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

from ..core.interfaces import Refiner
from ..core.settings import setting
from .appearance import color_index, expand_box


def _color_bins_ok(bins) -> bool:
    return len(bins) == 2 and all(0 < int(v) <= 256 and int(v) & (int(v) - 1) == 0 for v in bins)


@dataclass
class WatershedSettings:
    bands: Tuple[float, float, float] = setting(
        (0.02, 0.04, 0.08), "Half-widths of the band the watershed floods around the coarse mask, "
        "as a fraction of the box's shorter side, one per proposal: [narrow, middle, wide]", minimum=0.0)
    min_band: int = setting(1, "Smallest band half-width (pixels)", minimum=0)
    margin: float = setting(0.3, "The refiner works in the box grown by this fraction of its size",
                            minimum=0.0)
    lines_to_background: Optional[bool] = setting(
        True, "Watershed seams go to the background (true), to the object (false), or keep the side "
        "the coarse mask gave them (null)")
    color_weight: float = setting(
        0.0, "Share of the object-vs-surroundings colour likelihood in the relief the watershed "
        "floods (0: the image gradient alone)", minimum=0.0, maximum=1.0)
    color_bins: Tuple[int, int] = setting(
        (4, 16), "Colour bins of that likelihood: [luminance, chroma per axis]", check=_color_bins_ok,
        rule="two powers of two, each <= 256")
    seams_by_color: bool = setting(
        False, "Give each watershed seam pixel to the side whose neighbouring colours it is nearer "
        "(where the sides differ more than their texture); lines_to_background decides the others")
    seam_contrast: float = setting(
        1.0, "How much more the two sides' colours must differ than their texture for "
        "seams_by_color to decide a seam", minimum=0.0)


class WatershedRefiner(Refiner):
    name = "watershed"
    accepts_mask_hint = True
    Settings = WatershedSettings

    def __init__(self, **params):
        s = self.apply_settings(params)  # every setting an attribute; derived ones below
        self.color_bins = tuple(int(v) for v in s.color_bins)
        self._bgr = None

    def set_image(self, image: np.ndarray) -> None:
        self._bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        self._index = color_index(image, *self.color_bins) if self.color_weight > 0 else None
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        self._grad = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))

    def propose(self, boxes: np.ndarray, masks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        if self._bgr is None:
            raise RuntimeError("set_image() must be called before propose()")
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        h, w = self._bgr.shape[:2]
        out = np.zeros((len(boxes), 3, h, w), bool)
        scores = np.zeros((len(boxes), 3), np.float32)
        for k, box in enumerate(boxes):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            if x1 - x0 < 2 or y1 - y0 < 2:
                raise ValueError(f"box {tuple(box)} has no area inside the {w}x{h} image")
            rx0, ry0, rx1, ry1 = expand_box((x0, y0, x1, y1), self.margin, 3, w, h)
            crop = self._bgr[ry0:ry1, rx0:rx1]
            size = min(x1 - x0, y1 - y0)
            hint = masks[k][ry0:ry1, rx0:rx1].astype(np.uint8) if masks is not None else None
            for c, band in enumerate(self.bands):
                r = max(self.min_band, int(round(band * size)))
                fg, bg = self._markers(hint, (x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0), crop.shape[:2], r, c)
                markers = np.zeros(crop.shape[:2], np.int32)
                markers[bg] = 1
                markers[fg] = 2
                relief = crop
                if self.color_weight > 0:
                    relief = self._color_relief(crop, self._index[ry0:ry1, rx0:rx1], fg, bg)
                cv2.watershed(relief, markers)
                m = markers == 2
                undecided = markers == -1
                if self.seams_by_color:
                    to_object, decided = self._seams_by_colour(crop, markers)
                    m |= to_object
                    undecided &= ~decided
                if self.lines_to_background is None and hint is not None:
                    m |= undecided & (hint > 0)  # seams keep the prompt's side: no drift either way
                elif self.lines_to_background is False:
                    m |= undecided
                m[[0, -1], :] = False
                m[:, [0, -1]] = False
                out[k, c, ry0:ry1, rx0:rx1] = m
                edge = (cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0)
                g = self._grad[ry0:ry1, rx0:rx1][edge]
                scores[k, c] = float(g.mean()) if g.size else 0.0
        return out, scores

    accepts_points = True
    click_radii = (0.01, 0.02, 0.04)  # marker disc radius per proposal, fraction of the shorter side

    def propose_points(self, points, labels, boxes) -> Tuple[np.ndarray, np.ndarray]:
        """Clicks as watershed markers: discs at the positive clicks are the object; discs at the
        negative clicks, the outside of the box (if any) and the region's border are the
        background; the flood meets on the strongest edges between them. Three disc sizes."""
        if self._bgr is None:
            raise RuntimeError("set_image() must be called before propose_points()")
        h, w = self._bgr.shape[:2]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = np.zeros((len(boxes), 3, h, w), bool)
        scores = np.zeros((len(boxes), 3), np.float32)
        for k, box in enumerate(boxes):
            pts = np.asarray(points[k], dtype=np.float64).reshape(-1, 2)
            lbl = np.asarray(labels[k]).reshape(-1)
            if np.all(np.isfinite(box)):
                x0, y0, x1, y1 = (int(round(v)) for v in box)
                x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
                rx0, ry0, rx1, ry1 = expand_box((x0, y0, x1, y1), self.margin, 3, w, h)
            else:
                rx0, ry0, rx1, ry1 = 0, 0, w, h
            crop = self._bgr[ry0:ry1, rx0:rx1]
            for c, frac in enumerate(self.click_radii):
                r = max(1, int(round(frac * min(h, w))))
                fg = np.zeros(crop.shape[:2], np.uint8)
                bg = np.zeros(crop.shape[:2], np.uint8)
                for (x, y), on in zip(pts, lbl):
                    cv2.circle(fg if on == 1 else bg, (int(x) - rx0, int(y) - ry0), r, 1, -1)
                bg = bg > 0
                if np.all(np.isfinite(box)):
                    inside = np.zeros_like(bg)
                    inside[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] = True
                    bg |= ~inside
                # OpenCV's watershed ignores markers on the outermost pixel: seed two rows deep.
                bg[:2, :] = bg[-2:, :] = True
                bg[:, :2] = bg[:, -2:] = True
                fg = (fg > 0) & ~bg
                markers = np.zeros(crop.shape[:2], np.int32)
                markers[bg] = 1
                markers[fg] = 2
                cv2.watershed(crop, markers)
                m = markers == 2
                if self.lines_to_background is False:
                    m |= markers == -1
                m[[0, -1], :] = False
                m[:, [0, -1]] = False
                out[k, c, ry0:ry1, rx0:rx1] = m
                edge = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
                g = self._grad[ry0:ry1, rx0:rx1][edge]
                scores[k, c] = float(g.mean()) if g.size else 0.0
        return out, scores

    def _color_relief(self, crop, index, fg, bg):
        """The crop blended with the probability that each pixel's colour is the object's rather
        than its surroundings' (histograms of the sure-object and sure-background markers, as
        GrabCut's colour model): OpenCV's watershed floods along the largest channel step between
        neighbours, so the likelihood's step at the true boundary outweighs texture inside."""
        n_bins = self.color_bins[0] * self.color_bins[1] ** 2
        p_fg = np.bincount(index[fg], minlength=n_bins).astype(np.float32) / max(1, int(fg.sum()))
        p_bg = np.bincount(index[bg], minlength=n_bins).astype(np.float32) / max(1, int(bg.sum()))
        prob = (p_fg + 1e-4) / (p_fg + p_bg + 2e-4)  # an unseen colour is undecided (0.5)
        like = (255.0 * prob[index]).astype(np.float32)
        relief = (1.0 - self.color_weight) * crop.astype(np.float32) + self.color_weight * like[..., None]
        return np.clip(relief + 0.5, 0, 255).astype(np.uint8)

    def _seams_by_colour(self, crop, markers):
        """(to_object, decided) for the seam pixels (-1): a seam pixel goes to the side (object or
        background pixels among its 5x5 neighbours) whose mean colour it is nearer, where the
        colour step between the two sides stands out of their texture (squared step >
        seam_contrast x the sum of the two sides' colour variances); elsewhere it is undecided."""
        seam = markers == -1
        if not seam.any():
            return seam, seam
        img = crop.astype(np.float32)
        means, dists, varis, present = [], [], [], []
        for label in (2, 1):
            side = (markers == label).astype(np.float32)
            n = np.maximum(cv2.blur(side, (5, 5)), 1e-6)[..., None]
            mean = cv2.blur(img * side[..., None], (5, 5)) / n
            var = (cv2.blur(img * img * side[..., None], (5, 5)) / n - mean * mean).sum(axis=-1)
            means.append(mean)
            dists.append(np.square(img - mean).sum(axis=-1))
            varis.append(np.maximum(var, 0.0))
            present.append(n[..., 0] > 1e-3)
        step = np.square(means[0] - means[1]).sum(axis=-1)
        decided = seam & present[0] & present[1] & (step > self.seam_contrast * (varis[0] + varis[1]))
        return decided & (dists[0] < dists[1]), decided

    @staticmethod
    def _markers(hint, box, shape, r, c):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        if hint is not None and hint.any():
            fg = cv2.erode(hint, kernel) > 0
            if not fg.any():  # thinner than the band everywhere: keep it as it is
                fg = hint > 0
            bg = cv2.dilate(hint, kernel) == 0
        else:
            bx0, by0, bx1, by1 = box
            yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
            cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
            ax, ay = max(1.0, (bx1 - bx0) / 2), max(1.0, (by1 - by0) / 2)
            fg = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= (0.15, 0.3, 0.5)[c]
            bg = np.ones(shape, bool)
            bg[by0:by1, bx0:bx1] = False
        bg[[0, -1], :] = True
        bg[:, [0, -1]] = True
        bg &= ~fg
        return fg, bg
