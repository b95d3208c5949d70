"""Weight-free appearance embedding: colour, gradient and position histograms under a mask.

The CPU stand-in for DINO's masked patch pooling. Every pixel carries three one-hot features:
its colour bin, its gradient-orientation bin, and its cell in a coarse grid over the image (DINO's
patch tokens carry position embeddings too, so pooling them also says *where* the mask lies).
Pooling under a mask gives three histograms; each is square-rooted and weighted before the L2
normalisation, so the cosine of two embeddings is a weighted Bhattacharyya coefficient in [0, 1].
Without the position block a proposal covering only part of the object would look the same as
the whole object, and the verification gate could not tell them apart.

Context block (`context_weight` > 0): the colour histogram of a thin ring just outside the mask
(`context_width` pixels). Histograms pooled over two nearly identical masks are nearly identical
(a cosine of near-equal vectors is 1 minus a second-order term: 0.99+ for any proposal that moves
a boundary by a pixel or two), so without it the gate's threshold decides nothing. The ring
makes the gate see *where* a boundary moved: a proposal that cuts into the object puts the
object's own colours into its ring (low cosine: rejected, as the paper's gate rejects a part of
the object), one that trims a leak into the background keeps a background-coloured ring
(high cosine: accepted).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..core.interfaces import FeatureExtractor
from ..core.settings import setting
from .appearance import N_COLOR_BINS, color_index

N_ORIENT = 8


@dataclass
class HistogramSettings:
    gradient_weight: float = setting(0.5, "Weight of the gradient-orientation histogram in the embedding",
                                     minimum=0.0)
    position_weight: float = setting(2.0, "Weight of the position histogram (where the mask lies) in "
                                     "the embedding", minimum=0.0)
    grid: int = setting(32, "Position cells per image side", minimum=1)
    context_weight: float = setting(0.0, "Weight of the colour histogram of a thin ring just outside the "
                                    "mask (0: no ring)", minimum=0.0)
    context_width: int = setting(2, "Width of that ring (pixels)", minimum=1)


class HistogramFeatures(FeatureExtractor):
    name = "histogram"
    Settings = HistogramSettings

    def __init__(self, **params):
        self.apply_settings(params)  # every setting an attribute; derived ones below
        self._ring_kernel = cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * self.context_width + 1, 2 * self.context_width + 1))
        self._index = None

    @property
    def dim(self) -> int:
        return N_COLOR_BINS + 2 * N_ORIENT + self.grid * self.grid + (N_COLOR_BINS if self.context_weight > 0 else 0)

    def set_image(self, image: np.ndarray) -> None:
        color = color_index(image)
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        gx = cv2.Sobel(gray, cv2.CV_16S, 1, 0, ksize=3)
        gy = cv2.Sobel(gray, cv2.CV_16S, 0, 1, ksize=3)
        mag = np.abs(gx).astype(np.int32) + np.abs(gy)
        angle = np.arctan2(gy, gx.astype(np.float32))
        orient = ((angle + np.pi) * (N_ORIENT / (2 * np.pi))).astype(np.int32) % N_ORIENT
        # Weak gradients fall in a second block: flat regions keep their own signature.
        strong = mag > 40
        grad = np.where(strong, orient, N_ORIENT + orient)
        self._index = color + 0  # int32 copy
        self._grad = grad + N_COLOR_BINS
        self._shape = gray.shape
        h, w = gray.shape
        gy_cell = (np.arange(h) * self.grid // h).astype(np.int32)
        gx_cell = (np.arange(w) * self.grid // w).astype(np.int32)
        self._cell = gy_cell[:, None] * self.grid + gx_cell[None, :]

    def embed(self, masks: np.ndarray) -> np.ndarray:
        if self._index is None:
            raise RuntimeError("set_image() must be called before embed()")
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3 or masks.shape[1:] != self._shape:
            raise ValueError(f"masks must be (M,{self._shape[0]},{self._shape[1]}), got {masks.shape}")
        out = np.zeros((masks.shape[0], self.dim), np.float32)
        for k, m in enumerate(masks):
            rows = np.flatnonzero(m.any(axis=1))
            if rows.size == 0:
                continue
            cols = np.flatnonzero(m.any(axis=0))
            r = self.context_width if self.context_weight > 0 else 0
            y0, y1 = max(0, rows[0] - r), min(self._shape[0], rows[-1] + 1 + r)
            x0, x1 = max(0, cols[0] - r), min(self._shape[1], cols[-1] + 1 + r)
            sl = (slice(y0, y1), slice(x0, x1))
            mm = m[sl]
            n = mm.sum()
            c = np.bincount(self._index[sl][mm], minlength=N_COLOR_BINS)
            g = np.bincount(self._grad[sl][mm] - N_COLOR_BINS, minlength=2 * N_ORIENT)
            p = np.bincount(self._cell[sl][mm], minlength=self.grid * self.grid)
            blocks = [np.sqrt(c / n), self.gradient_weight * np.sqrt(g / n), self.position_weight * np.sqrt(p / n)]
            if r:
                ring = (cv2.dilate(mm.astype(np.uint8), self._ring_kernel) > 0) & ~mm
                nr = ring.sum()
                cr = np.bincount(self._index[sl][ring], minlength=N_COLOR_BINS)
                blocks.append(self.context_weight * np.sqrt(cr / nr) if nr else np.zeros(N_COLOR_BINS))
            v = np.concatenate(blocks)
            out[k] = v / np.linalg.norm(v)
        return out
