"""Colour quantisation and histogram helpers shared by the weight-free models.

Colours are binned in YCrCb: luminance coarsely (lighting changes), chroma finely (what tells
an object from its background).
"""
from __future__ import annotations

import cv2
import numpy as np

from ..core.masks import mask_box  # noqa: F401  (re-exported for the models)

Y_BINS, C_BINS = 4, 16
N_COLOR_BINS = Y_BINS * C_BINS * C_BINS


def color_index(rgb: np.ndarray, y_bins: int = Y_BINS, c_bins: int = C_BINS) -> np.ndarray:
    """HxW int32 colour-bin index (0 .. y_bins * c_bins**2 - 1) of every pixel of an RGB uint8
    image; bin counts are powers of two."""
    ycc = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
    ys, cs = 8 - (y_bins.bit_length() - 1), 8 - (c_bins.bit_length() - 1)
    y = ycc[..., 0].astype(np.int32) >> ys
    cr = ycc[..., 1].astype(np.int32) >> cs
    cb = ycc[..., 2].astype(np.int32) >> cs
    return (y * c_bins + cr) * c_bins + cb


def histogram(index: np.ndarray, mask: np.ndarray, bins: int = N_COLOR_BINS) -> np.ndarray:
    """Normalised histogram (sums to 1, zeros if the mask is empty) of `index` under `mask`."""
    vals = index[mask]
    if vals.size == 0:
        return np.zeros(bins, np.float32)
    h = np.bincount(vals, minlength=bins).astype(np.float32)
    return h / vals.size


def expand_box(box, margin: float, min_margin: int, width: int, height: int):
    x0, y0, x1, y1 = box
    mx = max(min_margin, int(round((x1 - x0) * margin)))
    my = max(min_margin, int(round((y1 - y0) * margin)))
    return max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)
