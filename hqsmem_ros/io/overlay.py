"""Overlay of tracked masks on the camera image (for RViz/Foxglove and the demo video), ROS-free."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import cv2
import numpy as np


def id_color(object_id: int) -> np.ndarray:
    """A stable, well-separated RGB colour per id (golden-ratio hue steps)."""
    hue = int((object_id * 0.618033988749895 % 1.0) * 180)
    hsv = np.array([[[hue, 220, 255]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]


def render_overlay(rgb: np.ndarray, label_map: np.ndarray, objects: Iterable = (),
                   alpha: float = 0.5, labels: Optional[Dict[int, str]] = None) -> np.ndarray:
    """Blend each object's mask in its colour, outline it, and write its id (and label) at its box.

    `objects` are the pipeline's TrackedObject (id, box, visible); `labels` maps id -> text.
    """
    out = rgb.copy()
    ids = [int(i) for i in np.unique(label_map) if i != 0]
    if ids:
        lut = np.zeros((int(max(ids)) + 1, 3), np.uint8)
        for oid in ids:
            lut[oid] = id_color(oid)
        fg = label_map > 0
        colour = lut[np.minimum(label_map, lut.shape[0] - 1)]
        out[fg] = (out[fg] * (1.0 - alpha) + colour[fg] * alpha).astype(np.uint8)
        edges = cv2.morphologyEx(label_map, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        out[edges & fg] = colour[edges & fg]
    for obj in objects:
        if not obj.visible:
            continue
        x0, y0, x1, y1 = (int(v) for v in obj.box)
        colour = tuple(int(c) for c in id_color(obj.id))
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, 1)
        text = str(obj.id) + (f" {labels[obj.id]}" if labels and labels.get(obj.id) else "")
        cv2.putText(out, text, (x0 + 2, max(10, y0 + 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    colour, 1, cv2.LINE_AA)
    return out
